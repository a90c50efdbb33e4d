"""The cut's plan, made before any byte moves: which tensors survive under which names, the new shard headers, index,
config and model card, and the proof that the pruned config builds the original minus the removed blocks.

Everything read here comes from an untrusted folder (docs/security.md): sizes are bounded, links are checked.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

from shortgpt_fast import _native
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
_HASH_CHUNK = 8 << 20



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


