"""Cut whole layers out of a GGUF model (one file or a split set) without decoding a tensor.

The blocks `blk.{i}.*` of the removed layers go, the kept blocks are renumbered, every other tensor is carried byte
for byte (quantized blocks are never decoded or re-encoded), and the metadata llama.cpp reads per layer is rewritten
(surgery/gguf_metadata.py). The C++ engine (csrc/gguf/) parses and renders headers and moves the bytes with the
safetensors engine's file I/O, so memory stays at one header plus a fixed buffer whatever the model size, and the
cut path never imports torch.

Both modes write the same bytes:
- copy (`out=`): the source is only read; each output file is assembled under a temp name beside it (reflink or
  copy_file_range), fsynced and renamed into place.
- in place: the plan, every new header included, is fsynced to a journal beside the model before anything is
  touched. A file whose removed blocks are whole filesystem blocks is cut by collapse-range (the kept data never
  moves, cost independent of size); any other file is rebuilt under a temp name from the untouched source and
  renamed over it. Every step is idempotent, so rerunning the same command after a crash at any point finishes the
  cut, and the result is byte-identical to copy mode.

A record of the cut (`shortgpt_fast.cut`, JSON) is written into every output file; it also pads the header to its
old length where it fits, so the data section stays put and collapse-range applies.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from .. import _native
from ..errors import quote
from ..io.durable import fsync_dir
from ..io.gguf import SPLIT_TENSORS, STRING, GGUFError, GGUFHeader, read_set, split_parts
from ..models.config_surgery import ConfigSurgeryError, index_map, validate_layers
from . import untrusted
from .durable import _remove_stale
from .gguf_metadata import CUT_RECORD_KEY, MetadataEdit, plan_metadata
from .untrusted import SurgeryError

_C = _native.LazyExtension("GGUF cut", needs="gguf_read")

_BLOCK = re.compile(r"^blk\.([0-9]+)\.(.+)$", re.ASCII)
JOURNAL_VERSION = 1
_JOURNAL_SUFFIX = ".shortgpt-cut-journal.json"
_TMP_SUFFIX = ".shortgpt-cut-tmp"
_KILL_AFTER_STEP_ENV = "SHORTGPT_FAST_CUT_KILL_AFTER_STEP"
_HASH_CHUNK = 1 << 20


@dataclass
class PartPlan:
    """One file of the model: where its kept bytes go and how the in-place mode gets there."""

    source: str  # file name inside the model's folder
    header: bytes  # the new header, zero-padded to the alignment
    runs: list[tuple[int, int]]  # (source offset, length) of the kept data, in order
    holes: list[tuple[int, int]]  # in place by collapse: absolute [start, end) ranges to remove; [] = rebuild
    source_size: int
    final_size: int
    old_data_start: int
    old_header_sha256: str
    new_header_sha256: str

    def to_json(self) -> dict:
        return {"source": self.source, "header": base64.b64encode(self.header).decode("ascii"),
                "runs": [list(r) for r in self.runs], "holes": [list(h) for h in self.holes],
                "source_size": self.source_size, "final_size": self.final_size,
                "old_data_start": self.old_data_start, "old_header_sha256": self.old_header_sha256,
                "new_header_sha256": self.new_header_sha256}


@dataclass
class GGUFCutPlan:
    removed: list[int]
    num_layers: int  # trunk layers before the cut (MTP blocks not counted)
    mtp_layers: int
    parts: list[PartPlan]

    @property
    def mapping(self) -> dict[int, int]:
        return index_map(self.removed, self.num_layers, self.mtp_layers)


@dataclass
class GGUFCutResult:
    """What a GGUF cut did: removed layers (original numbering), old -> new block index, the output files."""

    removed: list[int]
    index_map: dict[int, int]
    outputs: list[Path]
    num_layers: int
    bytes_copied: int = 0
    seconds: float = 0.0
    in_place: bool = False
    method: str = "none"
    already_done: bool = False
    resumed: bool = False
    part_kinds: list[str] = field(default_factory=list)  # in place: "collapse" or "rebuild" per file


def _sha256_prefix(path: Path, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while length > 0:
            chunk = f.read(min(length, _HASH_CHUNK))
            if not chunk:
                break
            h.update(chunk)
            length -= len(chunk)
    return h.hexdigest()


def _parts(src: Path) -> list[Path]:
    try:
        return split_parts(src)
    except GGUFError as e:
        raise SurgeryError(str(e)) from None


def _layer_counts(header: GGUFHeader) -> tuple[str, int, int]:
    arch = header.architecture
    if arch is None:
        raise SurgeryError(f"{header.path}: general.architecture is missing or not a string; not a model GGUF")
    n_all = header.get(f"{arch}.block_count")
    if not isinstance(n_all, int) or isinstance(n_all, bool) or n_all <= 0:
        raise SurgeryError(f"{header.path}: {arch}.block_count is missing or not a positive integer")
    mtp = header.get(f"{arch}.nextn_predict_layers", 0)
    if not isinstance(mtp, int) or isinstance(mtp, bool) or not 0 <= mtp < n_all:
        raise SurgeryError(f"{header.path}: {arch}.nextn_predict_layers={quote(mtp)} does not fit block_count {n_all}")
    return arch, n_all, n_all - mtp


def _block_sets(headers: Sequence[GGUFHeader], n_all: int) -> dict[int, set]:
    """Per block index, its tensors as (suffix, ggml type, dims); SurgeryError for block numbers out of range."""
    blocks: dict[int, set] = {}
    for h in headers:
        untrusted.check_tensor_names([t.name for t in h.tensors], h.path)
        for t in h.tensors:
            m = _BLOCK.match(t.name)
            if m is None:
                continue
            i = int(m.group(1))
            if i >= n_all:
                raise SurgeryError(f"{h.path}: tensor {quote(t.name)} belongs to block {i} but block_count is {n_all}")
            blocks.setdefault(i, set()).add((m.group(2), t.ggml_type, t.dims))
    return blocks


def _previous_cuts(header: GGUFHeader) -> list:
    raw = header.get(CUT_RECORD_KEY)
    try:
        cuts = json.loads(raw)["cuts"] if isinstance(raw, str) else []
    except (ValueError, KeyError, TypeError):
        cuts = []
    return cuts if isinstance(cuts, list) else []


def _record(cuts: list, pad: int) -> bytes:
    text = json.dumps({"cuts": cuts}, separators=(",", ":")) + " " * pad
    return _C.gguf_encode_record(CUT_RECORD_KEY, STRING, 0, text)


def _tensor_info_size(name: str, ndims: int) -> int:
    return 8 + len(name.encode("utf-8")) + 4 + 8 * ndims + 4 + 8


def _plan_part(h: GGUFHeader, raw_header: bytes, metadata, gone: set, mapping: dict, cuts: list,
               total_tensors: int, split: bool) -> PartPlan:
    records: list[bytes] = []
    for kv in h.kvs.values():
        if kv.key == CUT_RECORD_KEY:
            continue  # rewritten last, with this cut appended
        if split and kv.key == SPLIT_TENSORS:
            records.append(_C.gguf_encode_record(kv.key, kv.type, 0, total_tensors))
        elif kv.key in metadata.replace:
            new = metadata.replace[kv.key]
            if new is not None:
                records.append(_C.gguf_encode_record(kv.key, *new))
        else:
            records.append(raw_header[kv.record[0]:kv.record[1]])  # carried byte for byte
    for key in sorted(metadata.add):
        records.append(_C.gguf_encode_record(key, *metadata.add[key]))

    tensors, runs, holes = [], [], []
    offset = 0
    for t in h.tensors:
        start, length = h.data_start + t.offset, h.padded(t.nbytes)
        m = _BLOCK.match(t.name)
        if m is not None and int(m.group(1)) in gone:
            if holes and holes[-1][1] == start:
                holes[-1] = (holes[-1][0], start + length)
            else:
                holes.append((start, start + length))
            continue
        name = t.name if m is None else f"blk.{mapping[int(m.group(1))]}.{m.group(2)}"
        tensors.append((name, list(t.dims), t.ggml_type, offset))
        runs.append((start, length))
        offset += length

    # The record pads the header to its old length where it fits, so the data section stays where it is.
    unpadded = 24 + sum(map(len, records)) + len(_record(cuts, 0)) + \
        sum(_tensor_info_size(n, len(d)) for n, d, _, _ in tensors)
    pad = h.data_start - unpadded if h.tensors and unpadded <= h.data_start else 0
    records.append(_record(cuts, pad))
    header = _C.gguf_render_header(h.version, records, tensors, h.alignment)
    final_size = len(header) + offset
    in_place_holes = holes if len(header) == h.data_start else []
    return PartPlan(source=h.path.name, header=header, runs=runs, holes=in_place_holes, source_size=h.file_size,
                    final_size=final_size, old_data_start=h.data_start,
                    old_header_sha256=hashlib.sha256(raw_header[:h.data_start]).hexdigest(),
                    new_header_sha256=hashlib.sha256(header).hexdigest())


def build_plan(src: Union[str, os.PathLike], layers: Union[str, Iterable[int]],
               chosen_by: str = "manual") -> tuple[GGUFCutPlan, list[GGUFHeader]]:
    """Plan the cut of `layers` (original numbering, as parse_layers reads them) out of the GGUF model at `src`.

    Reads headers only. Returns the plan and the source headers; SurgeryError (one line) for a malformed file or
    split set, a layer request that does not fit, an MTP block requested, or metadata llama.cpp would misread."""
    try:
        headers = read_set(src)
    except GGUFError as e:
        raise SurgeryError(str(e)) from None
    first = headers[0]
    arch, n_all, n_trunk = _layer_counts(first)
    try:
        removed = validate_layers(untrusted.parse_layers(layers, n_trunk), n_trunk)
    except ConfigSurgeryError as e:
        raise SurgeryError(f"{first.path}: {e}") from None
    blocks = _block_sets(headers, n_all)
    empty = [i for i in range(n_all) if i not in blocks]
    if empty:
        raise SurgeryError(f"{first.path}: blocks {empty[:8]} have no tensors; the file does not hold the "
                           f"{n_all} blocks its {arch}.block_count says")
    gone = set(removed)
    mapping = index_map(removed, n_trunk, n_all - n_trunk)
    total = sum(len(h.tensors) for h in headers) - sum(
        1 for h in headers for t in h.tensors if (m := _BLOCK.match(t.name)) and int(m.group(1)) in gone)
    cuts = _previous_cuts(first) + [{"removed": removed, "num_layers": n_trunk, "chosen_by": chosen_by}]
    split = len(headers) > 1 or SPLIT_TENSORS in first.kvs
    parts = []
    for h in headers:
        # Parts after the first of a split set usually hold only split.* keys and tensors.
        metadata = plan_metadata(h, arch, n_all, n_trunk, removed) if f"{arch}.block_count" in h.kvs else \
            MetadataEdit(replace={}, add={})
        with open(h.path, "rb") as f:
            raw = f.read(h.data_start)
        parts.append(_plan_part(h, raw, metadata, gone, mapping, cuts, total, split))
    return GGUFCutPlan(removed=removed, num_layers=n_trunk, mtp_layers=n_all - n_trunk, parts=parts), headers


def check_result(before: Sequence[GGUFHeader], after: Sequence[GGUFHeader], plan: GGUFCutPlan) -> None:
    """Prove the written files hold the original model minus the removed blocks: every kept block has exactly the
    tensors (names, types, shapes) it had under its old number, and every tensor outside the blocks is unchanged.
    Raises SurgeryError naming the first difference."""
    n_all = plan.num_layers + plan.mtp_layers
    old_blocks, new_blocks = _block_sets(before, n_all), _block_sets(after, n_all - len(plan.removed))
    for old, new in plan.mapping.items():
        if old_blocks.get(old) != new_blocks.get(new):
            raise SurgeryError(f"{after[0].path}: block {new} does not hold the tensors of original block {old}")
    if len(new_blocks) != n_all - len(plan.removed):
        raise SurgeryError(f"{after[0].path}: holds {len(new_blocks)} blocks, expected {n_all - len(plan.removed)}")

    def others(headers):
        return {(t.name, t.ggml_type, t.dims) for h in headers for t in h.tensors if not _BLOCK.match(t.name)}

    if others(before) != others(after):
        raise SurgeryError(f"{after[0].path}: the tensors outside the blocks differ from the source's")


def _write_part(src_dir: Path, part: PartPlan, dst: Path, method: str) -> tuple[int, str]:
    """dst := the part's new header + kept data, through a temp file renamed into place after fsync."""
    tmp = dst.with_name(f".{dst.name}{_TMP_SUFFIX}")
    _remove_stale(tmp)
    mode = stat.S_IMODE(os.stat(src_dir / part.source).st_mode)
    try:
        copied, used = _C.write_file(str(src_dir / part.source), str(tmp), part.header, part.runs,
                                     allow_clone=False, method=method, fsync=True, mode=mode)
        os.replace(tmp, dst)
    except OSError as e:
        _remove_stale(tmp)
        raise SurgeryError(untrusted.os_error_message(e, dst, needed=part.final_size)) from None
    fsync_dir(dst.parent)
    return copied, used


def _output_names(plan: GGUFCutPlan, out: Path) -> list[Path]:
    n = len(plan.parts)
    if n == 1:
        return [out]
    m = re.match(r"^(?P<base>.+)-00001-of-(?P<count>[0-9]{5})\.gguf$", out.name)
    if m and int(m.group("count")) == n:
        base = m.group("base")
    else:
        base = out.name[:-5] if out.name.endswith(".gguf") else out.name
    return [out.with_name(f"{base}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]


def _cut_copy(src_dir: Path, plan: GGUFCutPlan, outputs: list[Path], method: str) -> tuple[int, str]:
    for dst in outputs:
        if os.path.lexists(dst):
            raise SurgeryError(f"{dst} already exists; choose a new output name (a cut never overwrites a file)")
        if dst.resolve().parent == src_dir.resolve() and dst.name in {p.source for p in plan.parts}:
            raise SurgeryError(f"{dst} is the source; use --in-place to edit it")
    copied, used = 0, "none"
    written: list[Path] = []
    try:
        for part, dst in zip(plan.parts, outputs):
            c, used = _write_part(src_dir, part, dst, method)
            copied += c
            written.append(dst)
    except BaseException:
        for dst in written:  # a failed split set leaves no partial set under the requested names
            dst.unlink(missing_ok=True)
        raise
    return copied, used


# ----------------------------------------------------------------------------------------------------------------
# In place


def _step_done(step: int, what: str) -> None:
    """Crash-test hook shared with the safetensors cut: SIGKILL after step k when the env variable says so."""
    limit = os.environ.get(_KILL_AFTER_STEP_ENV)
    if limit is not None and step >= int(limit):
        os.kill(os.getpid(), 9)


def _journal_path(src_dir: Path, plan_or_first: str) -> Path:
    return src_dir / f".{plan_or_first}{_JOURNAL_SUFFIX}"


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _plan_json(plan: GGUFCutPlan) -> dict:
    return {"removed": plan.removed, "num_layers": plan.num_layers, "mtp_layers": plan.mtp_layers,
            "parts": [p.to_json() for p in plan.parts]}


def _journal_document(src_dir: Path, plan: GGUFCutPlan) -> bytes:
    body = _plan_json(plan)
    folder = os.stat(src_dir)
    digest = hashlib.sha256(_canonical(body)).hexdigest()
    return json.dumps({"version": JOURNAL_VERSION, "run_id": secrets.token_hex(16),
                       "folder": {"dev": folder.st_dev, "ino": folder.st_ino}, "plan_sha256": digest,
                       "body_sha256": digest, "plan": body}).encode()


def _uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _pairs(v) -> bool:
    return isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 and all(map(_uint, p)) for p in v)


def _read_journal(src_dir: Path, path: Path) -> GGUFCutPlan:
    """The pending plan, only if this tool wrote it for this folder; the journal is untrusted like the model."""
    def refuse(why: str) -> SurgeryError:
        return SurgeryError(f"{path} is not a GGUF cut journal this tool wrote for {src_dir}: {why}. If you did not "
                            "start an in-place cut here, delete that file; otherwise restore the model from the original")

    if os.path.islink(path):
        raise refuse("it is a symlink")
    try:
        doc = untrusted.load_json(path, src_dir, untrusted.MAX_JOURNAL_BYTES, "journal")
        untrusted.validate_journal_envelope(doc, JOURNAL_VERSION, os.stat(src_dir))
        body = doc["plan"]
        if hashlib.sha256(_canonical(body)).hexdigest() != doc["body_sha256"] or doc["body_sha256"] != \
                doc["plan_sha256"]:
            raise untrusted.JournalError("its plan does not match its checksum (edited or torn)")
        if not (isinstance(body, dict) and set(body) == {"removed", "num_layers", "mtp_layers", "parts"} and
                isinstance(body["removed"], list) and all(map(_uint, body["removed"])) and
                _uint(body["num_layers"]) and _uint(body["mtp_layers"]) and isinstance(body["parts"], list)):
            raise untrusted.JournalError("its plan does not have the expected fields")
        parts = []
        for p in body["parts"]:
            keys = {"source", "header", "runs", "holes", "source_size", "final_size", "old_data_start",
                    "old_header_sha256", "new_header_sha256"}
            if not (isinstance(p, dict) and set(p) == keys and isinstance(p["source"], str) and
                    p["source"].endswith(".gguf") and "/" not in p["source"] and not p["source"].startswith(".") and
                    _pairs(p["runs"]) and _pairs(p["holes"]) and
                    all(_uint(p[k]) for k in ("source_size", "final_size", "old_data_start"))):
                raise untrusted.JournalError("a part of its plan is malformed")
            header = base64.b64decode(p["header"], validate=True)
            if hashlib.sha256(header).hexdigest() != p["new_header_sha256"]:
                raise untrusted.JournalError("a header in it does not match its checksum")
            parts.append(PartPlan(p["source"], header, [tuple(r) for r in p["runs"]], [tuple(h) for h in p["holes"]],
                                  p["source_size"], p["final_size"], p["old_data_start"], p["old_header_sha256"],
                                  p["new_header_sha256"]))
    except (untrusted.JournalError, ValueError, TypeError) as e:
        raise refuse(str(e)) from None
    return GGUFCutPlan(removed=body["removed"], num_layers=body["num_layers"], mtp_layers=body["mtp_layers"],
                       parts=parts)


def _finished(path: Path, part: PartPlan) -> bool:
    return path.stat().st_size == part.final_size and \
        _sha256_prefix(path, len(part.header)) == part.new_header_sha256


def _apply_part(src_dir: Path, part: PartPlan, method: str) -> int:
    path = src_dir / part.source
    if _finished(path, part):
        return 0
    if part.holes:
        # The old header stays intact until every range is gone, so it still proves the file is ours to cut; a torn
        # header write leaves the file at its final size, where the header is simply written again.
        if path.stat().st_size != part.final_size and \
                _sha256_prefix(path, part.old_data_start) != part.old_header_sha256:
            raise SurgeryError(f"{path} no longer matches the header its cut journal recorded; it was changed outside "
                               "the cut. Restore it from the original download")
        try:
            _C.remove_ranges(str(path), [tuple(h) for h in part.holes], part.source_size)
            # Same length as the old header (the plan chose collapse only then), so the data stays where it is.
            _C.overwrite_prefix(str(path), part.header, part.old_data_start)
        except (ValueError, OSError) as e:
            raise SurgeryError(f"{e}; rerun the same command to finish the cut") from None
        return 0
    if _sha256_prefix(path, part.old_data_start) != part.old_header_sha256 or \
            path.stat().st_size != part.source_size:
        raise SurgeryError(f"{path} matches neither its original header nor the cut result recorded in the journal; "
                           "it was changed outside the cut. Restore it from the original download")
    copied, _ = _write_part(src_dir, part, path, method)
    return copied


def _already_done(headers_path: Path, layers) -> Optional[dict]:
    try:
        headers = read_set(headers_path)
    except GGUFError:
        return None
    cuts = _previous_cuts(headers[0])
    if not cuts or not isinstance(cuts[-1], dict):
        return None
    last = cuts[-1]
    try:
        arch, n_all, n_trunk = _layer_counts(headers[0])
        removed = sorted(untrusted.parse_layers(layers, last["num_layers"]))
    except (SurgeryError, KeyError, TypeError):
        return None
    if removed != last.get("removed") or n_trunk != last["num_layers"] - len(removed):
        return None
    return last


def _cut_in_place(src: Path, layers, method: str, chosen_by: str) -> tuple[Optional[GGUFCutPlan], int, bool,
                                                                            list[str], Optional[list]]:
    """(plan, bytes copied, resumed, per-part kind, source headers when this run planned the cut); plan is None
    when the files already hold this cut."""
    src_dir = src.parent
    first = _parts(src)[0]
    journal = _journal_path(src_dir, first.name)
    resumed = os.path.lexists(journal)
    before = None
    if resumed:
        plan = _read_journal(src_dir, journal)
        requested = sorted(untrusted.parse_layers(layers, plan.num_layers))
        if requested != plan.removed:
            raise SurgeryError(f"an interrupted in-place cut of layers {plan.removed} is pending on {first}; rerun "
                               f"with --layers {','.join(map(str, plan.removed))} --in-place to finish it first")
    else:
        if _already_done(src, layers) is not None:
            return None, 0, False, [], None
        plan, before = build_plan(src, layers, chosen_by)
        for part in plan.parts:
            st = os.lstat(src_dir / part.source)
            if st.st_nlink > 1:
                raise SurgeryError(f"{src_dir / part.source} has {st.st_nlink} hard links; cutting it in place would "
                                   "change the other names too. Use --out, or break the link with cp first")
        if method == "auto" and any(p.holes for p in plan.parts):
            supported, block = _C.collapse_range_support(str(src_dir))
            for part in plan.parts:
                if not supported or any((e - s) % block for s, e in part.holes if e != part.source_size):
                    part.holes = []
        else:
            for part in plan.parts:
                part.holes = []
        doc = _journal_document(src_dir, plan)
        tmp = journal.with_name(journal.name + _TMP_SUFFIX)
        _remove_stale(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, doc)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, journal)
        fsync_dir(src_dir)
    step = 0
    _step_done(step, "journal written")
    copied = 0
    for part in plan.parts:
        copied += _apply_part(src_dir, part, method)
        step += 1
        _step_done(step, f"part {part.source}")
    os.unlink(journal)
    fsync_dir(src_dir)
    return plan, copied, resumed, ["collapse" if p.holes else "rebuild" for p in plan.parts], before


def cut_gguf(
    src: Union[str, os.PathLike],
    layers: Union[str, Sequence[int]],
    out: Union[str, os.PathLike, None] = None,
    in_place: bool = False,
    copy_method: str = "auto",
    chosen_by: str = "manual",
    check: bool = True,
) -> GGUFCutResult:
    """Remove whole layers from a GGUF model without decoding a tensor.

    Args:
        src: a .gguf file, or any part of a split set (NAME-0000k-of-0000N.gguf; every part must be beside it).
        layers: trunk layer indices to remove (original numbering), ints or a string like "21,22,25" or "21-25".
            MTP blocks (after the last layer) are never removed; they are renumbered after the kept layers.
        out: copy mode: the output file (for a split set, the first part's name or a base name; the parts are
            named NAME-0000k-of-0000N.gguf). The source is only read.
        in_place: edit `src` crash-safely instead (rerun the same command after a crash). Exactly one of out /
            in_place.
        copy_method: "auto" (copy_file_range; in place, collapse-range where it applies), "copy_file_range"
            (in place always rebuilds) or "readwrite" (plain reads and writes; in place always rebuilds).
        chosen_by: what picked the layers (e.g. "bi"), recorded in the file's shortgpt_fast.cut record.
        check: re-read the written headers and prove every kept block holds exactly its old tensors.

    Returns:
        GGUFCutResult: removed layers, old -> new block index, output paths, bytes copied, timing.

    Raises:
        SurgeryError: one line, for malformed files or split sets, bad layer requests, metadata llama.cpp would
            misread after the cut (gguf_metadata.py), existing outputs, or I/O failures.
    """
    start = time.perf_counter()
    src = Path(src)
    if (out is None) == (not in_place):
        raise SurgeryError("pass exactly one of --out OUT.gguf (copy) or --in-place")
    if copy_method not in ("auto", "copy_file_range", "readwrite"):
        raise SurgeryError(f"copy_method must be auto, copy_file_range or readwrite, not {copy_method!r}")
    if src.is_symlink() or not src.is_file():
        raise SurgeryError(f"{src} is not a regular .gguf file (a missing path, a folder or a symlink)")
    if in_place:
        plan, copied, resumed, kinds, before = _cut_in_place(src, layers, copy_method, chosen_by)
        outputs = _parts(src)
        if plan is None:
            last = _already_done(src, layers)
            mapping = index_map(last["removed"], last["num_layers"])
            return GGUFCutResult(removed=last["removed"], index_map=mapping, outputs=outputs,
                                 num_layers=last["num_layers"], seconds=time.perf_counter() - start, in_place=True,
                                 already_done=True)
        method = "collapse" if all(k == "collapse" for k in kinds) else f"rebuild ({copy_method})"
    else:
        first = _parts(src)[0]
        if os.path.lexists(_journal_path(src.parent, first.name)):
            raise SurgeryError(f"{first} is in the middle of an interrupted in-place cut; rerun that command with "
                               "--in-place to finish it before copying")
        plan, before = build_plan(src, layers, chosen_by)
        outputs = _output_names(plan, Path(out))
        copied, method = _cut_copy(src.parent, plan, outputs, copy_method)
        resumed, kinds = False, []
    if check and before is not None:
        try:
            after = read_set(outputs[0])
        except GGUFError as e:
            raise SurgeryError(f"the cut wrote an unreadable file: {e}") from None
        check_result(before, after, plan)
    return GGUFCutResult(removed=plan.removed, index_map=plan.mapping, outputs=outputs, num_layers=plan.num_layers,
                         bytes_copied=copied, seconds=time.perf_counter() - start, in_place=in_place, method=method,
                         resumed=resumed, part_kinds=kinds)


__all__ = ["GGUFCutPlan", "GGUFCutResult", "build_plan", "check_result", "cut_gguf"]
