"""Checkpoint surgery, the heavier tests: the real SmolLM2 checkpoint, SIGKILL at many seeded points,
more malformed/malicious checkpoints driven through the CLI, and a hypothesis fuzz of the C++ header parser."""
from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cut_checkpoint import (
    MALFORMED,
    _checkpoint_dir,
    _entry,
    _layer_tensors,
    _load_checked,  # noqa: F401
    _raw_safetensors,
    _single,
    _tree,
    _with,
    hand_sharded,  # noqa: F401  (a fixture, used by name)
)

from shortgpt_fast.cli import main as cli_main
from shortgpt_fast.surgery.checkpoint import JOURNAL_NAME, SurgeryError, cut_checkpoint

# Tests of the surgery engine itself; without the extension (SHORTGPT_FAST_SKIP_CPP=1, or off Linux) they skip.
_C = pytest.importorskip("shortgpt_fast._C", reason="the C++ extension is not built (SHORTGPT_FAST_SKIP_CPP=1?)",
                         exc_type=ImportError)
if not hasattr(_C, "safetensors_read_header"):
    pytest.skip("shortgpt_fast._C was built without checkpoint surgery (Linux only)", allow_module_level=True)

# ------------------------------------------------------------------------------------------------------------------
# The real model: the cached 3-shard SmolLM2 folder, cut in both modes and compared with in-memory pruning.

SMOL_REMOVE = [3, 11, 17, 25]


@pytest.mark.slow
def test_real_smollm2_cut_matches_in_memory_pruning(tmp_path):
    from transformers import AutoModelForCausalLM

    from shortgpt_fast.models.loading import resolve_model_path
    from shortgpt_fast.surgery.in_memory import prune_model

    cache = Path(resolve_model_path("smollm2-135m"))
    assert len(list(cache.glob("*.safetensors"))) >= 2, "the cached SmolLM2 is expected to be sharded"
    cache_before = _tree(cache)
    src = shutil.copytree(cache, tmp_path / "src")
    before = _tree(src)

    cut_checkpoint(src, SMOL_REMOVE, out=tmp_path / "copy", verify=True)
    assert _tree(src) == before, "copy mode modified the source"
    in_place = shutil.copytree(src, tmp_path / "inplace")
    cut_checkpoint(in_place, SMOL_REMOVE, in_place=True, verify=True)
    assert _tree(tmp_path / "copy") == _tree(in_place), "copy and in-place results differ"
    assert not (in_place / JOURNAL_NAME).exists()

    ids = torch.randint(0, 1000, (2, 13), generator=torch.Generator().manual_seed(3))
    reference = prune_model(AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval(), SMOL_REMOVE)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    del reference
    for result in (tmp_path / "copy", in_place):
        model, info = AutoModelForCausalLM.from_pretrained(result, torch_dtype=torch.float32,
                                                           output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        assert model.config.num_hidden_layers == 30 - len(SMOL_REMOVE)
        with torch.no_grad():
            assert torch.equal(model.eval()(input_ids=ids).logits, expected)
    assert _tree(cache) == cache_before, "the shared model cache was modified"


# ------------------------------------------------------------------------------------------------------------------
# Faults. Each in-place run is a fork of one long-lived worker that has imported everything but never written, so
# a kill costs milliseconds instead of a fresh interpreter, and the C++ write counter (read once per process) starts
# unset in every child. A scenario chains kills: a resumed run may itself be killed, then the same command finishes.

_FORK_WORKER = textwrap.dedent("""
    import json, os, random, signal, sys, time
    # Imported once before forking, so each forked cut proves its structure in-process (tenths of a second)
    # instead of starting a fresh interpreter for it; the crash-safety under test comes after the proof.
    import torch, transformers, shortgpt_fast.surgery.verify_structure
    from shortgpt_fast.surgery.checkpoint import cut_checkpoint

    WRITE, STEP = "SHORTGPT_FAST_SURGERY_KILL_AFTER_WRITES", "SHORTGPT_FAST_CUT_KILL_AFTER_STEP"

    def run(work, copy_method, kill):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                if kill and kill[0] in ("write", "step"):
                    os.environ[WRITE if kill[0] == "write" else STEP] = str(kill[1])
                cut_checkpoint(work, [1, 3], in_place=True, copy_method=copy_method)
            except BaseException as e:
                sys.stderr.write(f"{type(e).__name__}: {e}\\n")
                code = 3
            os._exit(code)
        if kill and kill[0] == "delay":
            time.sleep(kill[1])
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
        return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    scenarios = json.loads(sys.argv[1])
    out = []
    for s in scenarios:
        codes = []
        for kill in s["kills"] + [None]:
            codes.append(run(s["work"], s["copy_method"], kill))
            if codes[-1] != -9:  # finished (or failed): rerunning now would ask for a second, different cut
                break
        out.append(codes)
    print(json.dumps(out))
""")

WRITES_IN_FRESH_RUN = 3  # hand-sharded Llama, layers 1,3: two header rewrites and one compacted shard
STEPS_IN_FRESH_RUN = 9  # ... and the last one retires the journal after the cut is recorded in config.json


def _kill_scenarios(rng: random.Random, n: int, root: Path, src: Path) -> list[dict]:
    scenarios = []
    for i in range(n):
        # The first kill is drawn from points a fresh run is known to reach, so it must land; later ones hit a
        # resumed run that has less left to do and may finish first, which is also a valid interleaving.
        first = rng.choice([("write", rng.randrange(WRITES_IN_FRESH_RUN)), ("step", rng.randrange(STEPS_IN_FRESH_RUN))])
        kills = [first]
        for _ in range(rng.randrange(3)):
            kind = rng.choice(["write", "step", "delay"])
            kills.append((kind, rng.uniform(0, 0.02)) if kind == "delay" else
                         (kind, rng.randrange(WRITES_IN_FRESH_RUN if kind == "write" else STEPS_IN_FRESH_RUN)))
        work = shutil.copytree(src, root / f"kill{i}")
        scenarios.append({"work": str(work), "copy_method": rng.choice(["auto", "readwrite"]), "kills": kills})
    return scenarios


def test_sigkill_at_seeded_random_points_then_rerun_is_byte_identical(hand_sharded, tmp_path):
    src, golden = hand_sharded
    scenarios = _kill_scenarios(random.Random(20240604), 24, tmp_path, src)
    proc = subprocess.run([sys.executable, "-c", _FORK_WORKER, json.dumps(scenarios)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    golden_tree = _tree(golden)
    kills = 0
    for scenario, codes in zip(scenarios, results):
        label = f"kills {scenario['kills']} ({scenario['copy_method']})"
        assert codes[0] == -9, f"{label}: the first kill did not land, exit codes {codes}"
        assert all(c in (0, -9) for c in codes), f"{label}: a run failed instead of resuming: {codes} " \
                                                 f"{proc.stderr[-1000:]}"
        assert codes[-1] == 0, f"{label}: the final rerun did not finish: {codes}"
        kills += codes.count(-9)
        work = Path(scenario["work"])
        assert not (work / JOURNAL_NAME).exists(), label
        assert _tree(work) == golden_tree, f"{label}: result differs from copy mode's"
    assert kills >= 20, f"only {kills} kills landed"
    distinct = {tuple(k) for s in scenarios for k in s["kills"][:1]}
    assert len(distinct) >= 8, f"the seeded first-kill points cover only {sorted(distinct)}"


def test_fresh_run_reaches_every_seeded_kill_point(hand_sharded, tmp_path):
    # Guards the constants above: if the surgery does fewer writes/steps, "first kill must land" would silently
    # draw points past the end; if it does more, the kill points stop covering the tail.
    src, _ = hand_sharded
    scenarios = [{"work": str(shutil.copytree(src, tmp_path / name)), "copy_method": "auto", "kills": [kill]}
                 for name, kill in [("w", ("write", WRITES_IN_FRESH_RUN)), ("s", ("step", STEPS_IN_FRESH_RUN)),
                                    ("wl", ("write", WRITES_IN_FRESH_RUN - 1)),
                                    ("sl", ("step", STEPS_IN_FRESH_RUN - 1))]]
    proc = subprocess.run([sys.executable, "-c", _FORK_WORKER, json.dumps(scenarios)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [[0], [0], [-9, 0], [-9, 0]]


# ------------------------------------------------------------------------------------------------------------------
# Malformed and malicious checkpoints, added to the ones in test_checkpoint_surgery.MALFORMED.

def _last(entry):
    return _with(lambda h, d: ({**h, "model.layers.1.mlp.weight": entry}, d, None))


def _two_shards(edit):
    def make(d: Path):
        header, data = _layer_tensors()
        names = list(header)
        first, second = {k: header[k] for k in names[:2]}, {k: header[k] for k in names[2:]}
        second = {k: {**v, "data_offsets": [v["data_offsets"][0] - 16, v["data_offsets"][1] - 16]}
                  for k, v in second.items()}
        _raw_safetensors(d / "model-00001-of-00002.safetensors", json.dumps(first).encode(), data[:16])
        _raw_safetensors(d / "model-00002-of-00002.safetensors", json.dumps(second).encode(), data[16:])
        weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
        weight_map.update({k: "model-00002-of-00002.safetensors" for k in second})
        index = {"metadata": {}, "weight_map": weight_map}
        edit(index)
        (d / "model.safetensors.index.json").write_text(json.dumps(index) if isinstance(index, dict) else index)
    return make


def _index_text(text):
    def make(d: Path):
        _two_shards(lambda i: None)(d)
        (d / "model.safetensors.index.json").write_text(text)
    return make


def _swap_shards(index):
    wm = index["weight_map"]
    wm["model.embed_tokens.weight"], wm["model.layers.1.mlp.weight"] = (wm["model.layers.1.mlp.weight"],
                                                                        wm["model.embed_tokens.weight"])


_VALID = json.dumps(_layer_tensors()[0]).encode()

EXTRA_MALFORMED = {
    "NUL padding after the header": (_single(_VALID + b"\0" * 8, _layer_tensors()[1]), "invalid JSON"),
    "NUL inside a tensor name": (_single(_VALID[:-1] + b', "a\0b": ' + json.dumps(_entry(offsets=(24, 32))).encode()
                                         + b"}", _layer_tensors()[1] + b"\1" * 8), "invalid JSON"),
    "overlong UTF-8 in a tensor name": (_single(b'{"model.layers.0.\xc0\xaf": ' + json.dumps(_entry()).encode()
                                                + b"}", b"\1" * 8), "UTF-8"),
    "lone UTF-16 surrogate bytes": (_single(b'{"model.layers.0.\xed\xa0\x80": ' + json.dumps(_entry()).encode()
                                            + b"}", b"\1" * 8), "UTF-8"),
    "header is a JSON string": (_single(b'"model.layers.0.w"', b""), "not a JSON object"),
    "header length zero": (_single(b"", b"\1" * 8), "cannot hold a JSON object"),
    "header length 2**64-1": (_with(lambda h, d: (h, d, 2 ** 64 - 1)), "100 MB"),
    "offset past 2**64": (_last(_entry(offsets=(16, 2 ** 64))), "non-negative integers"),
    "offset end 2**64-1": (_last(_entry(offsets=(16, 2 ** 64 - 1))), "data section"),
    "offsets end before they begin": (_last(_entry(offsets=(24, 16))), "end before they begin"),
    "float offset": (_last(_entry(offsets=(16.0, 24))), "non-negative integers"),
    "three data_offsets": (_last({**_entry(), "data_offsets": [16, 20, 24]}), r"\[begin, end\]"),
    "shape with a negative dim": (_last(_entry(shape=(-2,), offsets=(16, 24))), "non-negative integers"),
    "shape with a fractional dim": (_last(_entry(shape=(2.5,), offsets=(16, 24))), "non-negative integers"),
    "shape product overflows": (_last(_entry(shape=(2 ** 62, 2 ** 62), offsets=(16, 24))), "overflows 64 bits"),
    "8-bit dtype size mismatch (U8)": (_last(_entry(dtype="U8", shape=(9,), offsets=(16, 24))), "needs 9 bytes"),
    "8-bit dtype size mismatch (F8_E4M3)": (_last(_entry(dtype="F8_E4M3", shape=(4,), offsets=(16, 24))),
                                            "needs 4 bytes"),
    "16-bit dtype size mismatch (BF16)": (_last(_entry(dtype="BF16", shape=(3,), offsets=(16, 24))), "needs 6 bytes"),
    "64-bit dtype size mismatch (F64)": (_last(_entry(dtype="F64", shape=(2,), offsets=(16, 24))), "needs 16 bytes"),
    "BOOL size mismatch": (_last(_entry(dtype="BOOL", shape=(7,), offsets=(16, 24))), "needs 7 bytes"),
    "4-bit dtype not filling a byte (F4)": (_last(_entry(dtype="F4", shape=(15,), offsets=(16, 24))),
                                            "whole bytes"),
    "dtype is a number": (_last({**_entry(offsets=(16, 24)), "dtype": 5}), "dtype is not a string"),
    "tensor entry is a number": (_last(7), "not an object"),
    "tensor entry lacks data_offsets": (_last({"dtype": "F32", "shape": [2]}), "needs dtype, shape and data_offsets"),
    "index swaps two tensors' shards": (_two_shards(_swap_shards), "disagrees"),
    "index names a missing second shard": (_two_shards(lambda i: i["weight_map"].update(
        {k: "model-00003-of-00003.safetensors" for k, v in i["weight_map"].items() if "00002" in v})),
        "does not exist"),
    "index is not JSON": (_index_text('{"weight_map": '), "JSON"),
    "index is a JSON array": (_index_text("[]"), "index"),
    "index weight_map is a list": (_index_text('{"metadata": {}, "weight_map": []}'), "weight_map"),
    "index names a directory": (_two_shards(lambda i: i["weight_map"].update({"model.layers.1.mlp.weight": "."})),
                                "not a plain file"),
    "index names a shard through a subfolder escape": (_two_shards(lambda i: i["weight_map"].update(
        {"model.layers.1.mlp.weight": "sub/../../bad/model-00002-of-00002.safetensors"})), "not a plain file"),
}


@pytest.mark.parametrize("case", sorted(EXTRA_MALFORMED))
def test_extra_malformed_checkpoint_is_refused_cleanly(tmp_path, case):
    make, message = EXTRA_MALFORMED[case]
    src = _checkpoint_dir(tmp_path)
    make(src)
    before = _tree(src)
    with pytest.raises(SurgeryError, match=message) as err:
        cut_checkpoint(src, [1], out=tmp_path / "out")
    assert "\n" not in str(err.value)
    assert _tree(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


ALL_MALFORMED = {**MALFORMED, **EXTRA_MALFORMED}


def test_malformed_case_count():
    assert len(ALL_MALFORMED) >= 30, len(ALL_MALFORMED)


@pytest.mark.parametrize("mode", ["copy", "in_place"])
@pytest.mark.parametrize("case", sorted(ALL_MALFORMED))
def test_malformed_checkpoint_through_cli_exits_2(tmp_path, capsys, case, mode):
    make, message = ALL_MALFORMED[case]
    src = _checkpoint_dir(tmp_path)
    make(src)
    before = _tree(src)
    others = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    argv = ["cut", str(src), "--layers", "1"] + (["--out", str(out)] if mode == "copy" else ["--in-place"])
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("shortgpt-fast: error: "), err
    assert _tree(src) == before
    # Copy mode may only ever create OUT_DIR; a refusal should not even leave that behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == others


# ------------------------------------------------------------------------------------------------------------------
# Fuzzing the C++ header parser in-process (a crash would take pytest down with it).

def _valid_file() -> bytes:
    header = {"__metadata__": {"format": "pt"},
              "model.embed_tokens.weight": _entry(dtype="BF16", shape=(2, 3), offsets=(0, 12)),
              "model.layers.0.w": _entry(dtype="F32", shape=(2,), offsets=(12, 20)),
              "model.layers.1.w": _entry(dtype="F4", shape=(4,), offsets=(20, 22)),
              "model.norm.weight": _entry(dtype="I64", shape=(1,), offsets=(22, 30))}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(range(30))


_BASE = _valid_file()
_JSON_TOKENS = [b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"-1", b"1e400", b"18446744073709551616", b"null",
                b"true", b"0.5", b"\xff", b"\0", b"\\u0000", b"\\ud800", b'"dtype"', b'"F16"', b'"shape"', b"[]",
                b'"data_offsets"', b'"__metadata__"', b"  "]


@st.composite
def _mutated(draw):
    data = bytearray(_BASE)
    header_len = struct.unpack("<Q", _BASE[:8])[0]
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "length", "insert", "delete", "extend"]))
        if not data:
            break
        if kind == "flip":
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data) - 1)):]
        elif kind == "length":
            new = draw(st.one_of(st.integers(0, header_len + 64), st.integers(0, 2 ** 64 - 1)))
            data[:8] = struct.pack("<Q", new)
        elif kind == "insert":
            # Edits inside the JSON text: these keep the header parseable often enough to reach validation.
            i = draw(st.integers(8, max(8, min(len(data), 8 + header_len))))
            data[i:i] = draw(st.sampled_from(_JSON_TOKENS))
        elif kind == "delete":
            i = draw(st.integers(0, len(data) - 1))
            del data[i:i + draw(st.integers(1, 16))]
        else:
            data += draw(st.binary(max_size=32))
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=_mutated())
def test_fuzz_header_parser_never_crashes(tmp_path, blob):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    try:
        h = _C.safetensors_read_header(str(path))
    except (ValueError, OSError) as e:
        assert str(e) and "\n" not in str(e)
        return
    # Whatever it accepted must actually be a valid file: the tensors tile the data section exactly.
    assert h["file_size"] == len(blob)
    assert h["data_start"] == 8 + h["header_len"] == 8 + struct.unpack("<Q", blob[:8])[0]
    json.loads(blob[8:h["data_start"]].decode("utf-8"))
    expected = 0
    for _name, _dtype, _shape, begin, end in h["tensors"]:
        assert begin == expected and end >= begin
        expected = end
    assert expected == h["file_size"] - h["data_start"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=12),
       data=st.binary(max_size=32))
def test_fuzz_header_parser_on_arbitrary_json(tmp_path, header, data):
    raw = json.dumps(header).encode()
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    try:
        h = _C.safetensors_read_header(str(path))
    except (ValueError, OSError) as e:
        assert str(e) and "\n" not in str(e)
        return
    assert isinstance(header, dict)
    assert sum(end - begin for *_, begin, end in h["tensors"]) == len(data)
