"""Cut whole layers out of a safetensors checkpoint folder without loading the model.

Python plans (which tensors survive, their new names, shard names, index, config, model card); the C++ engine in
csrc/safetensors_surgery.cpp validates every header and moves the bytes. Memory stays at the largest header plus a
fixed copy buffer, whatever the model's size.

Two modes:
- copy (`out=`): the source is only read; the result is assembled in a hidden folder beside OUT_DIR and renamed into
  place at the end, so an error never leaves a half-written OUT_DIR.
- in place: a journal holding the whole plan is fsynced before anything is touched, and every step can be replayed,
  so rerunning the same command after a crash at any point finishes the job. See docs/surgery.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

from shortgpt_fast import _native
from shortgpt_fast.errors import one_line
from shortgpt_fast.io.safetensors import INDEX_NAME, SINGLE_FILE_NAME, read_header
from shortgpt_fast.models.architectures import ArchitectureError, checkpoint_layer_prefix, renamed_tensor
from shortgpt_fast.models.config_surgery import (
    LAYER_COUNT_KEYS,
    ConfigSurgeryError,
    index_map,
    layer_count,
    mtp_layer_count,
    prune_config_dict,
    validate_layers,
)
from shortgpt_fast.surgery import untrusted
from shortgpt_fast.surgery.model_card import removal_section, with_removal
from shortgpt_fast.surgery.untrusted import SurgeryError, quote

# Loaded on first use, so `cut` without the extension (or off Linux) fails with one line saying how to get it.
_C = _native.LazyExtension("checkpoint surgery (cut)", needs=_native.SURGERY_SYMBOL)

CONFIG_NAME = "config.json"
MODEL_CARD_NAME = "README.md"
JOURNAL_NAME = ".shortgpt-cut-journal.json"
# Version 2 binds the journal to its folder and run (docs/security.md); a version-1 journal is refused.
JOURNAL_VERSION = 2
# config.json key recording every cut applied to the folder; a rerun after the journal is gone finds its own cut here
# and reports it done instead of cutting a second time. A dict, not a list: a list as long as the layer count would
# be sliced as a per-layer field by config surgery.
CUT_RECORD_KEY = "shortgpt_fast_cut"
_TMP_SUFFIX = ".cut-tmp"
# Copy mode assembles OUT_DIR in `.<OUT_DIR name><suffix>` beside it; the fixed name lets a rerun after a kill find
# and remove its own leftovers (an owner file inside proves they are ours).
_STAGING_SUFFIX = ".shortgpt-cut-staging"
_STAGING_OWNER = ".shortgpt-cut-staging-owner.json"
_HASH_CHUNK = 8 << 20

# Crash-injection points for tests: called after each completed in-place step with (step number, description).
# The environment variable makes a subprocess SIGKILL itself after step k, which no `finally` can soften.
after_step_hook: Optional[Callable[[int, str], None]] = None
_KILL_AFTER_STEP_ENV = "SHORTGPT_FAST_CUT_KILL_AFTER_STEP"


@dataclass
class CutResult:
    """What `cut_checkpoint` did: removed layers (list[int]), index_map old -> new layer index (dict[int, int]), the
    output folder (Path), bytes_copied and shards_written (int), seconds (float), whether it ran in place, the
    copy_method used, and whether the result was verified or resumed from a journal.

    already_done: in place, the folder already held this exact cut, so nothing was written. num_layers: decoder
    layers before the cut. Plain data; constructing it raises nothing.
    """

    removed: list[int]
    index_map: dict[int, int]
    output: Path
    bytes_copied: int
    shards_written: int
    seconds: float
    in_place: bool
    copy_method: str
    verified: bool = False
    resumed: bool = False
    # In place: the folder already records this exact cut (a rerun after the run that made it was killed late).
    already_done: bool = False
    # Decoder layers before the cut. index_map may hold more entries: MTP layers stored after the stack move too.
    num_layers: int = 0


@dataclass
class ShardPlan:
    """What the cut does to one .safetensors shard: source and target file names (target None: the file is dropped),
    kind ("header", "compact", "drop" or "collapse"), the new header text, the kept byte runs [offset, length], the
    header hashes that let a resumed in-place cut tell which steps already happened, and the final size.

    Plain data, serialised into the in-place journal via Plan.to_json; constructing it raises nothing.
    """

    source: str
    target: Optional[str]  # None: every tensor in it was removed, the file goes away
    # "header": only names change and the header still fits, so the data stays where it is.
    # "compact": tensors were dropped (or the header grew), so the kept bytes are written to a new file.
    # "drop": nothing kept.
    # "collapse": as compact, but in place: the dropped byte ranges are cut out of the file itself.
    kind: str
    header: str = ""
    old_header_len: int = 0
    runs: list[list[int]] = field(default_factory=list)  # [source offset, length] in output order
    old_header_sha256: str = ""
    new_header_sha256: str = ""
    final_size: int = 0
    # In-place only, kind "collapse": [start, end) byte ranges of dropped data that the filesystem removes from the
    # file (collapse-range), so the kept bytes never move; source_size is the file's size before any removal.
    holes: list[list[int]] = field(default_factory=list)
    source_size: int = 0


@dataclass
class Plan:
    """Everything a cut will write, computed by `build_plan` before any byte moves: removed layers, the old -> new
    layer mapping, one ShardPlan per shard, the new index, config.json and model card texts, kept_bytes, and the
    cut_id (sha256) recorded in the result's config.json.

    `to_json()` gives a JSON-ready dict for the in-place journal; `Plan.from_json(d)` rebuilds it (KeyError/TypeError
    on a malformed dict, which is why the journal is validated with untrusted.validate_plan_dict first).
    """

    removed: list[int]
    num_layers: int
    prefix: str
    mapping: dict[int, int]
    sharded: bool
    shards: list[ShardPlan]
    index_text: Optional[str]
    config_text: str
    model_card_text: str
    kept_bytes: int
    # new tensor name -> (target shard, sha256 of its bytes in the source); filled only when verifying.
    tensor_digests: Optional[dict[str, list[str]]] = None
    # (source shard, source name, target shard, new name, source byte offset, length) for every kept tensor.
    kept_tensors: list[tuple] = field(default_factory=list)
    # sha256 naming this cut of this source (its headers, its config, the removed layers); recorded in the result's
    # config.json, identical in copy and in-place mode.
    cut_id: str = ""

    _FIELDS = ("removed", "num_layers", "prefix", "mapping", "sharded", "shards", "index_text", "config_text",
               "model_card_text", "kept_bytes", "tensor_digests", "kept_tensors", "cut_id")

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in ("removed", "num_layers", "prefix", "sharded", "index_text", "config_text",
                                           "model_card_text", "kept_bytes", "tensor_digests", "kept_tensors",
                                           "cut_id")}
        d["mapping"] = {str(k): v for k, v in self.mapping.items()}
        d["shards"] = [vars(s) for s in self.shards]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        d = dict(d)
        d["mapping"] = {int(k): v for k, v in d["mapping"].items()}
        d["shards"] = [ShardPlan(**s) for s in d["shards"]]
        d["kept_tensors"] = [tuple(t) for t in d["kept_tensors"]]
        return cls(**d)


# ----------------------------------------------------------------------------------------------------------------
# Reading and validating the source


def _read_header(path: Path, root: Optional[Path] = None) -> dict:
    # The C++ reader opens with O_NOFOLLOW, so links are vetted (and resolved) here first.
    real = untrusted.check_link(path, root if root is not None else path.parent)
    try:
        return read_header(real, engine="native")
    except _native.NativeExtensionError:
        raise
    except (ValueError, OSError) as e:
        message = str(e).replace(real, str(path)) if real != str(path) else str(e)
        raise SurgeryError(f"{message}; the checkpoint file is damaged, re-download or re-save it") from None


def _header_region_sha256(path: Path, header_len: int) -> str:
    with os.fdopen(untrusted.open_regular(path, path.parent, "shard"), "rb") as f:
        return hashlib.sha256(f.read(8 + header_len)).hexdigest()


def _check_link(path: Path, root: Path) -> None:
    """Refuse files that resolve outside the checkpoint folder: carrying them would copy (or edit) foreign data.

    The one exception is the Hugging Face cache layout, where snapshots/<rev>/x links to ../../blobs/<hash>.
    """
    untrusted.check_link(path, root)


def _shard_path(src: Path, name: object, tensor: str) -> Path:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise SurgeryError(
            f"{src / INDEX_NAME}: tensor '{tensor}' maps to {name!r}, which is not a plain file name in {src}; "
            "fix the index so every shard lies inside the checkpoint folder"
        )
    return src / name


def _load_json(path: Path, root: Optional[Path] = None, limit: int = untrusted.MAX_SMALL_FILE_BYTES,
               what: str = "file") -> dict:
    return untrusted.load_json(path, root if root is not None else path.parent, limit, what)


def _discover(src: Path) -> tuple[bool, Optional[dict], list[str]]:
    """(sharded, index dict, shard file names sorted)."""
    if not src.is_dir():
        raise SurgeryError(f"{src} is not a directory; pass the checkpoint folder that holds config.json")
    index_path = src / INDEX_NAME
    if os.path.lexists(index_path):
        index = _load_json(index_path, src, what="index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise SurgeryError(f"{index_path}: no weight_map; restore the index from the original checkpoint")
        if not isinstance(index.get("metadata", {}), dict):
            raise SurgeryError(f"{index_path}: 'metadata' is a {type(index['metadata']).__name__}, not an object; "
                               "restore the index from the original checkpoint")
        names = set()
        for tensor, shard in weight_map.items():
            path = _shard_path(src, shard, tensor)
            if shard not in names and not os.path.lexists(path):
                raise SurgeryError(f"{index_path}: tensor {quote(tensor)} is in {shard}, which does not exist in "
                                   f"{src}; the download is incomplete")
            names.add(shard)
        return True, index, sorted(names)
    if os.path.lexists(src / SINGLE_FILE_NAME):
        return False, None, [SINGLE_FILE_NAME]
    raise SurgeryError(
        f"{src} has neither {INDEX_NAME} nor {SINGLE_FILE_NAME}; the cut works on safetensors checkpoints "
        "(re-save .bin checkpoints with save_pretrained(safe_serialization=True))"
    )


def _layer_count_and_type(cfg: dict, path: Path) -> tuple[int, Optional[str]]:
    if any(isinstance(cfg.get(k), int) for k in LAYER_COUNT_KEYS):
        count, model_type = layer_count(cfg), cfg.get("model_type")
    else:
        text = cfg.get("text_config")
        if not (isinstance(text, dict) and any(isinstance(text.get(k), int) for k in LAYER_COUNT_KEYS)):
            raise SurgeryError(f"{path}: no layer count ({', '.join(LAYER_COUNT_KEYS)}); cannot tell which layers "
                               "exist")
        count, model_type = layer_count(text), text.get("model_type") or cfg.get("model_type")
    if isinstance(count, bool) or count < 1:
        raise SurgeryError(f"{path}: layer count {quote(count, 40)} is not a positive number of layers; fix the config")
    return count, model_type if isinstance(model_type, str) else None


def _parse_layers(layers: Union[str, Iterable[int]], num_layers: int) -> list[int]:
    """Requested layers, bounded and deduplicated in linear time, then the shared rules (sorted, one must remain)."""
    requested = untrusted.parse_layers(layers, num_layers)
    try:
        return validate_layers(requested, num_layers)
    except ConfigSurgeryError as e:
        raise SurgeryError(str(e)) from None


def _model_card(src: Path, removed: list[int], num_layers: int, chosen_by: str) -> str:
    card = src / MODEL_CARD_NAME
    text = untrusted.read_text(card, src, what="model card") if os.path.lexists(card) else ""
    return with_removal(text, removal_section(removed, num_layers, chosen_by=chosen_by))


def build_plan(src: Path, layers: Union[str, Iterable[int]], chosen_by: str = "manual") -> Plan:
    """Read and validate every header, then decide every byte the result will hold. Touches nothing.

    src: the checkpoint folder (Path); layers: "3,5-7" or indices to remove. Returns a Plan.
    Example: plan = build_plan(Path("ckpt"), "20-23"); plan.mapping maps old layer indices to new ones.
    Raises SurgeryError (one line) when config.json is missing or disagrees with the shards, the index and shards
    disagree or share a tensor, the layer list is invalid, or a shard name the result needs is taken.
    """
    sharded, index, shard_names = _discover(src)
    config_path = src / CONFIG_NAME
    if not os.path.lexists(config_path):
        raise SurgeryError(f"{src} has no {CONFIG_NAME}; the cut needs it to know the layer count")
    config_bytes = untrusted.read_bytes(config_path, src, untrusted.MAX_SMALL_FILE_BYTES, "config")
    cfg = _load_json(config_path, src, what="config")
    num_layers, model_type = _layer_count_and_type(cfg, config_path)
    headers = {name: _read_header(src / name, src) for name in shard_names}

    owner: dict[str, str] = {}
    for name, h in headers.items():
        for tensor, *_ in h["tensors"]:
            if tensor in owner:
                raise SurgeryError(f"tensor '{tensor}' is stored in both {owner[tensor]} and {name}; "
                                   "remove the stale shard or re-save the checkpoint")
            owner[tensor] = name
    if sharded:
        weight_map = index["weight_map"]
        for tensor, shard in owner.items():
            if weight_map.get(tensor) != shard:
                raise SurgeryError(f"{src / INDEX_NAME} disagrees with the shards: '{tensor}' is in {shard} but the "
                                   f"index says {weight_map.get(tensor)!r}; regenerate the index or re-download")
        missing = sorted(set(weight_map) - set(owner))
        if missing:
            raise SurgeryError(f"{src / INDEX_NAME} lists {len(missing)} tensors no shard holds (e.g. '{missing[0]}');"
                               " the download is incomplete")

    # Every layer has at least one tensor, so a count above the tensor count is a lie; checking it here keeps a
    # config claiming 10**9 (or 10**30) layers from sizing anything below by that number.
    if num_layers > len(owner):
        raise SurgeryError(f"{config_path} says the model has {quote(num_layers, 40)} layers but the checkpoint holds "
                           f"only {len(owner)} tensors; the config does not belong to these weights")
    untrusted.check_tensor_names(owner, src)
    removed = _parse_layers(layers, num_layers)
    history = cfg.pop(CUT_RECORD_KEY, None)
    if history is not None and not (isinstance(history, dict) and isinstance(history.get("cuts"), list)):
        raise SurgeryError(f"{config_path}: {CUT_RECORD_KEY} is not a record of earlier cuts; delete that key")
    try:
        # Multi-token-prediction layers (DeepSeek-V3, GLM-4.5) are stored after the decoder layers, at N..N+k-1;
        # they are never removed and move down to follow the kept layers.
        mtp = mtp_layer_count(cfg)
        prefix = checkpoint_layer_prefix(owner, num_layers, model_type, extra_layers=mtp)
        mapping = index_map(removed, num_layers, extra_layers=mtp)
        new_cfg = prune_config_dict(cfg, removed)
    except (ArchitectureError, ConfigSurgeryError) as e:
        raise SurgeryError(str(e)) from None

    kept_shards = [n for n in shard_names
                   if any(renamed_tensor(t[0], prefix, mapping) is not None for t in headers[n]["tensors"])]
    if sharded:
        targets = {n: f"model-{i + 1:05d}-of-{len(kept_shards):05d}.safetensors" for i, n in enumerate(kept_shards)}
    else:
        targets = {SINGLE_FILE_NAME: SINGLE_FILE_NAME}
    for source, target in targets.items():
        if target != source and (src / target).exists():
            raise SurgeryError(f"{src / target} exists but is not the shard that will take that name; "
                               "move it out of the checkpoint folder first")

    shards: list[ShardPlan] = []
    new_weight_map: dict[str, str] = {}
    kept_tensors: list[tuple] = []
    kept_bytes = 0
    removed_elements = 0
    for name in shard_names:
        h = headers[name]
        old_len, data_start = h["header_len"], h["data_start"]
        old_sha = _header_region_sha256(src / name, old_len)
        kept = []
        for tensor, dtype, shape, begin, end in h["tensors"]:
            new_name = renamed_tensor(tensor, prefix, mapping)
            if new_name is None:
                n = 1
                for d in shape:
                    n *= d
                removed_elements += n
            else:
                kept.append((tensor, new_name, dtype, list(shape), begin, end))
        if not kept:
            shards.append(ShardPlan(name, None, "drop", old_header_len=old_len, old_header_sha256=old_sha,
                                    final_size=h["file_size"]))
            continue
        target = targets[name]
        header = b""
        if len(kept) == len(h["tensors"]):
            header = _C.safetensors_render_header(h["metadata"], [(n, d, s, b, e) for _, n, d, s, b, e in kept],
                                                  old_len)
        if header and len(header) == old_len:
            kind = "header"
            runs = [[data_start, h["file_size"] - data_start]]
        else:
            kind = "compact"
            entries, runs, offset = [], [], 0
            for _, new_name, dtype, shape, begin, end in kept:
                entries.append((new_name, dtype, shape, offset, offset + end - begin))
                runs.append([data_start + begin, end - begin])
                offset += end - begin
            header = _C.safetensors_render_header(h["metadata"], entries, old_len)
        new_sha = hashlib.sha256(len(header).to_bytes(8, "little") + header).hexdigest()
        final_size = 8 + len(header) + sum(r[1] for r in runs)
        shards.append(ShardPlan(name, target, kind, header.decode("utf-8"), old_len, runs, old_sha, new_sha,
                                final_size))
        for tensor, new_name, _dtype, _shape, begin, end in kept:
            new_weight_map[new_name] = target
            kept_tensors.append((name, tensor, target, new_name, data_start + begin, end - begin))
            kept_bytes += end - begin

    # Names this cut of this source, so a rerun can recognise its own finished work in config.json.
    cut_id = hashlib.sha256(json.dumps({
        "config": hashlib.sha256(config_bytes).hexdigest(), "removed": removed, "num_layers": num_layers,
        "shards": [[s.source, s.old_header_sha256] for s in shards]}, sort_keys=True).encode()).hexdigest()
    cuts = list(history["cuts"]) if history else []
    cuts.append({"plan_sha256": cut_id, "removed": removed, "num_layers": num_layers})
    new_cfg[CUT_RECORD_KEY] = {"cuts": cuts}

    index_text = None
    if sharded:
        new_index = json.loads(json.dumps(index))
        meta = new_index.setdefault("metadata", {})
        meta["total_size"] = kept_bytes
        if isinstance(meta.get("total_parameters"), int):
            meta["total_parameters"] -= removed_elements
        new_index["weight_map"] = dict(sorted(new_weight_map.items()))
        index_text = json.dumps(new_index, indent=2, sort_keys=True) + "\n"

    return Plan(
        removed=removed,
        num_layers=num_layers,
        prefix=prefix,
        mapping=mapping,
        sharded=sharded,
        shards=shards,
        index_text=index_text,
        config_text=json.dumps(new_cfg, indent=2, sort_keys=True) + "\n",
        model_card_text=_model_card(src, removed, num_layers, chosen_by),
        kept_bytes=kept_bytes,
        kept_tensors=kept_tensors,
        cut_id=cut_id,
    )


def check_structure(src: Path, plan: Plan) -> None:
    """Prove the planned cut builds the original model minus the removed blocks, or refuse (see verify_structure).

    The cut engine stays free of torch (tens of MB instead of hundreds), so unless the caller already imported
    torch the proof runs in a child process and only its one-line verdict comes back.
    """
    import subprocess
    import sys

    old_cfg = _load_json(src / CONFIG_NAME)
    old_tensors: dict[str, list[int]] = {}
    for shard in plan.shards:
        for tensor, _dtype, shape, _b, _e in _read_header(src / shard.source)["tensors"]:
            old_tensors[tensor] = list(shape)
    request = {"old_config": old_cfg, "new_config": json.loads(plan.config_text), "removed": plan.removed,
               "old_tensors": old_tensors,
               "renames": {t: renamed_tensor(t, plan.prefix, plan.mapping) for t in old_tensors}}
    if "torch" in sys.modules:
        from .verify_structure import StructureMismatch, verify_cut

        try:
            verify_cut(**request)
        except StructureMismatch as e:
            raise SurgeryError(f"refused: {e} (nothing was written; --no-verify skips this check)") from None
        return
    proc = subprocess.run([sys.executable, "-m", "shortgpt_fast.surgery.verify_structure"],
                          input=json.dumps(request), capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        why = lines[-1] if proc.returncode == 3 and lines else \
            f"the check itself failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}"
        raise SurgeryError(f"refused: {why[:500]} (nothing was written; --no-verify skips this check)")


# ----------------------------------------------------------------------------------------------------------------
# Small durable-write helpers


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale(path: Path) -> None:
    """Remove a leftover temp file of ours before recreating it exclusively. A planted symlink is removed, never
    followed; anything that is not a file or link (a folder) is refused rather than deleted."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise SurgeryError(f"{path} is a {untrusted.file_kind(mode)} with the name of a temp file of the cut; "
                           "move it away and rerun")
    os.unlink(path)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _file_mode(path: Path) -> Optional[int]:
    """Permission bits of an existing regular file (kept when it is replaced), else None (the umask decides)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None


def _write_durable(path: Path, data: bytes, mode: Optional[int] = None) -> None:
    """Write via a temp file and rename, so `path` always holds either its old or its new content. The temp file is
    created exclusively without following links, keeps `mode` (default: that of the file it replaces), and is
    removed again if the write fails, e.g. on a full disk."""
    tmp = path.with_name(f".{path.name}{_TMP_SUFFIX}")
    if mode is None:
        mode = _file_mode(path)
    _remove_stale(tmp)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise SurgeryError(untrusted.os_error_message(e, path, "write", needed=len(data))) from None
    _fsync_dir(path.parent)


def _write_shard(src_file: Path, dst_file: Path, shard: ShardPlan, copy_method: str,
                 fsync: bool = True, mode: int = 0o644) -> tuple[int, str]:
    try:
        return _C.safetensors_write_shard(str(src_file), str(dst_file), shard.header.encode("utf-8"),
                                          [tuple(r) for r in shard.runs], shard.kind == "header", copy_method, fsync,
                                          mode)
    except (ValueError, OSError) as e:
        _unlink_quietly(dst_file)
        message = str(e)
        if isinstance(e, OSError) and ("No space left" in message or "quota" in message.lower()):
            message += f" (this shard needs {shard.final_size:,} bytes; free space and rerun)"
        raise SurgeryError(f"{message}; nothing in the source was changed by this step, rerun once the cause is "
                           "fixed") from None


def _sha256_range(path: Path, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    with os.fdopen(untrusted.open_regular(path, path.parent, "shard"), "rb") as f:
        f.seek(offset)
        while length > 0:
            chunk = f.read(min(length, _HASH_CHUNK))
            if not chunk:
                raise SurgeryError(f"{path} ended early while hashing tensor data; the file is truncated")
            digest.update(chunk)
            length -= len(chunk)
    return digest.hexdigest()


def _source_digests(src: Path, plan: Plan) -> dict[str, list[str]]:
    return {new: [target, _sha256_range(src / source, offset, length)]
            for source, _, target, new, offset, length in plan.kept_tensors}


def _verify(result_dir: Path, plan: Plan, expected: dict[str, list[str]]) -> None:
    """Reopen every result shard with the safetensors library and compare each tensor's bytes to `expected`."""
    import torch
    from safetensors import safe_open

    lengths = {new: length for *_, new, _, length in plan.kept_tensors}
    by_shard: dict[str, list[str]] = {}
    for new_name, (target, _) in expected.items():
        by_shard.setdefault(target, []).append(new_name)
    for target, names in by_shard.items():
        path = result_dir / target
        try:
            _verify_shard(path, names, lengths, expected, safe_open, torch)
        except SurgeryError:
            raise
        except Exception as e:  # the library refuses some dtypes (F4, F6) or files; say so in one line
            why = one_line(e)
            raise SurgeryError(f"verify: the safetensors library cannot read {path} ({quote(why, 200)}); the cut "
                               "itself is complete, rerun without --verify to finish and check the result another "
                               "way") from None


def _verify_shard(path: Path, names: list[str], lengths: dict, expected: dict, safe_open, torch) -> None:
    with safe_open(str(path), framework="pt") as f:
        present = set(f.keys())
        if present != set(names):
            raise SurgeryError(f"verify: {path} holds {sorted(present ^ set(names))[:3]} unexpectedly; "
                               "the cut is wrong, please report it")
        for name in names:
            digest = hashlib.sha256()
            piece = f.get_slice(name)
            shape = piece.get_shape()
            if not shape or shape[0] == 0:
                digest.update(f.get_tensor(name).reshape(-1).view(torch.uint8).numpy())
            else:
                # Row slices keep memory at one hash chunk even for a multi-GB embedding.
                rows = max(1, _HASH_CHUNK // max(1, lengths[name] // shape[0]))
                for start in range(0, shape[0], rows):
                    chunk = piece[start:start + rows].contiguous().reshape(-1)
                    digest.update(chunk.view(torch.uint8).numpy())
            if digest.hexdigest() != expected[name][1]:
                raise SurgeryError(f"verify: tensor '{name}' in {path} differs from the source bytes; "
                                   "the result is corrupt, do not use it")


# ----------------------------------------------------------------------------------------------------------------
# Copy mode


def _other_files(src: Path, plan: Plan) -> tuple[list[Path], list[Path], list[Path]]:
    """(folders, files, links) to carry over, relative to src, in walk order.

    Every entry is examined without following it: files and links to files inside the folder are copied as files
    (so a Hugging Face snapshot yields real files); a link to a folder inside is recreated as the same relative
    link; a link that leads outside is refused, as are FIFOs, sockets and devices, which cannot be carried and
    would block or leak a read. Empty folders are kept.
    """
    skip = {s.source for s in plan.shards} | {INDEX_NAME, CONFIG_NAME, MODEL_CARD_NAME, JOURNAL_NAME}
    folders, files, links = [], [], []
    for root, dirs, names in os.walk(src):
        root_path = Path(root)
        dirs.sort()
        for name in sorted(dirs) + sorted(names):
            path = root_path / name
            rel = path.relative_to(src)
            if root_path == src and (name in skip or _TMP_SUFFIX in name or name.endswith(_STAGING_SUFFIX) or
                                     name == ".shortgpt_fast-collapse-probe"):
                continue
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                target = untrusted.check_link(path, src)
                if os.path.isdir(target):
                    link = os.readlink(path)
                    if os.path.isabs(link):
                        raise SurgeryError(f"{path} is an absolute symlink to a folder; make it relative (or copy "
                                           "the folder in) so the result does not point into the source")
                    links.append(rel)
                else:
                    files.append(rel)
            elif stat.S_ISDIR(mode):
                folders.append(rel)
            elif stat.S_ISREG(mode):
                files.append(rel)
            else:
                raise SurgeryError(f"{path} is a {untrusted.file_kind(mode)}; a checkpoint holds only files and "
                                   "folders, remove it and rerun")
    return folders, files, links


def _copy_file(src: Path, src_file: Path, dst_file: Path) -> None:
    with os.fdopen(untrusted.open_regular(src_file, src), "rb") as fin:
        mode = stat.S_IMODE(os.fstat(fin.fileno()).st_mode)
        fd = os.open(dst_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as fout:
            os.fchmod(fd, mode)
            shutil.copyfileobj(fin, fout, _HASH_CHUNK)
            fout.flush()
            os.fsync(fd)


def _claim_staging(staging: Path, out: Path) -> None:
    """Create the staging folder, first removing one a killed earlier run left behind. Only a folder holding our
    owner file is ever deleted, and only when the run that made it is gone."""
    if os.path.lexists(staging):
        owner_file = staging / _STAGING_OWNER
        if staging.is_symlink() or not staging.is_dir() or not owner_file.is_file() or owner_file.is_symlink():
            raise SurgeryError(f"{staging} exists but was not made by `shortgpt-fast cut`; move it away and rerun")
        try:
            pid = json.loads(owner_file.read_text())["pid"]
            alive = isinstance(pid, int) and pid > 0 and pid != os.getpid() and _pid_alive(pid)
        except (OSError, ValueError, KeyError, TypeError):
            alive = False
        if alive:
            raise SurgeryError(f"another cut into {out} is running (pid {pid}); wait for it, or stop it and rerun")
        shutil.rmtree(staging)
    staging.mkdir(mode=0o700)
    (staging / _STAGING_OWNER).write_text(json.dumps({"pid": os.getpid()}))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cut_copy(src: Path, out: Path, plan: Plan, verify: bool, copy_method: str) -> tuple[int, int, str]:
    if out.resolve() == src.resolve():
        raise SurgeryError(f"--out {out} is the checkpoint itself; use --in-place to edit it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SurgeryError(f"{out} already exists and is not an empty directory; choose a new --out path")
    if untrusted.inside(os.path.realpath(out), os.path.realpath(src)):
        raise SurgeryError(f"--out {out} is inside the checkpoint {src}; choose a folder outside it")
    folders, other, links = _other_files(src, plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}{_STAGING_SUFFIX}"
    _claim_staging(staging, out)
    copied, written, methods = 0, 0, set()
    current = staging
    try:
        for shard in plan.shards:
            if shard.kind == "drop":
                continue
            # Made durable all together below, before the staging folder is renamed into place.
            current = staging / shard.target
            source = Path(untrusted.check_link(src / shard.source, src))
            n, method = _write_shard(source, current, shard, copy_method, fsync=False,
                                     mode=stat.S_IMODE(os.stat(source).st_mode))
            copied += n
            written += 1
            methods.add(method)
        for rel in folders:
            current = staging / rel
            current.mkdir()
        for rel in links:
            current = staging / rel
            os.symlink(os.readlink(src / rel), current)
        for rel in other:
            current = staging / rel
            _copy_file(src, src / rel, current)
        for name, text in ((INDEX_NAME, plan.index_text), (CONFIG_NAME, plan.config_text),
                           (MODEL_CARD_NAME, plan.model_card_text)):
            if text is not None:
                current = staging / name
                fd = os.open(current, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
                with os.fdopen(fd, "wb") as f:
                    mode = _file_mode(src / name) if not (src / name).is_symlink() else None
                    if mode is not None:
                        os.fchmod(fd, mode)
                    f.write(text.encode("utf-8"))
        current = staging
        if verify:
            _verify(staging, plan, _source_digests(src, plan))
        for shard in plan.shards:
            if shard.kind != "drop":
                with open(staging / shard.target, "rb") as f:
                    os.fsync(f.fileno())
        for small in (INDEX_NAME, CONFIG_NAME, MODEL_CARD_NAME):
            if (staging / small).exists():
                with open(staging / small, "rb") as f:
                    os.fsync(f.fileno())
        # Folder modes last: a read-only source folder copied first would refuse our own writes into the copy.
        for rel in reversed(folders):
            _fsync_dir(staging / rel)
            os.chmod(staging / rel, stat.S_IMODE(os.lstat(src / rel).st_mode))
        os.unlink(staging / _STAGING_OWNER)
        os.chmod(staging, stat.S_IMODE(os.stat(src).st_mode))
        _fsync_dir(staging)
        if out.exists():
            out.rmdir()
        os.rename(staging, out)
        _fsync_dir(out.parent)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise SurgeryError(untrusted.os_error_message(e, current, "write", needed=plan.kept_bytes)) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return copied, written, "+".join(sorted(methods)) or "none"


# ----------------------------------------------------------------------------------------------------------------
# In-place mode


def _step_done(step: int, what: str) -> None:
    if after_step_hook is not None:
        after_step_hook(step, what)
    kill_after = os.environ.get(_KILL_AFTER_STEP_ENV)
    if kill_after is not None and step >= int(kill_after):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _refuse_shared_files(src: Path, plan: Plan) -> None:
    # A header rewritten in place would also change every other name for the same inode (hard links) or the link
    # target (symlinks), e.g. the original model a checkpoint was `cp -al`-ed from. Links are refused for every file
    # the cut replaces, so the journal only ever names plain files (docs/security.md).
    for shard in plan.shards:
        path = src / shard.source
        if path.is_symlink() or (shard.kind == "header" and path.stat().st_nlink > 1):
            raise SurgeryError(f"{path} is a symlink or has other hard links; an in-place edit would change the "
                               "linked copy too. Use --out, or replace it with a real copy (cp --remove-destination)")
    for name in (INDEX_NAME, CONFIG_NAME, MODEL_CARD_NAME):
        if (src / name).is_symlink():
            raise SurgeryError(f"{src / name} is a symlink; an in-place cut replaces only plain files. Use --out, or "
                               "replace it with a real copy (cp --remove-destination)")


def _plain_file(path: Path) -> bool:
    """Whether `path` exists as a regular file; a symlink or anything else at a name the journal owns is refused."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(mode):
        raise SurgeryError(f"{path} is a {untrusted.file_kind(mode)}; the pending cut only edits plain files it "
                           f"created. Restore the checkpoint from the original download")
    return True


def _shard_in_progress(src: Path, shard: ShardPlan) -> Path:
    """The file an edited-in-place shard lives in now: its old name until the final rename, its new one after."""
    source, target = src / shard.source, src / shard.target
    path = source if _plain_file(source) else target
    if not _plain_file(path):
        raise SurgeryError(f"neither {source} nor {target} exists; the checkpoint lost a shard outside this tool. "
                           "Restore it from the original download")
    return path


def _rename_into_place(src: Path, path: Path, target: Path) -> None:
    if path != target:
        os.rename(path, target)
        _fsync_dir(src)


def _apply_shard_in_place(src: Path, shard: ShardPlan, copy_method: str) -> int:
    source, target = src / shard.source, src / shard.target
    if shard.kind == "collapse":
        _collapse_shard_in_place(src, shard)
        return 0
    if shard.kind == "header":
        # The data region is never written in this mode, so rewriting the header is always safe to repeat, whether
        # the last attempt finished, never started, or was torn halfway.
        path = _shard_in_progress(src, shard)
        if path.stat().st_size != shard.final_size:
            raise SurgeryError(f"{path} is {path.stat().st_size} bytes, expected {shard.final_size}; it was changed "
                               f"outside the cut. Restore it and rerun, or delete {src / JOURNAL_NAME} to abandon")
        if _header_region_sha256(path, len(shard.header.encode('utf-8'))) != shard.new_header_sha256:
            try:
                _C.safetensors_overwrite_header(str(path), shard.header.encode("utf-8"), shard.old_header_len)
            except (ValueError, OSError) as e:
                raise SurgeryError(f"{e}; rerun the same command to finish the cut") from None
        _rename_into_place(src, path, target)
        return 0
    # Compacted shards are rebuilt into a temp file from the untouched source and renamed over the target, so the
    # source bytes stay readable until the new file is durable.
    if _plain_file(source):
        if source == target and _header_region_sha256(source, len(shard.header.encode("utf-8"))) == \
                shard.new_header_sha256 and source.stat().st_size == shard.final_size:
            return 0
        if _header_region_sha256(source, shard.old_header_len) != shard.old_header_sha256:
            raise SurgeryError(f"{source} no longer matches the header recorded in {src / JOURNAL_NAME}; it was "
                               "changed outside the cut. Restore it from the original download and rerun")
        tmp = src / f".{shard.target}{_TMP_SUFFIX}"
        _remove_stale(tmp)
        copied, _ = _write_shard(source, tmp, shard, copy_method, mode=stat.S_IMODE(os.lstat(source).st_mode))
        os.replace(tmp, target)
        _fsync_dir(src)
        if source != target:
            os.unlink(source)
            _fsync_dir(src)
        return copied
    if not _plain_file(target) or _header_region_sha256(target, len(shard.header.encode("utf-8"))) != \
            shard.new_header_sha256:
        raise SurgeryError(f"{source} is gone but {target} is not the finished shard; the folder was changed "
                           "outside the cut. Restore the checkpoint from the original download")
    return 0


def _plan_collapses(src: Path, plan: Plan) -> None:
    """Turn compact shards into collapse shards where the filesystem can cut the dropped bytes out in place.

    Rebuilding a compacted shard rewrites every byte kept after the first dropped tensor; collapsing costs a few
    metadata updates whatever the shard size. It applies when the header keeps its length (so the data stays put),
    the kept tensors keep their order, and each interior hole is a whole number of filesystem blocks, which real
    checkpoints meet because layer tensors are multiples of 4 KiB (e.g. 4096 x 4096 bf16). Anything else, or a
    filesystem without collapse-range (tmpfs, NFS, btrfs), keeps the rebuild.
    """
    candidates = [s for s in plan.shards if s.kind == "compact" and len(s.header.encode("utf-8")) == s.old_header_len]
    if not candidates:
        return
    supported, block = _C.collapse_range_support(str(src))
    if not supported:
        return
    for shard in candidates:
        if (src / shard.source).is_symlink() or (src / shard.source).stat().st_nlink > 1:
            continue  # cutting it in place would change the linked copy too; the rebuild writes a new inode
        size = (src / shard.source).stat().st_size
        holes, cursor = [], 8 + shard.old_header_len
        for start, length in shard.runs:
            if start < cursor:
                break  # kept tensors change order; only a rebuild can do that
            if start > cursor:
                holes.append([cursor, start])
            cursor = start + length
        else:
            if cursor < size:
                holes.append([cursor, size])
            if holes and all((e - b) % block == 0 for b, e in holes if e != size):
                shard.kind, shard.holes, shard.source_size = "collapse", holes, size


def _collapse_shard_in_place(src: Path, shard: ShardPlan) -> None:
    path = _shard_in_progress(src, shard)
    new_len = len(shard.header.encode("utf-8"))
    finished = path.stat().st_size == shard.final_size and \
        _header_region_sha256(path, new_len) == shard.new_header_sha256
    if not finished:
        # The old header stays intact until every range is gone, so it still proves the file is ours to cut (a
        # header write torn by a kill leaves the file at its final size, where the header is simply written again).
        if path.stat().st_size != shard.final_size and \
                _header_region_sha256(path, shard.old_header_len) != shard.old_header_sha256:
            raise SurgeryError(f"{path} no longer matches the header recorded in {src / JOURNAL_NAME}; it was "
                               "changed outside the cut. Restore it from the original download and rerun")
        try:
            _C.safetensors_remove_ranges(str(path), [tuple(h) for h in shard.holes], shard.source_size)
            _C.safetensors_overwrite_header(str(path), shard.header.encode("utf-8"), shard.old_header_len)
        except (ValueError, OSError) as e:
            raise SurgeryError(f"{e}; rerun the same command to finish the cut") from None
    _rename_into_place(src, path, src / shard.target)


def _journal_document(src: Path, plan: Plan) -> bytes:
    body = plan.to_json()
    folder = os.stat(src)
    return json.dumps({
        "version": JOURNAL_VERSION,
        "run_id": secrets.token_hex(16),
        "folder": {"dev": folder.st_dev, "ino": folder.st_ino},
        "plan_sha256": plan.cut_id,
        "body_sha256": hashlib.sha256(_canonical(body)).hexdigest(),
        "plan": body,
    }).encode()


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _read_journal(src: Path, journal_path: Path) -> Plan:
    """The plan of a pending cut, only if this tool wrote it for this folder: the journal is as untrusted as any
    other file in the folder (a download can carry one), so it is validated like a header before one step runs."""
    def refuse(why: str) -> SurgeryError:
        return SurgeryError(f"{journal_path} is not a journal this tool wrote for {src}: {why}. If you did not start "
                            "an in-place cut here, delete that file; otherwise restore the checkpoint from the original")

    if os.path.islink(journal_path):
        raise refuse("it is a symlink")
    try:
        doc = untrusted.load_json(journal_path, src, untrusted.MAX_JOURNAL_BYTES, "journal")
    except SurgeryError as e:
        raise refuse(str(e).split(": ", 1)[-1].split(";")[0]) from None
    try:
        untrusted.validate_journal_envelope(doc, JOURNAL_VERSION, os.stat(src))
        body = doc["plan"]
        if hashlib.sha256(_canonical(body)).hexdigest() != doc["body_sha256"]:
            raise untrusted.JournalError("its plan does not match its checksum (edited or torn)")
        untrusted.validate_plan_dict(body, tuple(ShardPlan.__dataclass_fields__), Plan._FIELDS)
        if body["cut_id"] != doc["plan_sha256"]:
            raise untrusted.JournalError("its plan hash does not match its plan")
    except untrusted.JournalError as e:
        raise refuse(str(e)) from None
    return Plan.from_json(body)


def _cut_record(src: Path) -> Optional[dict]:
    """The last cut config.json records, or None. Read leniently: a bad record just means "no finished cut"; the
    full cut path then reports whatever is wrong."""
    try:
        cfg = _load_json(src / CONFIG_NAME, src, what="config")
    except SurgeryError:
        return None
    record = cfg.get(CUT_RECORD_KEY)
    cuts = record.get("cuts") if isinstance(record, dict) else None
    if not isinstance(cuts, list) or not cuts or not isinstance(cuts[-1], dict):
        return None
    last = cuts[-1]
    removed, num_layers = last.get("removed"), last.get("num_layers")
    if not (isinstance(num_layers, int) and isinstance(removed, list) and all(isinstance(i, int) for i in removed)):
        return None
    try:
        current, _ = _layer_count_and_type(cfg, src / CONFIG_NAME)
    except SurgeryError:
        return None
    # The record only proves the cut finished if the layer count it implies is what the config now says.
    if current != num_layers - len(removed):
        return None
    return last


def _already_done(src: Path, layers) -> Optional[dict]:
    """The record of this very cut if the folder already holds its result, else None."""
    record = _cut_record(src)
    if record is None:
        return None
    try:
        requested = _parse_layers(layers, record["num_layers"])
    except SurgeryError:
        return None
    return record if requested == record["removed"] else None


def _cut_in_place(src: Path, layers, verify: bool, copy_method: str, chosen_by: str = "manual",
                  check: bool = True) -> tuple[Optional[Plan], int, int, bool]:
    """(plan, bytes copied, shards written, resumed); plan is None when the folder already holds this cut."""
    journal_path = src / JOURNAL_NAME
    resumed = os.path.lexists(journal_path)
    if resumed:
        plan = _read_journal(src, journal_path)
        requested = untrusted.parse_layers(layers, plan.num_layers)
        if sorted(requested) != plan.removed:
            raise SurgeryError(f"an interrupted in-place cut of layers {plan.removed} is pending in {src}; rerun "
                               f"with --layers {','.join(map(str, plan.removed))} --in-place to finish it first")
    else:
        if _already_done(src, layers) is not None:
            return None, 0, 0, False
        plan = build_plan(src, layers, chosen_by)
        if check:
            # Proven before the journal exists; a pending journal was proven when it was written.
            check_structure(src, plan)
        _refuse_shared_files(src, plan)
        if copy_method == "auto":
            _plan_collapses(src, plan)
        if verify:
            plan.tensor_digests = _source_digests(src, plan)
        _write_durable(journal_path, _journal_document(src, plan), mode=0o600)
    step = 0
    _step_done(step, "journal written")
    copied = written = 0
    for shard in plan.shards:
        if shard.kind == "drop":
            continue
        copied += _apply_shard_in_place(src, shard, copy_method)
        written += 1
        step += 1
        _step_done(step, f"shard {shard.source} -> {shard.target}")
    small = [(INDEX_NAME, plan.index_text), (CONFIG_NAME, plan.config_text), (MODEL_CARD_NAME, plan.model_card_text)]
    for name, text in small:
        if text is None:
            continue
        # Written after every shard: config.json records the finished cut, so it must not claim it early.
        _write_durable(src / name, text.encode("utf-8"))
        step += 1
        _step_done(step, f"wrote {name}")
    # Dropped shards go last: until the new index is in place, they are still what the old index points at.
    for shard in plan.shards:
        if shard.kind == "drop" and _plain_file(src / shard.source):
            os.unlink(src / shard.source)
    _fsync_dir(src)
    step += 1
    _step_done(step, "removed emptied shards")
    if verify:
        if plan.tensor_digests is None:
            raise SurgeryError(f"cannot verify: the interrupted run that wrote {journal_path} did not record "
                               "checksums; rerun without --verify to finish, then reload the model to check it")
        _verify(src, plan, plan.tensor_digests)
    # Retired only now that everything above is durable; from here on config.json alone says the cut is done.
    os.unlink(journal_path)
    _fsync_dir(src)
    step += 1
    _step_done(step, "journal retired")
    return plan, copied, written, resumed


# ----------------------------------------------------------------------------------------------------------------
# Public API and CLI


def cut_checkpoint(
    src: Union[str, os.PathLike],
    layers: Union[str, Sequence[int]],
    out: Union[str, os.PathLike, None] = None,
    in_place: bool = False,
    verify: bool = False,
    copy_method: str = "auto",
    check: bool = True,
    chosen_by: str = "manual",
) -> CutResult:
    """Remove whole layers from a safetensors checkpoint folder without loading the model.

    Args:
        src: folder holding config.json and either model.safetensors or model.safetensors.index.json plus shards.
        layers: indices to remove (original numbering), as ints or a string like "21,22,25" or "21-25".
        out: copy mode: a new (or empty) folder for the result; `src` is only read.
        in_place: edit `src` itself, crash-safely (see docs/surgery.md). Exactly one of `out` / `in_place`.
        verify: reopen the result with the safetensors library and check every kept tensor's bytes.
        copy_method: "auto" (reflink, then copy_file_range, then read/write), "copy_file_range" or "readwrite".
        check: before writing anything, prove that the pruned config builds the original model minus the removed
            blocks and that the renamed tensors fit it (surgery/verify_structure.py); refuse otherwise.
        chosen_by: what picked the layers (a metric such as "bi", or "manual"), recorded in the model card.

    Returns:
        CutResult with the removed layers, the old->new index map, the output folder, bytes copied and timing.

    Raises:
        SurgeryError: one-line reason and fix for any refused or failed cut.
    """
    start = time.perf_counter()
    src = Path(src)
    if (out is None) == (not in_place):
        raise SurgeryError("pass exactly one of --out OUT_DIR (copy) or --in-place")
    if copy_method not in ("auto", "copy_file_range", "readwrite"):
        raise SurgeryError(f"copy_method must be auto, copy_file_range or readwrite, not {copy_method!r}")
    if in_place:
        if not src.is_dir():
            raise SurgeryError(f"{src} is not a directory; pass the checkpoint folder that holds config.json")
        plan, copied, written, resumed = _cut_in_place(src, layers, verify, copy_method, chosen_by, check)
        if plan is None:
            record = _already_done(src, layers)
            gone = set(record["removed"])
            mapping = {old: new for new, old in enumerate(i for i in range(record["num_layers"]) if i not in gone)}
            return CutResult(removed=record["removed"], index_map=mapping, output=src, bytes_copied=0,
                             shards_written=0, seconds=time.perf_counter() - start, in_place=True,
                             copy_method=copy_method, already_done=True, num_layers=record["num_layers"])
        output, method = src, copy_method
    else:
        if os.path.lexists(src / JOURNAL_NAME):
            raise SurgeryError(f"{src} is in the middle of an interrupted in-place cut; rerun that command with "
                               "--in-place to finish it before copying")
        plan = build_plan(src, layers, chosen_by)
        if check:
            check_structure(src, plan)
        output = Path(out)
        copied, written, method = _cut_copy(src, output, plan, verify, copy_method)
        resumed = False
    return CutResult(
        removed=plan.removed,
        index_map=plan.mapping,
        output=output,
        bytes_copied=copied,
        shards_written=written,
        seconds=time.perf_counter() - start,
        in_place=in_place,
        copy_method=method,
        verified=verify,
        resumed=resumed,
        num_layers=plan.num_layers,
    )


def _run_cut_command(args: argparse.Namespace) -> int:
    result = cut_checkpoint(args.checkpoint, args.layers, out=args.out, in_place=args.in_place,
                            verify=args.verify, copy_method=args.copy_method, check=not args.no_verify)
    kept = result.num_layers - len(result.removed)
    if result.already_done:
        print(f"already done: layers {result.removed} were removed from {result.output} by an earlier run of this cut "
              f"(recorded in {CONFIG_NAME}); nothing changed. To remove more layers, use the current numbering "
              f"0-{kept - 1}")
        return 0
    print(f"removed layers {result.removed} ({kept} remain) -> {result.output}: {result.shards_written} shards, "
          f"{result.bytes_copied / 1e9:.2f} GB copied in {result.seconds:.2f} s"
          + (" (resumed an interrupted cut)" if result.resumed else "")
          + (", every kept tensor verified" if result.verified else ""))
    return 0


def add_cut_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `cut` on an argparse subparsers object; its `func` default runs it and returns an exit code."""
    p = subparsers.add_parser(
        "cut",
        help="remove layers from a safetensors checkpoint folder without loading the model",
        description="Remove whole layers from a safetensors checkpoint (sharded or single-file) without loading it. "
                    "Only changed bytes are rewritten; config.json, the index and the model card are updated.",
    )
    p.add_argument("checkpoint", help="checkpoint folder (config.json + model.safetensors[.index.json])")
    p.add_argument("--layers", required=True, help="layers to remove, original numbering, e.g. 21,22,25 or 21-25")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", help="write the result to this new (or empty) folder; the source is only read")
    mode.add_argument("--in-place", action="store_true",
                      help="edit the checkpoint itself, crash-safely: rerun the same command after any crash")
    p.add_argument("--verify", action="store_true", help="reopen the result and check every kept tensor's bytes")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the proof (on by default) that the pruned config builds the original model minus the "
                        "removed blocks; for architectures transformers cannot build")
    p.add_argument("--copy-method", default="auto", choices=("auto", "copy_file_range", "readwrite"),
                   help=argparse.SUPPRESS)
    p.set_defaults(func=_run_cut_command)
    return p
