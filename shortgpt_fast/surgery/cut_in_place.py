"""In-place mode: a journal holding the whole plan is fsynced before anything is touched, and every step can be
replayed, so rerunning the same command after a crash at any point finishes the job exactly once (docs/surgery.md)."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Callable, Optional

from shortgpt_fast.io.durable import fsync_dir
from shortgpt_fast.io.safetensors import INDEX_NAME
from shortgpt_fast.surgery import untrusted
from shortgpt_fast.surgery.untrusted import SurgeryError

from .durable import _remove_stale, _source_digests, _verify, _write_durable, _write_shard
from .plan import (
    _C,
    _TMP_SUFFIX,
    CONFIG_NAME,
    CUT_RECORD_KEY,
    JOURNAL_NAME,
    JOURNAL_VERSION,
    MODEL_CARD_NAME,
    Plan,
    ShardPlan,
    _header_region_sha256,
    _layer_count_and_type,
    _load_json,
    _parse_layers,
    build_plan,
    check_structure,
)

# ----------------------------------------------------------------------------------------------------------------
# In-place mode

# Crash-injection points for tests: called after each completed in-place step with (step number, description).
# The environment variable makes a subprocess SIGKILL itself after step k, which no `finally` can soften.
after_step_hook: Optional[Callable[[int, str], None]] = None
_KILL_AFTER_STEP_ENV = "SHORTGPT_FAST_CUT_KILL_AFTER_STEP"


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
        fsync_dir(src)


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
        fsync_dir(src)
        if source != target:
            os.unlink(source)
            fsync_dir(src)
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
    fsync_dir(src)
    step += 1
    _step_done(step, "removed emptied shards")
    if verify:
        if plan.tensor_digests is None:
            raise SurgeryError(f"cannot verify: the interrupted run that wrote {journal_path} did not record "
                               "checksums; rerun without --verify to finish, then reload the model to check it")
        _verify(src, plan, plan.tensor_digests)
    # Retired only now that everything above is durable; from here on config.json alone says the cut is done.
    os.unlink(journal_path)
    fsync_dir(src)
    step += 1
    _step_done(step, "journal retired")
    return plan, copied, written, resumed


