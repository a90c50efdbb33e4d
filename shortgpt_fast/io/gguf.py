"""The one GGUF header reader: metadata, tensor infos and split sets, validated by the C++ engine.

GGUF (llama.cpp's format) is a header of typed key/values and tensor infos followed by the tensors, each padded to
`general.alignment`. The parser in shortgpt_fast._C (csrc/gguf/) refuses every malformed file with one line naming
the file and the problem (huge counts, lengths past the end, unknown types, nested arrays, misaligned, overlapping
or gapped tensors, names with control characters, trailing bytes). Tensor data is never read here.

A split set (`NAME-00001-of-00003.gguf` ...) is checked as a whole: every part present, each part's `split.no` its
position, `split.count` and `split.tensors.count` the same in every part and the tensor counts adding up.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .. import _native
from ..errors import ShortGPTError, quote

_C = _native.LazyExtension("GGUF reading", needs="gguf_read")

# GGUF value types (gguf-py's GGUFValueType numbering, which the file format fixes).
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
INTEGER_TYPES = (U8, I8, U16, I16, U32, I32, U64, I64)

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
_SPLIT_NAME = re.compile(r"^(?P<base>.+)-(?P<no>[0-9]{5})-of-(?P<count>[0-9]{5})\.gguf$", re.ASCII)


class GGUFError(ShortGPTError):
    """A GGUF file or split set is malformed or incomplete; the message is one line naming the file."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    type: int
    elem_type: int
    count: int
    value: Any  # scalars; arrays decoded as lists when short and not strings, else None
    record: tuple[int, int]  # [begin, end) of the whole record in the file


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is contiguous
    ggml_type: int
    offset: int  # relative to the data section
    nbytes: int  # without alignment padding


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    alignment: int
    file_size: int
    header_end: int
    data_start: int
    data_size: int
    kvs: dict[str, KeyValue]  # in file order
    tensors: list[TensorInfo]  # in file (= data) order

    def get(self, key: str, default: Any = None) -> Any:
        kv = self.kvs.get(key)
        return default if kv is None else kv.value

    @property
    def architecture(self) -> Optional[str]:
        arch = self.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def padded(self, nbytes: int) -> int:
        return -(-nbytes // self.alignment) * self.alignment


def read_header(path: Union[str, os.PathLike]) -> GGUFHeader:
    """Parse and validate one GGUF file's header; GGUFError (one line) when it is malformed or unreadable."""
    path = Path(path)
    try:
        d = _C.gguf_read(str(path))
    except ValueError as err:  # _C.GgufFormatError: "path: what is wrong"
        raise GGUFError(f"{err}; the file is not a valid GGUF (re-download or re-convert it)") from None
    except OSError as err:
        raise GGUFError(f"cannot read {path}: {err.strerror or err}") from None
    kvs = {k: KeyValue(k, t, et, n, v, (b, e)) for k, t, et, n, v, b, e in d["kvs"]}
    tensors = [TensorInfo(n, tuple(dims), t, off, nb) for n, dims, t, off, nb in d["tensors"]]
    return GGUFHeader(path, d["version"], d["alignment"], d["file_size"], d["header_end"], d["data_start"],
                      d["data_size"], kvs, tensors)


def split_base_name(path: Union[str, os.PathLike]) -> str:
    """The model's name without `.gguf` or a split set's `-0000k-of-0000N` (NAME for NAME-00001-of-00003.gguf)."""
    path = Path(path)
    m = _SPLIT_NAME.match(path.name)
    return m.group("base") if m else path.name[: -len(path.suffix)] if path.suffix else path.name


def split_parts(path: Union[str, os.PathLike]) -> list[Path]:
    """The files of the model `path` belongs to: [path] for a single file, every part in order for a split set
    (any part may be given). Refuses a set with a missing part; the parts' headers are checked by read_set."""
    path = Path(path)
    m = _SPLIT_NAME.match(path.name)
    if not m:
        return [path]
    count = int(m.group("count"))
    if count < 1 or not 1 <= int(m.group("no")) <= count:
        raise GGUFError(f"{path}: split name says part {m.group('no')} of {m.group('count')}, which is impossible")
    parts = [path.with_name(f"{m.group('base')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise GGUFError(f"split set {quote(m.group('base'))} is missing {', '.join(missing)} in {path.parent}; put "
                        "every part in the same folder")
    return parts


def read_set(path: Union[str, os.PathLike]) -> list[GGUFHeader]:
    """Headers of every file of the model at `path` (one, or each part of a split set), checked for consistency."""
    parts = split_parts(path)
    headers = [read_header(p) for p in parts]
    if len(headers) == 1 and SPLIT_COUNT not in headers[0].kvs:
        return headers
    total = sum(len(h.tensors) for h in headers)
    for i, h in enumerate(headers):
        no, count, tensors = h.get(SPLIT_NO), h.get(SPLIT_COUNT), h.get(SPLIT_TENSORS)
        if no != i or count != len(headers) or tensors != total:
            raise GGUFError(
                f"{h.path}: split metadata (split.no={quote(no)}, split.count={quote(count)}, split.tensors.count="
                f"{quote(tensors)}) does not match its place in the set (part {i} of {len(headers)}, {total} tensors "
                "in all); the set mixes parts of different models or a part was altered")
    arch = headers[0].architecture
    for h in headers[1:]:
        other = h.get("general.architecture")
        if other is not None and other != arch:
            raise GGUFError(f"{h.path}: architecture {quote(other)} differs from the first part's {quote(arch)}; the "
                            "set mixes parts of different models")
    names: set[str] = set()
    for h in headers:
        for t in h.tensors:
            if t.name in names:
                raise GGUFError(f"{h.path}: tensor {quote(t.name)} is also in another part; the set mixes parts")
            names.add(t.name)
    return headers
