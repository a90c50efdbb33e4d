"""`shortgpt-fast cut` against hostile checkpoint folders (docs/security.md).

Every case runs the real CLI in a subprocess and asserts the refusal contract: non-zero exit, exactly one line on
stderr, no traceback, and nothing outside the checkpoint (and the requested output) changed: the whole sandbox
around it is hashed before and after. Checkpoints are hand-written safetensors files of a few hundred bytes, so the
suite needs no torch and stays fast.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from shortgpt_fast.surgery import cut_in_place as surgery
from shortgpt_fast.surgery.checkpoint import CUT_RECORD_KEY, JOURNAL_NAME, cut_checkpoint

# The structural proof (verify_structure) builds the model with transformers; these hand-made checkpoints test the
# byte-level surgery, so it is skipped where the flag exists.
_NO_PROOF = ["--no-verify"] if "check" in inspect.signature(cut_checkpoint).parameters else []
_NO_PROOF_KW = {"check": False} if _NO_PROOF else {}
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
LAYERS = 4


# ------------------------------------------------------------------------------------------------------------------
# Fixtures: a sandbox holding a checkpoint and some bystander files

def _safetensors(path: Path, tensors: dict[str, int], header_extra: dict | None = None) -> None:
    header, data, offset = {}, b"", 0
    for i, (name, n) in enumerate(tensors.items()):
        header[name] = {"dtype": "F32", "shape": [n], "data_offsets": [offset, offset + 4 * n]}
        data += bytes([i + 1]) * (4 * n)
        offset += 4 * n
    header.update(header_extra or {})
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def make_checkpoint(d: Path, layers: int = LAYERS, sharded: bool = True, names=None) -> Path:
    d.mkdir(parents=True)
    names = names or [f"model.layers.{i}" for i in range(layers)]
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers,
                                               "layer_types": ["full_attention"] * layers}))
    (d / "README.md").write_text("# tiny\n")
    (d / "tokenizer.json").write_text("{}")
    tensors = {"model.embed_tokens.weight": 8, **{f"{p}.mlp.weight": 4 + i for i, p in enumerate(names)},
               "lm_head.weight": 8}
    if not sharded:
        _safetensors(d / "model.safetensors", tensors)
        return d
    items = list(tensors.items())
    shards = [items[:3], items[3:]]
    weight_map = {}
    for k, part in enumerate(shards):
        name = f"model-{k + 1:05d}-of-00002.safetensors"
        _safetensors(d / name, dict(part))
        weight_map.update({t: name for t, _ in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1},
                                                               "weight_map": weight_map}))
    return d


@pytest.fixture
def sandbox(tmp_path):
    box = tmp_path / "sandbox"
    (box / "outside").mkdir(parents=True)
    (box / "outside" / "secret.txt").write_text("do not read me\n")
    _safetensors(box / "outside" / "victim.safetensors", {"model.layers.0.mlp.weight": 4})
    make_checkpoint(box / "ckpt")
    return box


def tree_hash(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Path -> kind, mode and content hash of everything under root (links by target, not followed)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if any(rel == s or rel.startswith(s + os.sep) for s in skip):
                continue
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = f"{oct(st.st_mode)}:" + hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = oct(st.st_mode)
    return out


def cli(*args, timeout: float = 60, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shortgpt_fast", "cut", *map(str, args), *_NO_PROOF],
                          capture_output=True, text=True, timeout=timeout, env=env or ENV)


def assert_refused(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0, proc.stdout
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines[0]) <= 700, f"error line of {len(lines[0])} chars"
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def refused_and_untouched(box: Path, args, *fragments: str, ckpt_changes: bool = False) -> str:
    before = tree_hash(box.parent, skip=("sandbox/ckpt",) if ckpt_changes else ())
    line = assert_refused(cli(*args), *fragments)
    assert tree_hash(box.parent, skip=("sandbox/ckpt",) if ckpt_changes else ()) == before
    return line


# ------------------------------------------------------------------------------------------------------------------
# Crafted journals

def _real_journal(box: Path) -> dict:
    """A genuine journal for `ckpt`, produced by a cut stopped right after writing it, on a throwaway copy; the
    folder identity is then rebound to `ckpt` so only the field under test is wrong."""
    work = box.parent / "journal-source"
    shutil.copytree(box / "ckpt", work)

    class Stop(Exception):
        pass

    def stop(k, what):
        raise Stop

    surgery.after_step_hook = stop
    try:
        with pytest.raises(Stop):
            cut_checkpoint(work, [1], in_place=True, copy_method="copy_file_range", **_NO_PROOF_KW)
    finally:
        surgery.after_step_hook = None
    doc = json.loads((work / JOURNAL_NAME).read_text())
    shutil.rmtree(work)
    st = os.stat(box / "ckpt")
    doc["folder"] = {"dev": st.st_dev, "ino": st.st_ino}
    return doc


def _rehash(doc: dict) -> dict:
    doc["body_sha256"] = hashlib.sha256(json.dumps(doc["plan"], sort_keys=True, separators=(",", ":"))
                                        .encode()).hexdigest()
    return doc


def _set_shard(field, value, kind=None):
    def mutate(doc, box):
        shard = next(s for s in doc["plan"]["shards"] if kind is None or s["kind"] == kind)
        shard[field] = value(box) if callable(value) else value
        return _rehash(doc)
    return mutate


def _symlinked_source(doc, box):
    # A shard name that is plain but is a link (planted next to the journal) to a file outside the folder.
    os.symlink(box / "outside" / "victim.safetensors", box / "ckpt" / "evil.safetensors")
    old = doc["plan"]["shards"][0]["source"]
    doc["plan"]["shards"][0]["source"] = "evil.safetensors"
    for t in doc["plan"]["kept_tensors"]:
        t[0] = "evil.safetensors" if t[0] == old else t[0]
    return _rehash(doc)


JOURNALS = {
    "absolute source path": (_set_shard("source", lambda box: str(box / "outside" / "victim.safetensors")),
                             "not a plain shard file name"),
    "dot-dot target": (_set_shard("target", "../outside/victim.safetensors", "header"), "not a plain shard"),
    "target names config.json": (_set_shard("target", "config.json", "header"), "not a plain shard"),
    "shard source is an outside file": (_set_shard("source", "../outside/victim.safetensors"),
                                        "not a plain shard"),
    "source is a symlink out": (_symlinked_source, "symlink"),
    "wrong run id": (lambda doc, box: {**doc, "run_id": "not-hex"}, "run id"),
    "copied from another folder": (lambda doc, box: {**doc, "folder": {"dev": 1, "ino": 2}}, "another folder"),
    "edited plan, stale checksum": (lambda doc, box: {**doc, "plan": {**doc["plan"], "removed": [2]}}, "checksum"),
    "edited plan, recomputed checksum": (lambda doc, box: _rehash({**doc, "plan": {**doc["plan"], "removed": [2]}}),
                                         "mapping"),
    "version 1 journal": (lambda doc, box: {"version": 1, "plan": doc["plan"]}, "version"),
    "plan is a list": (lambda doc, box: _rehash({**doc, "plan": []}), "expected fields"),
    "unknown shard kind": (_set_shard("kind", "unlink"), "kind"),
    "negative offsets": (_set_shard("runs", [[-1, 5]], "header"), "runs"),
    "boolean layer count": (lambda doc, box: _rehash({**doc, "plan": {**doc["plan"], "num_layers": True}}),
                            "layer count"),
    "huge layer count": (lambda doc, box: _rehash({**doc, "plan": {**doc["plan"], "num_layers": 10 ** 30}}),
                         "mapping"),
    "not JSON": (lambda doc, box: b"{\"version\": 2, ", "JSON"),
    "JSON array": (lambda doc, box: [], "JSON object"),
    "nested 100k deep": (lambda doc, box: b"[" * 100_000 + b"]" * 100_000, "nested"),
}


@pytest.mark.parametrize("case", sorted(JOURNALS))
def test_crafted_journal_is_refused(sandbox, case):
    mutate, fragment = JOURNALS[case]
    doc = mutate(_real_journal(sandbox), sandbox)
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    (sandbox / "ckpt" / JOURNAL_NAME).write_bytes(data)
    line = refused_and_untouched(sandbox, [sandbox / "ckpt", "--layers", "1", "--in-place"], fragment)
    if case != "source is a symlink out":  # that one passes the schema and is stopped at the file itself
        assert JOURNAL_NAME in line and "delete that file" in line


def test_journal_fifo_and_symlink_are_refused_without_hanging(sandbox):
    os.mkfifo(sandbox / "ckpt" / JOURNAL_NAME)
    refused_and_untouched(sandbox, [sandbox / "ckpt", "--layers", "1", "--in-place"], "FIFO")
    os.unlink(sandbox / "ckpt" / JOURNAL_NAME)
    os.symlink(sandbox / "outside" / "secret.txt", sandbox / "ckpt" / JOURNAL_NAME)
    refused_and_untouched(sandbox, [sandbox / "ckpt", "--layers", "1", "--in-place"], "symlink")


def test_planted_temp_file_symlink_is_not_written_through(sandbox):
    # The in-place cut writes config.json via `.config.json.cut-tmp`; a link planted at that name must be replaced,
    # never followed into the outside file.
    os.symlink(sandbox / "outside" / "secret.txt", sandbox / "ckpt" / ".config.json.cut-tmp")
    before = tree_hash(sandbox / "outside")
    proc = cli(sandbox / "ckpt", "--layers", "1", "--in-place")
    assert proc.returncode == 0, proc.stderr
    assert tree_hash(sandbox / "outside") == before


# ------------------------------------------------------------------------------------------------------------------
# Symlinks, FIFOs and modes

def _link(name, target):
    def make(box):
        path = box / "ckpt" / name
        if path.exists():
            path.unlink()
        os.symlink(target(box) if callable(target) else target, path)
    return make


LINKS = {
    "README.md -> outside file": (_link("README.md", lambda b: b / "outside" / "secret.txt"), "outside"),
    "README.md -> /proc/self/cmdline": (_link("README.md", "/proc/self/cmdline"), "outside"),
    "config.json -> outside": (_link("config.json", lambda b: b / "outside" / "secret.txt"), "outside"),
    "index -> outside": (_link("model.safetensors.index.json", lambda b: b / "outside" / "secret.txt"), "outside"),
    "shard -> outside": (_link("model-00001-of-00002.safetensors",
                               lambda b: b / "outside" / "victim.safetensors"), "outside"),
    "extra file -> outside": (_link("tokenizer.json", lambda b: b / "outside" / "secret.txt"), "outside"),
    "subfolder -> outside": (_link("assets", lambda b: b / "outside"), "outside"),
    "dangling link": (_link("notes.txt", "/nonexistent/x"), "outside"),
}


@pytest.mark.parametrize("mode", ["copy", "in-place"])
@pytest.mark.parametrize("case", sorted(LINKS))
def test_symlinks_out_of_the_folder_are_refused(sandbox, case, mode):
    make, fragment = LINKS[case]
    make(sandbox)
    if mode == "in-place" and case.startswith(("subfolder", "extra", "dangling")):
        pytest.skip("in place never reads files it does not rewrite")
    args = [sandbox / "ckpt", "--layers", "1"] + (["--out", sandbox / "out"] if mode == "copy" else ["--in-place"])
    refused_and_untouched(sandbox, args, fragment)
    assert not (sandbox / "out").exists()


def test_links_inside_the_folder_are_carried_and_empty_folders_kept(sandbox):
    ckpt = sandbox / "ckpt"
    (ckpt / "assets").mkdir()
    (ckpt / "assets" / "a.txt").write_text("a")
    (ckpt / "empty").mkdir()
    os.symlink("assets", ckpt / "assets-link")
    os.symlink("tokenizer.json", ckpt / "tok-link.json")
    proc = cli(ckpt, "--layers", "1", "--out", sandbox / "out")
    assert proc.returncode == 0, proc.stderr
    out = sandbox / "out"
    assert os.readlink(out / "assets-link") == "assets"
    assert (out / "tok-link.json").read_text() == "{}" and not (out / "tok-link.json").is_symlink()
    assert (out / "empty").is_dir() and (out / "assets" / "a.txt").read_text() == "a"


FIFOS = ["model.safetensors.index.json", "config.json", "README.md", "model-00001-of-00002.safetensors",
         "tokenizer.json"]


@pytest.mark.parametrize("name", FIFOS)
def test_fifo_in_place_of_a_file_is_refused_without_hanging(sandbox, name):
    (sandbox / "ckpt" / name).unlink()
    os.mkfifo(sandbox / "ckpt" / name)
    refused_and_untouched(sandbox, [sandbox / "ckpt", "--layers", "1", "--out", sandbox / "out"], "FIFO")


def test_copy_keeps_private_modes(sandbox):
    ckpt = sandbox / "ckpt"
    for p in ckpt.iterdir():
        p.chmod(0o600)
    ckpt.chmod(0o700)
    proc = cli(ckpt, "--layers", "1", "--out", sandbox / "out")
    assert proc.returncode == 0, proc.stderr
    out = sandbox / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()} == \
        {p.name: "0o600" for p in out.iterdir()}


def test_in_place_keeps_modes(sandbox):
    ckpt = sandbox / "ckpt"
    for p in ckpt.iterdir():
        p.chmod(0o640)
    assert cli(ckpt, "--layers", "1", "--in-place").returncode == 0
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in ckpt.iterdir()} == {"0o640"}


# ------------------------------------------------------------------------------------------------------------------
# Sizes, counts, nesting, numbers

def _config(**fields):
    def make(box):
        cfg = json.loads((box / "ckpt" / "config.json").read_text())
        cfg.update(fields)
        (box / "ckpt" / "config.json").write_text(json.dumps(cfg))
    return make


def _write(name, data):
    def make(box):
        (box / "ckpt" / name).write_bytes(data)
    return make


BOUNDS = {
    "num_hidden_layers 10**9": (_config(num_hidden_layers=10 ** 9), ["1"], "holds only"),
    "num_hidden_layers 10**30": (_config(num_hidden_layers=10 ** 30), ["1"], "holds only"),
    "num_hidden_layers 0": (_config(num_hidden_layers=0), ["1"], "positive"),
    "--layers 0-1000000000": (None, ["0-1000000000"], "out of range"),
    "--layers 0-60000,0-60000": (None, ["0-60000,0-60000"], "out of range"),
    "--layers repeats": (None, ["1,2,1"], "repeat"),
    "--layers 60k repeats": (None, [",".join(["1"] * 60_000)], "repeat"),  # one argv string caps at 128 KiB
    "--layers 0-2000000": (None, ["0-2000000"], "out of range"),
    "--layers 1_0": (None, ["1_0"], "ASCII"),
    "--layers Arabic-Indic digit": (None, ["\u0661"], "ASCII"),
    "--layers backwards range": (None, ["3-1"], "backwards"),
    "index nested 100k deep": (_write("model.safetensors.index.json", b"[" * 100_000 + b"]" * 100_000), ["1"],
                               "nested"),
    "config nested 100 deep": (_write("config.json", b'{"a":' * 100 + b"1" + b"}" * 100), ["1"], "nested"),
    "index metadata is a string": (lambda box: (box / "ckpt" / "model.safetensors.index.json").write_text(
        json.dumps({**json.loads((box / "ckpt" / "model.safetensors.index.json").read_text()), "metadata": "x"})),
        ["1"], "metadata"),
    "README in Latin-1": (_write("README.md", "caf\xe9\n".encode("latin-1")), ["1"], "UTF-8"),
    "header with a UTF-8 BOM": (lambda box: _bom_header(box), ["1"], "byte-order mark"),
    "shape of a million dims": (lambda box: _safetensors(box / "ckpt" / "model-00002-of-00002.safetensors",
                                                         {"x": 0}, {"z": {"dtype": "F32", "shape": [0] * 1_000_000,
                                                                          "data_offsets": [0, 0]}}),
                                ["1"], "dimensions"),
}


def _bom_header(box):
    path = box / "ckpt" / "model-00001-of-00002.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = b"\xef\xbb\xbf" + raw[8:8 + n]
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])


@pytest.mark.parametrize("case", sorted(BOUNDS))
def test_oversized_or_malformed_input_is_refused_quickly(sandbox, case):
    make, layers, fragment = BOUNDS[case]
    if make:
        make(sandbox)
    refused_and_untouched(sandbox, [sandbox / "ckpt", "--layers", *layers, "--out", sandbox / "out"], fragment)


@pytest.mark.parametrize("names,fragment", [
    ([f"model.layers.{i:02d}" for i in range(LAYERS)], "zero-padded"),
    ([f"model.layers.{c}" for c in "\u0660\u0661\u0662\u0663"], "non-ASCII"),
])
def test_layer_numbers_must_be_plain_ascii(tmp_path, names, fragment):
    box = tmp_path / "sandbox"
    box.mkdir()
    make_checkpoint(box / "ckpt", names=names)
    refused_and_untouched(box, [box / "ckpt", "--layers", "1", "--out", box / "out"], fragment)


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest) across fork and exec.
_RSS_SCRIPT = """
import sys
from shortgpt_fast.surgery.checkpoint import SurgeryError, build_plan
try:
    build_plan(__import__("pathlib").Path(sys.argv[1]), [1])
except SurgeryError as e:
    print("refused:", str(e)[:200])
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) // 1024)
"""


def test_40mb_header_of_zeros_stays_in_bounded_memory(tmp_path):
    """A 40 MB header of `[0,0,...]` took 3.3 GB as a JSON tree; the schema-driven reader refuses it at the 65th
    dimension and the process stays near its import footprint."""
    ckpt = make_checkpoint(tmp_path / "ckpt", sharded=False)
    zeros = ",".join(["0"] * 20_000_000)
    raw = ('{"model.layers.0.mlp.weight":{"dtype":"F32","shape":[' + zeros + '],"data_offsets":[0,0]}}').encode()
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(ckpt)], capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert "refused:" in proc.stdout and "dimensions" in proc.stdout, proc.stdout + proc.stderr
    peak_mb = int(proc.stdout.strip().splitlines()[-1])
    assert peak_mb < 40 + 64, f"peak RSS {peak_mb} MB for a 40 MB header"  # the header itself + interpreter


# ------------------------------------------------------------------------------------------------------------------
# Exactly once: SIGKILL at every step, then the documented rerun

def _steps(box: Path) -> list[str]:
    work = box.parent / "count"
    shutil.copytree(box / "ckpt", work)
    seen = []
    surgery.after_step_hook = lambda k, what: seen.append(what)
    try:
        cut_checkpoint(work, [1, 2], in_place=True, **_NO_PROOF_KW)
    finally:
        surgery.after_step_hook = None
    return seen


def test_sigkill_at_every_step_then_rerun_cuts_exactly_once(sandbox):
    golden = sandbox.parent / "golden"
    assert cli(sandbox / "ckpt", "--layers", "1,2", "--out", golden).returncode == 0
    steps = _steps(sandbox)
    assert steps[-1] == "journal retired" and len(steps) >= 6, steps
    for k, what in enumerate(steps):
        work = sandbox.parent / f"kill{k}"
        shutil.copytree(sandbox / "ckpt", work)
        killed = cli(work, "--layers", "1,2", "--in-place", env={**ENV, "SHORTGPT_FAST_CUT_KILL_AFTER_STEP": str(k)})
        assert killed.returncode == -9, (what, killed.stderr[-500:])
        assert (work / JOURNAL_NAME).exists() == (what != "journal retired"), what
        rerun = cli(work, "--layers", "1,2", "--in-place")
        assert rerun.returncode == 0, (what, rerun.stderr)
        assert ("already done" in rerun.stdout) == (what == "journal retired"), (what, rerun.stdout)
        assert tree_hash(work) == tree_hash(golden), f"kill after {what!r} then rerun != one cut"
        again = cli(work, "--layers", "1,2", "--in-place")
        assert again.returncode == 0 and "already done" in again.stdout, again.stdout + again.stderr
        cuts = json.loads((work / "config.json").read_text())[CUT_RECORD_KEY]["cuts"]
        assert len(cuts) == 1 and cuts[0]["removed"] == [1, 2] and cuts[0]["num_layers"] == LAYERS
        assert tree_hash(work) == tree_hash(golden)


def test_killed_copy_leaves_staging_that_the_rerun_removes(sandbox):
    out = sandbox / "out"
    killed = cli(sandbox / "ckpt", "--layers", "1", "--out", out,
                 env={**ENV, "SHORTGPT_FAST_SURGERY_KILL_AFTER_WRITES": "1"})
    assert killed.returncode == -9
    leftovers = [p.name for p in sandbox.iterdir() if p.name.startswith(".out")]
    assert leftovers, "the kill should leave a staging folder for this test to mean anything"
    assert cli(sandbox / "ckpt", "--layers", "1", "--out", out).returncode == 0
    assert [p.name for p in sandbox.iterdir() if p.name.startswith(".out")] == []


def test_full_disk_cleans_up_and_names_the_file(sandbox):
    """RLIMIT_FSIZE stands in for a full disk (EFBIG instead of ENOSPC, same code path): the copy is refused with
    one line naming the file, and no staging folder or temp file stays behind."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))

    before = tree_hash(sandbox.parent)
    for args in ([sandbox / "ckpt", "--layers", "1", "--out", sandbox / "out"],
                 [sandbox / "ckpt", "--layers", "1", "--in-place"]):
        proc = subprocess.run([sys.executable, "-m", "shortgpt_fast", "cut", *map(str, args), *_NO_PROOF],
                              capture_output=True, text=True, timeout=60, env=ENV, preexec_fn=limit)
        line = assert_refused(proc, str(sandbox))
        assert "too large" in line.lower() or "space" in line.lower(), line
        assert tree_hash(sandbox.parent) == before, line
