"""Copy mode: the source is only read; the result is assembled in a hidden folder beside OUT_DIR and renamed into
place at the end, so an error never leaves a half-written OUT_DIR."""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Mapping

from shortgpt_fast.io.durable import STAGING_SUFFIX, fsync_dir, staged_folder
from shortgpt_fast.io.safetensors import INDEX_NAME
from shortgpt_fast.surgery import untrusted
from shortgpt_fast.surgery.untrusted import SurgeryError, quote

from .durable import _file_mode, _source_digests, _verify, _write_shard
from .plan import (
    _HASH_CHUNK,
    _TMP_SUFFIX,
    CONFIG_NAME,
    JOURNAL_NAME,
    MODEL_CARD_NAME,
    Plan,
)

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
            if root_path == src and (name in skip or _TMP_SUFFIX in name or name.endswith(STAGING_SUFFIX) or
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


def _cut_copy(src: Path, out: Path, plan: Plan, verify: bool, copy_method: str,
              extra_files: Mapping[str, bytes]) -> tuple[int, int, str]:
    if out.resolve() == src.resolve():
        raise SurgeryError(f"--out {out} is the checkpoint itself; use --in-place to edit it")
    if untrusted.inside(os.path.realpath(out), os.path.realpath(src)):
        raise SurgeryError(f"--out {out} is inside the checkpoint {src}; choose a folder outside it")
    folders, other, links = _other_files(src, plan)
    copied, written, methods = 0, 0, set()
    current = out
    try:
        with staged_folder(out) as staged:
            staging = current = staged.path
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
            for name, data in extra_files.items():
                current = staging / name
                if os.sep in name or name in ("", ".", "..") or os.path.lexists(current):
                    raise SurgeryError(f"extra file {quote(name)} is not a new plain file name in the result")
                current.write_bytes(data)
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
                fsync_dir(staging / rel)
                os.chmod(staging / rel, stat.S_IMODE(os.lstat(src / rel).st_mode))
            staged.final_mode = os.stat(src).st_mode
    except OSError as e:
        raise SurgeryError(untrusted.os_error_message(e, current, "write", needed=plan.kept_bytes)) from None
    return copied, written, "+".join(sorted(methods)) or "none"


