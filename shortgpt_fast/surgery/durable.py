"""Durable writes (temp file, fsync, rename), one shard written through the C++ engine, and the byte-level check of
a result against its source."""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Optional

from shortgpt_fast.errors import one_line
from shortgpt_fast.io.durable import fsync_dir
from shortgpt_fast.surgery import untrusted
from shortgpt_fast.surgery.untrusted import SurgeryError, quote

from .plan import _C, _HASH_CHUNK, _TMP_SUFFIX, Plan, ShardPlan

# ----------------------------------------------------------------------------------------------------------------
# Small durable-write helpers


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
    fsync_dir(path.parent)


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


