"""Reading a checkpoint folder as untrusted input (docs/security.md).

Every byte of a checkpoint folder may have been written by someone else: shard headers, config.json, the index, the
model card, the cut journal, symlinks, and every size or count they hold. The helpers here are the only way the cut
reads those things: they open regular files only, never follow a link out of the folder, cap sizes and nesting before
anything is allocated, and turn every failure into one SurgeryError line that names the file. Torch-free, like the
rest of the cut.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Iterable, Optional, Union

from ..errors import ShortGPTError, quote
from ..models import config_surgery

# config.json, the index and the model card: the same ceiling the safetensors reader puts on a header. The largest
# real index (a 400B model, ~100k tensors) is about 10 MB.
MAX_SMALL_FILE_BYTES = 100 * 1000 * 1000
# The journal holds every new header in full, so it may be as large as all headers together.
MAX_JOURNAL_BYTES = 1 << 30
# Real configs nest 3-4 levels (text_config > rope_scaling > ...). Deeper is junk, and deep enough would make any
# recursive consumer (copy.deepcopy, json.dumps) raise RecursionError instead of a one-line refusal.
MAX_JSON_DEPTH = 64


class SurgeryError(ShortGPTError):
    """A checkpoint cut was refused or failed; the message is one line and says how to fix it."""


def os_error_message(err: OSError, path: Path, action: str = "write", needed: Optional[int] = None) -> str:
    """One line naming the file, the reason and, when the disk is full, the space the step needs."""
    why = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        more = f" (this step needs {needed:,} bytes)" if needed else ""
        return f"cannot {action} {path}: {why}{more}; free space on that filesystem and rerun the same command"
    return f"cannot {action} {path}: {why}; fix the cause and rerun the same command"


def inside(child: str, parent: str) -> bool:
    """Whether path string `child` is `parent` or lies below it, compared as strings (resolve links first).

    Example: inside("/m/blobs/x", "/m/blobs") is True; inside("/m/blobsx", "/m/blobs") is False. Never raises.
    """
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def allowed_roots(root: Path) -> list[str]:
    """Where links inside `root` may point: the folder itself, plus the blob store of a Hugging Face cache snapshot
    (snapshots/<rev>/x -> ../../blobs/<hash>)."""
    real = os.path.realpath(root)
    roots = [real]
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots":
        roots.append(os.path.join(os.path.dirname(parent), "blobs"))
    return roots


def check_link(path: Path, root: Path) -> str:
    """The real path behind `path`, refusing a link that leads outside `root` (it would copy or edit foreign data:
    README.md -> /etc/passwd or /proc/self/cmdline)."""
    if not os.path.islink(path):
        return str(path)
    target = os.path.realpath(path)
    if not any(inside(target, r) for r in allowed_roots(root)):
        raise SurgeryError(f"{path} is a symlink to {target}, outside {os.path.realpath(root)}; copy the checkpoint "
                           "with `cp -rL` (after checking what the link points at) and cut the copy")
    return target


def open_regular(path: Path, root: Path, what: str = "file") -> int:
    """A read-only fd on a regular file in `root`. Links out of the folder, FIFOs (which would block the open
    forever), devices and folders are refused with one line."""
    real = check_link(path, root)
    try:
        # O_NOFOLLOW on the resolved path: a link swapped in after the check is refused, not followed.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SurgeryError(f"{path} is a symlink; refusing to follow it") from None
        raise SurgeryError(os_error_message(e, path, "open")) from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        os.close(fd)
        raise SurgeryError(os_error_message(e, path, "stat")) from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise SurgeryError(f"{path}: this {what} is a {file_kind(mode)}, not a regular file; replace it with the real "
                           "file from the original checkpoint")
    return fd


def file_kind(mode: int) -> str:
    """A readable name for a non-regular file's st_mode, for error messages: "folder", "FIFO", "socket",
    "character device", "block device", "symlink", or "special file" otherwise.
    Example: file_kind(os.stat("/tmp").st_mode) == "folder". Never raises.
    """
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISLNK, "symlink")):
        if test(mode):
            return name
    return "special file"


def read_bytes(path: Path, root: Path, limit: int, what: str = "file") -> bytes:
    """The whole content (bytes) of regular file `path` inside `root`, at most `limit` bytes; `what` names the file in
    errors. Example: read_bytes(folder / "config.json", folder, 1 << 20, "config").

    Raises SurgeryError (one line naming the file) for a link out of `root`, a non-regular file, an open/stat/read
    error, or a file over `limit` (checked before reading and again after, in case it grew).
    """
    fd = open_regular(path, root, what)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise SurgeryError(f"{path} is {size:,} bytes, over the {limit:,}-byte limit for a {what}; it is not a "
                               "real checkpoint file, restore it from the original checkpoint")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise SurgeryError(os_error_message(e, path, "read")) from None
    if len(data) > limit:  # grew while we read it
        raise SurgeryError(f"{path} is over the {limit:,}-byte limit for a {what}; restore it from the original")
    return data


def read_text(path: Path, root: Path, limit: int = MAX_SMALL_FILE_BYTES, what: str = "file") -> str:
    """The content of `path` inside `root` as a str, decoded as UTF-8 with a leading BOM dropped.

    Example: read_text(folder / "README.md", folder, what="model card"). Raises SurgeryError for everything
    `read_bytes` refuses, and for bytes that are not UTF-8 (naming the offending byte).
    """
    data = read_bytes(path, root, limit, what)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # editors on Windows add a BOM; it carries no content
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SurgeryError(f"{path} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x}); convert it, e.g. "
                           f"`iconv -f latin1 -t utf-8`, and rerun") from None


def json_too_deep(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `value` nests deeper than `limit`; iterative, so the check itself cannot overflow the stack."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def load_json(path: Path, root: Path, limit: int = MAX_SMALL_FILE_BYTES, what: str = "file") -> dict:
    """Parse `path` inside `root` as a JSON object and return it as a dict.

    Example: load_json(folder / "config.json", folder, what="config").get("num_hidden_layers").
    Raises SurgeryError for everything `read_text` refuses, invalid JSON (with line and column), nesting deeper than
    MAX_JSON_DEPTH, or a top-level value that is not an object.
    """
    text = read_text(path, root, limit, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SurgeryError(f"{path}: cannot read JSON ({e.msg} at line {e.lineno} column {e.colno}); restore the "
                           "file from the original checkpoint") from None
    except RecursionError:
        raise SurgeryError(f"{path}: JSON nested too deeply to be a real {what}; restore the file from the original "
                           "checkpoint") from None
    if json_too_deep(data):
        raise SurgeryError(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels, which no real {what} does; "
                           "restore the file from the original checkpoint")
    if not isinstance(data, dict):
        raise SurgeryError(f"{path}: expected a JSON object; restore the file from the original checkpoint")
    return data


# ----------------------------------------------------------------------------------------------------------------
# Layer numbers

# ASCII only: int() also takes '1_0', ' 7 ' and Arabic-Indic digits, none of which a user means as a layer number.


def parse_layers(layers: Union[str, Iterable[int]], num_layers: int) -> list[int]:
    """config_surgery.parse_layers, refusing as a SurgeryError like everything else the cut refuses."""
    try:
        return config_surgery.parse_layers(layers, num_layers)
    except config_surgery.ConfigSurgeryError as e:
        raise SurgeryError(str(e)) from None


def check_tensor_names(names: Iterable[str], where: Path) -> None:
    """Refuse layer numbers a rename cannot handle consistently: non-ASCII digits (str.isdigit() and the regex
    engine accept them, the renamer's arithmetic does not) and zero padding (`layers.00` and `layers.0` are the same
    layer to int(), so a cut produced a header with one name twice)."""
    for name in names:
        for part in name.split("."):
            if not part.isdigit():
                continue
            if not part.isascii():
                raise SurgeryError(f"{where}: tensor {quote(name)} has a non-ASCII number {quote(part)}; layer "
                                   "numbers must be ASCII decimal. Re-save the checkpoint with standard names")
            if len(part) > 1 and part[0] == "0":
                raise SurgeryError(f"{where}: tensor {quote(name)} has a zero-padded number {quote(part)}; rename the "
                                   "tensors to unpadded layer numbers (e.g. layers.0) before cutting")


# ----------------------------------------------------------------------------------------------------------------
# Journal schema

_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)
_HEX32 = re.compile(r"[0-9a-f]{32}", re.ASCII)
SHARD_KINDS = ("header", "compact", "drop", "collapse")


def plain_shard_name(name: object) -> bool:
    """A file name directly inside the folder that can only be a shard: no separators, no '..', not absolute, not
    hidden, and ending in .safetensors, so a journal can never name config.json, the journal, or anything else."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and name.endswith(".safetensors") and
            not name.startswith(".") and "/" not in name and "\\" not in name and "\0" not in name and
            name.isprintable())


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _pairs(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 and all(map(_is_uint, p))
                                           for p in value)


class JournalError(SurgeryError):
    """Why a cut journal fails its schema or does not belong to this folder and run; the message is the bare reason.

    A SurgeryError, but meant to be caught: the cut rewraps it into one SurgeryError that names the journal file
    and says how to recover.
    """

    pass


def validate_plan_dict(d: object, shard_fields: tuple[str, ...], plan_fields: tuple[str, ...]) -> None:
    """Strict schema of a journal's plan: exact keys, exact types, plain shard names. Raises JournalError(reason)."""

    def bad(why: str) -> None:
        raise JournalError(why)

    if not isinstance(d, dict) or set(d) != set(plan_fields):
        bad("the plan does not have the expected fields")
    removed, num_layers = d["removed"], d["num_layers"]
    if not _is_uint(num_layers) or num_layers < 2:
        bad("num_layers is not a layer count")
    if not isinstance(removed, list) or not removed or not all(map(_is_uint, removed)) or \
            removed != sorted(set(removed)) or removed[-1] >= num_layers or len(removed) >= num_layers:
        bad("removed is not a sorted list of distinct layer indices")
    mapping = d["mapping"]
    # Length first: it bounds the rebuild below by what the journal itself holds, whatever num_layers claims.
    if not isinstance(mapping, dict) or len(mapping) != num_layers - len(removed):
        bad("mapping does not match removed and num_layers")
    gone = set(removed)
    expected = {str(old): new for new, old in enumerate(i for i in range(num_layers) if i not in gone)}
    if mapping != expected:
        bad("mapping does not match removed and num_layers")
    if not isinstance(d["prefix"], str) or not isinstance(d["sharded"], bool):
        bad("prefix or sharded has the wrong type")
    if not (d["index_text"] is None if not d["sharded"] else isinstance(d["index_text"], str)):
        bad("index_text does not match sharded")
    for key in ("config_text", "model_card_text", "cut_id"):
        if not isinstance(d[key], str):
            bad(f"{key} is not a string")
    if not _HEX64.fullmatch(d["cut_id"]):
        bad("cut_id is not a sha256")
    if not _is_uint(d["kept_bytes"]):
        bad("kept_bytes is not a byte count")
    shards = d["shards"]
    if not isinstance(shards, list) or not shards:
        bad("shards is not a list")
    sources, targets = set(), set()
    for s in shards:
        if not isinstance(s, dict) or set(s) != set(shard_fields):
            bad("a shard does not have the expected fields")
        if s["kind"] not in SHARD_KINDS:
            bad(f"shard kind {quote(s['kind'])} is unknown")
        if not plain_shard_name(s["source"]) or s["source"] in sources:
            bad(f"shard source {quote(s['source'])} is not a plain shard file name in the folder")
        sources.add(s["source"])
        if s["kind"] == "drop":
            if s["target"] is not None:
                bad("a dropped shard has a target")
        elif not plain_shard_name(s["target"]) or s["target"] in targets:
            bad(f"shard target {quote(s['target'])} is not a plain shard file name in the folder")
        targets.add(s["target"])
        if not isinstance(s["header"], str):
            bad("a shard header is not a string")
        for key in ("old_header_len", "final_size", "source_size"):
            if not _is_uint(s[key]):
                bad(f"shard {key} is not a byte count")
        for key in ("runs", "holes"):
            if not _pairs(s[key]):
                bad(f"shard {key} is not a list of [offset, length] pairs")
        if not (isinstance(s["old_header_sha256"], str) and _HEX64.fullmatch(s["old_header_sha256"])):
            bad("a shard's old_header_sha256 is not a sha256")
        if not (isinstance(s["new_header_sha256"], str) and
                (_HEX64.fullmatch(s["new_header_sha256"]) or (s["kind"] == "drop" and not s["new_header_sha256"]))):
            bad("a shard's new_header_sha256 is not a sha256")
    kept = d["kept_tensors"]
    if not isinstance(kept, list):
        bad("kept_tensors is not a list")
    for t in kept:
        if not (isinstance(t, list) and len(t) == 6 and t[0] in sources and t[2] in targets and
                isinstance(t[1], str) and isinstance(t[3], str) and _is_uint(t[4]) and _is_uint(t[5])):
            bad("a kept_tensors entry is malformed")
    digests = d["tensor_digests"]
    if digests is not None:
        if not isinstance(digests, dict) or not all(
                isinstance(v, list) and len(v) == 2 and v[0] in targets and isinstance(v[1], str) and
                _HEX64.fullmatch(v[1]) for v in digests.values()):
            bad("tensor_digests is malformed")


def validate_journal_envelope(doc: dict, version: int, folder: os.stat_result) -> None:
    """The fields that bind a journal to this folder and this run; raises JournalError(reason)."""
    keys = {"version", "run_id", "folder", "plan_sha256", "body_sha256", "plan"}
    if set(doc) != keys:
        if "version" in doc and doc.get("version") != version:
            raise JournalError(f"it is version {quote(doc.get('version'))}, this tool writes version {version}")
        raise JournalError("it does not have the expected fields")
    if doc["version"] != version:
        raise JournalError(f"it is version {quote(doc['version'])}, this tool writes version {version}")
    if not (isinstance(doc["run_id"], str) and _HEX32.fullmatch(doc["run_id"])):
        raise JournalError("its run id is malformed")
    f = doc["folder"]
    if not (isinstance(f, dict) and set(f) == {"dev", "ino"} and _is_uint(f["dev"]) and _is_uint(f["ino"])):
        raise JournalError("its folder identity is malformed")
    if (f["dev"], f["ino"]) != (folder.st_dev, folder.st_ino):
        raise JournalError("it was written for another folder (device/inode differ), e.g. it came with a download "
                           "or a copy")
    for key in ("plan_sha256", "body_sha256"):
        if not (isinstance(doc[key], str) and _HEX64.fullmatch(doc[key])):
            raise JournalError(f"its {key} is not a sha256")
