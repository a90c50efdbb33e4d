"""The one safetensors reader: dtype sizes, one file's header, and a checkpoint folder's tensor -> shard map.

Streamed scoring (sizes and damage reports), the cut (every header it rewrites) and the CLI (tensor names) all read
checkpoints through here, so a dtype or a malformed header is judged the same way everywhere. Nothing here imports
torch: the cut runs without it.

Headers are parsed by the C++ reader in shortgpt_fast._C (csrc/safetensors_surgery.cpp) when it is importable: it is
the hardened one, written for untrusted files, and the cut needs it anyway. A pure-Python reader applying the same
rules stands in where the extension is missing (SHORTGPT_FAST_SKIP_CPP=1 installs) or has no surgery half (built off
Linux): streamed scoring only reads checkpoints, works with the torch backend alone, and must not need a compiler or
Linux. tests/io/test_io_safetensors.py runs both readers on the same good and damaged files and checks they agree.

Both readers bound memory by the header: its length is checked against MAX_HEADER_BYTES before a byte of it is read.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Optional, Union

from ..errors import ShortGPTError

# Bits per element of every dtype safetensors 0.8 defines (its Rust `Dtype` enum has these 22 variants). Sub-byte
# floats (F4 = float4_e2m1, F6_*) are packed: a tensor's bytes are elements * bits / 8, which must be whole.
# csrc/safetensors_surgery.cpp `dtype_bits` holds the same table for the C++ reader.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
# Real (not complex) floating dtypes: the ones a model loaded in another float dtype is cast to.
FLOAT_DTYPES = frozenset(d for d in DTYPE_BITS if d.startswith(("F", "BF")))
# The safetensors library refuses larger headers, so anything bigger is hostile or corrupt and is never allocated.
MAX_HEADER_BYTES = 100 * 1000 * 1000
# model.safetensors.index.json lists one line per tensor; the same ceiling keeps a hostile one from filling memory.
MAX_INDEX_BYTES = MAX_HEADER_BYTES
# Real headers nest three levels and no tensor has more dimensions than numpy allows; same caps as the C++ reader.
MAX_RANK = 64
MAX_DEPTH = 32

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"

PathLike = Union[str, os.PathLike]


class SafetensorsError(ShortGPTError):
    """A safetensors file or index is malformed or uses a dtype safetensors does not define; one line naming the file,
    the tensor and what is wrong."""


def dtype_bits(dtype: str, path: PathLike = "?", tensor: str = "?") -> int:
    """Bits per element of a safetensors dtype name; SafetensorsError naming the file and tensor when it is unknown."""
    bits = DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is None:
        raise SafetensorsError(_unknown_dtype_message(f"{_printable(str(path))}: tensor '{_printable(str(tensor))}': "
                                                      f"unknown dtype '{_printable(str(dtype))}'"))
    return bits


def tensor_nbytes(dtype: str, shape, path: PathLike = "?", tensor: str = "?") -> int:
    """Bytes a tensor of `dtype` and `shape` takes in a safetensors file (sub-byte dtypes packed)."""
    elements = 1
    for dim in shape:
        elements *= int(dim)
    bits = elements * dtype_bits(dtype, path, tensor)
    if bits % 8:
        raise SafetensorsError(f"{_printable(str(path))}: tensor '{_printable(str(tensor))}': shape does not fill "
                               f"whole bytes for dtype {dtype}")
    return bits // 8


def read_header(path: PathLike, engine: str = "auto") -> dict:
    """Parse and validate one safetensors file's header, reading at most MAX_HEADER_BYTES of it.

    Returns {header_len, file_size, data_start, metadata (dict or None), tensors: [(name, dtype, shape, begin, end)]
    sorted by data offset}; begin/end count from data_start. `engine`: "auto" (C++ when importable), "native" (the
    C++ reader or NativeExtensionError) or "python". Links are followed (Hugging Face caches link snapshots to blobs);
    the cut vets them before calling this. Raises SafetensorsError (one line naming the file, the tensor and the
    fault), or OSError when the file cannot be opened.

        >>> read_header("model.safetensors")["tensors"][0]
        ('model.embed_tokens.weight', 'BF16', (32000, 4096), 0, 262144000)
    """
    shown = str(path)
    real = os.path.realpath(shown)
    native = _native_reader(engine)
    if native is None:
        try:
            return _read_header_python(real)
        except SafetensorsError as err:
            raise SafetensorsError(str(err).replace(real, shown, 1)) from None
    try:
        header = native(real)
    except OSError:
        raise
    except ValueError as err:  # _C.SafetensorsFormatError: one line "path: what is wrong"
        message = str(err).replace(real, shown, 1)
        raise SafetensorsError(_unknown_dtype_message(message) if "unknown dtype" in message else message) from None
    header["tensors"] = [(n, d, tuple(s), b, e) for n, d, s, b, e in header["tensors"]]
    return header


def read_weight_map(folder: PathLike, engine: str = "auto") -> Optional[dict[str, str]]:
    """Tensor name -> shard file name of a checkpoint folder, from its index or its single file's header; None when
    the folder holds neither. A malformed index or header raises SafetensorsError."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.exists():
        with open(index, "rb") as fh:
            raw = fh.read(MAX_INDEX_BYTES + 1)
        if len(raw) > MAX_INDEX_BYTES:
            raise SafetensorsError(f"{index}: larger than the {MAX_INDEX_BYTES // 1000**2} MB an index may take; "
                                   "restore the index from the original checkpoint")
        try:
            weight_map = json.loads(raw).get("weight_map")
        except (ValueError, AttributeError, RecursionError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise SafetensorsError(f"{index}: no weight_map of tensor name -> shard file; restore the index from "
                                   "the original checkpoint")
        return weight_map
    single = folder / SINGLE_FILE_NAME
    if single.exists():
        return {t[0]: SINGLE_FILE_NAME for t in read_header(single, engine)["tensors"]}
    return None


# ---- internals ---------------------------------------------------------------------------------------------------

_NATIVE_UNSET = object()
_native_cache = _NATIVE_UNSET


def _native_reader(engine: str):
    """The C++ header reader, or None for the Python one."""
    global _native_cache
    if engine == "python":
        return None
    if engine not in ("auto", "native"):
        raise ValueError(f"engine must be 'auto', 'native' or 'python', not {engine!r}")
    from .. import _native

    if engine == "native":
        return _native.load("reading a safetensors header", _native.SURGERY_SYMBOL).safetensors_read_header
    if _native_cache is _NATIVE_UNSET:
        try:
            _native_cache = _native.load("reading a safetensors header",
                                         _native.SURGERY_SYMBOL).safetensors_read_header
        except _native.NativeExtensionError:
            _native_cache = None
    return _native_cache


def _unknown_dtype_message(message: str) -> str:
    return (f"{message}: not one of the {len(DTYPE_BITS)} dtypes safetensors defines, so its size is unknown; "
            "re-save the checkpoint with a standard dtype")


def _printable(text: str) -> str:
    """Control characters escaped, as the C++ reader does: names come from untrusted headers, errors are one line."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _read_exactly(fh, n: int, path: str) -> bytes:
    chunks, left = [], n
    while left:
        chunk = fh.read(left)
        if not chunk:
            raise SafetensorsError(f"{_printable(path)}: file ended while reading (truncated?)")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_header_python(path: str) -> dict:
    p = _printable(path)

    def fail(why: str):
        raise SafetensorsError(f"{p}: {why}")

    # O_NONBLOCK: opening a FIFO would otherwise wait for a writer; the type check refuses it before any read.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with open(fd, "rb", buffering=0) as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            fail("is not a regular file (a FIFO, device, socket or folder); refusing to open it")
        size = st.st_size
        if size < 8:
            fail(f"file is {size} bytes, too short for the 8-byte header length (truncated?)")
        n = int.from_bytes(_read_exactly(fh, 8, path), "little")
        if n > MAX_HEADER_BYTES:
            fail(f"header length {n} exceeds the 100 MB safetensors limit")
        if n > size - 8:
            fail(f"header length {n} runs past the end of the {size}-byte file (truncated?)")
        if n < 2:
            fail(f"header of {n} bytes cannot hold a JSON object")
        raw = _read_exactly(fh, n, path)

    if raw.startswith(b"\xef\xbb\xbf"):
        fail("header starts with a UTF-8 byte-order mark, which safetensors refuses; re-save the file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        fail(f"header is not valid UTF-8 (byte {err.start})")

    def pairs(items):
        out = {}
        for key, value in items:
            if key in out:
                fail(f"duplicate entry '{_printable(key)}' in header")
            out[key] = value
        return out

    def refuse_constant(name):
        fail(f"invalid JSON header: {name} is not JSON")

    try:
        parsed = json.loads(text, object_pairs_hook=pairs, parse_constant=refuse_constant)
    except RecursionError:
        fail(f"invalid JSON header: nesting deeper than {MAX_DEPTH}")
    except json.JSONDecodeError as err:
        fail(f"invalid JSON header at byte {err.pos}: {err.msg}")
    if not isinstance(parsed, dict):
        fail("header is not a JSON object")

    data_len = size - 8 - n
    metadata = None
    tensors = []
    for name, entry in parsed.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                fail("__metadata__ must be an object of strings")
            for key, value in entry.items():
                if not isinstance(value, str):
                    fail(f"__metadata__ value for '{_printable(key)}' is not a string")
            metadata = entry
            continue
        tensors.append(_check_tensor(name, entry, p, data_len))
    tensors.sort(key=lambda t: (t[3], t[4], t[0]))
    # In data order, as the C++ reader: a truncated file names the tensor the cut falls in; the tensors must tile the
    # data section exactly, without overlap, hole or trailing bytes (the safetensors library refuses the rest).
    expected, previous = 0, None
    for name, _dtype, _shape, begin, end in tensors:
        if begin < expected:
            fail(f"tensor '{_printable(name)}' overlaps tensor '{_printable(previous)}' (bytes {begin}..{expected})")
        if begin > expected:
            fail(f"hole of {begin - expected} bytes before tensor '{_printable(name)}' at data offset {expected}")
        if end > data_len:
            fail(f"tensor '{_printable(name)}': data_offsets end at {end} but the data section has {data_len} bytes "
                 "(truncated?)")
        expected, previous = end, name
    if expected != data_len:
        fail(f"{data_len - expected} trailing bytes after the last tensor; the safetensors reader refuses such files")
    return {"header_len": n, "file_size": size, "data_start": n + 8, "metadata": metadata, "tensors": tensors}


def _is_u64(value) -> bool:
    return type(value) is int and 0 <= value < 2**64


def _check_tensor(name: str, entry, p: str, data_len: int) -> tuple:
    def fail(why: str):
        raise SafetensorsError(f"{p}: tensor '{_printable(name)}': {why}")

    if not isinstance(entry, dict):
        fail("entry is not an object")
    for key in entry:
        if key not in ("dtype", "shape", "data_offsets"):
            # Unknown fields would be silently dropped by a rewrite, so refuse them instead.
            fail(f"unexpected or repeated field '{_printable(key)}'")
    if len(entry) != 3:
        fail("needs dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        fail("dtype is not a string")
    if not isinstance(shape, list):
        fail("shape is not a list")
    if len(shape) > MAX_RANK:
        fail(f"shape has more than {MAX_RANK} dimensions")
    if not all(_is_u64(d) for d in shape):
        fail("shape must hold non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2:
        fail("data_offsets must be [begin, end]")
    if not all(_is_u64(o) for o in offsets):
        fail("data_offsets must hold non-negative integers")
    begin, end = offsets
    bits = dtype_bits(dtype, p, name)  # an unknown dtype is refused by name, never guessed
    if begin > end:
        fail(f"data_offsets [{begin}, {end}] end before they begin")
    elements = 1
    for d in shape:
        elements *= d
    if elements >= 2**64:
        fail("shape overflows 64 bits")
    total_bits = elements * bits
    if total_bits >= 2**64 or total_bits % 8:
        fail(f"shape does not fill whole bytes for dtype {dtype}")
    # An end past the data section is reported as truncation, in data order, rather than as a size mismatch.
    if end <= data_len and total_bits // 8 != end - begin:
        fail(f"{dtype} shape needs {total_bits // 8} bytes but data_offsets span {end - begin}")
    return (name, dtype, tuple(shape), begin, end)
