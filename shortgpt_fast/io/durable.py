"""The one way a command writes a new output folder: the "new or empty" rule, staging beside it, and a rename at
the end, so an error, an interrupt or a SIGKILL never leaves a half-written folder under the requested name.

The staging folder has a fixed name (`.<OUT>.shortgpt-staging`) and holds an owner file with the writer's pid, so a
rerun after a kill finds the leftovers and removes them, and only them: a folder without our owner file, or one whose
writer is still running, is refused instead of deleted.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..errors import ShortGPTError

STAGING_SUFFIX = ".shortgpt-staging"
OWNER_FILE = ".shortgpt-staging-owner.json"


class OutputFolderError(ShortGPTError):
    """An output folder that cannot be written: it holds something already, or its staging folder is not ours."""


def check_out_dir(out_dir: Path) -> None:
    """The one "new or empty output folder" rule of every command that writes a folder.

    Raises OutputFolderError when `out_dir` exists and is a file or a non-empty folder, so nothing is overwritten.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputFolderError(f"output folder {out_dir} already exists and is not empty; choose a new folder")


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every regular file and folder under `root` (links are not followed). Files a writer already synced cost
    nothing here: only dirty pages are written."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def staging_path(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}{STAGING_SUFFIX}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _claim(staging: Path, out_dir: Path) -> None:
    if os.path.lexists(staging):
        owner = staging / OWNER_FILE
        if staging.is_symlink() or not staging.is_dir() or not owner.is_file() or owner.is_symlink():
            raise OutputFolderError(f"{staging} exists but was not made by shortgpt-fast; move it away and rerun")
        try:
            pid = json.loads(owner.read_text())["pid"]
            alive = isinstance(pid, int) and pid > 0 and pid != os.getpid() and _pid_alive(pid)
        except (OSError, ValueError, KeyError, TypeError):
            alive = False
        if alive:
            raise OutputFolderError(f"another run writing {out_dir} is in progress (pid {pid}); wait for it, or stop "
                                    "it and rerun")
        shutil.rmtree(staging)
    staging.mkdir(mode=0o700)
    (staging / OWNER_FILE).write_text(json.dumps({"pid": os.getpid()}))


class Staging:
    """The folder being built (`path`); `final_mode` (permission bits) is applied just before it is published."""

    def __init__(self, path: Path):
        self.path = path
        self.final_mode: Optional[int] = None


@contextmanager
def staged_folder(out_dir: Path) -> Iterator[Staging]:
    """Build `out_dir` atomically. Yields a Staging whose `path` is a hidden folder beside `out_dir`; when the block
    ends normally, every file and folder in it is fsynced and it is renamed onto `out_dir` (absent or empty, checked
    first), so after a power cut `out_dir` is either absent or complete; when the block raises, the folder is deleted.

    Example:
        with staged_folder(Path("pruned")) as staging:
            model.save_pretrained(staging.path)
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(out_dir)
    _claim(staging, out_dir)
    handle = Staging(staging)
    try:
        yield handle
        os.unlink(staging / OWNER_FILE)
        fsync_tree(staging)
        if handle.final_mode is not None:
            os.chmod(staging, stat.S_IMODE(handle.final_mode))
        fsync_dir(staging)
        check_out_dir(out_dir)  # someone may have written there while we worked
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(staging, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
