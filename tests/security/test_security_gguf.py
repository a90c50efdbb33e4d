"""The GGUF cut against hostile files (docs/security.md): every malformed header is refused in one line naming the
file and the problem, quickly and without allocating what the file claims, and nothing is written.

Files are hand-encoded with struct (a few hundred bytes each), so the cases need neither torch nor gguf-py.
"""
from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest

from shortgpt_fast import _native
from shortgpt_fast.io.gguf import GGUFError, read_header
from shortgpt_fast.surgery.gguf_cut import cut_gguf
from shortgpt_fast.surgery.untrusted import SurgeryError

if not hasattr(_native.load("GGUF security tests"), "gguf_read"):
    pytest.skip("the extension was built without the GGUF engine", allow_module_level=True)

U32, STRING, ARRAY, BOOL, F32T = 4, 8, 9, 7, 6


def s(text) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key, vtype, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tensor_info(name, dims, ggml_type, offset) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", ggml_type, offset)


def gguf(kvs=None, tensors=None, data=None, version=3, magic=b"GGUF", n_kv=None, n_tensors=None, pad=True) -> bytes:
    """A model GGUF: llama, 2 blocks of one F32 vector of 8 floats each, unless parts are given."""
    if kvs is None:
        kvs = [kv("general.architecture", STRING, s("llama")), kv("llama.block_count", U32, struct.pack("<I", 2))]
    if tensors is None:
        tensors = [tensor_info("blk.0.attn_norm.weight", [8], 0, 0), tensor_info("blk.1.attn_norm.weight", [8], 0, 32)]
    if data is None:
        data = bytes(64)
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors)
    if pad:
        head += bytes(-len(head) % 32)
    return head + data


CASES = {
    "bad magic": (gguf(magic=b"GGUG"), "GGUF magic"),
    "version 1": (gguf(version=1), "version 1"),
    "version 4": (gguf(version=4), "version 4"),
    "huge tensor count": (gguf(n_tensors=2**62), "more than the file can hold"),
    "huge kv count": (gguf(n_kv=2**40), "more than the file can hold"),
    "string length past EOF": (gguf(kvs=[s("general.architecture") + struct.pack("<I", STRING) +
                                         struct.pack("<Q", 2**60)]), "remain in the file"),
    "array count past EOF": (gguf(kvs=[kv("x.arr", ARRAY, struct.pack("<IQ", U32, 2**61))]), "elements"),
    "nested array bomb": (gguf(kvs=[kv("x.arr", ARRAY, struct.pack("<IQ", ARRAY, 1) +
                                       struct.pack("<IQ", ARRAY, 1) * 10000)]), "array of arrays"),
    "unknown kv type": (gguf(kvs=[kv("x.y", 77, b"")]), "unknown value type 77"),
    "unknown array element type": (gguf(kvs=[kv("x.arr", ARRAY, struct.pack("<IQ", 99, 0))]), "element type 99"),
    "bool not 0/1": (gguf(kvs=[kv("x.flag", BOOL, b"\x07")]), "not 0 or 1"),
    "duplicate key": (gguf(kvs=[kv("a.b", U32, bytes(4)), kv("a.b", U32, bytes(4))]), "duplicate metadata key"),
    "control char in key": (gguf(kvs=[kv("a.\x1b[2Jb", U32, bytes(4))]), "control characters"),
    "alignment not power of 2": (gguf(kvs=[kv("general.alignment", U32, struct.pack("<I", 24))]), "power of 2"),
    "alignment wrong type": (gguf(kvs=[kv("general.alignment", F32T, struct.pack("<f", 32))]), "must be a u32"),
    "unknown tensor type": (gguf(tensors=[tensor_info("t", [8], 31, 0)], data=bytes(32)), "unknown or removed"),
    "five dims": (gguf(tensors=[tensor_info("t", [1, 1, 1, 1, 8], 0, 0)], data=bytes(32)), "1 to 4"),
    "row not whole blocks": (gguf(tensors=[tensor_info("t", [30], 8, 0)], data=bytes(64)), "block size"),
    "element overflow": (gguf(tensors=[tensor_info("t", [2**40, 2**40], 0, 0)], data=bytes(32)), "int64"),
    "overlapping tensors": (gguf(tensors=[tensor_info("a", [8], 0, 0), tensor_info("b", [8], 0, 0)]), "overlaps"),
    "gap between tensors": (gguf(tensors=[tensor_info("a", [8], 0, 0), tensor_info("b", [8], 0, 64)],
                                 data=bytes(96)), "gap"),
    "misaligned offset": (gguf(tensors=[tensor_info("a", [8], 0, 0), tensor_info("b", [8], 0, 33)]), "alignment"),
    "tensor past EOF": (gguf(data=bytes(40)), "truncated"),
    "trailing bytes": (gguf(data=bytes(64 + 7)), "trailing bytes"),
    "control char in tensor name": (gguf(tensors=[tensor_info("blk.0.\nx", [8], 0, 0)], data=bytes(32)),
                                    "control characters"),
    "name too long for llama.cpp": (gguf(tensors=[tensor_info("t" * 64, [8], 0, 0)], data=bytes(32)), "bytes"),
    "duplicate tensor": (gguf(tensors=[tensor_info("a", [8], 0, 0), tensor_info("a", [8], 0, 32)]), "duplicate"),
    "truncated header": (gguf()[:40], "more than the file can hold"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_gguf_refused_in_one_line(tmp_path, case):
    data, expected = CASES[case]
    src = tmp_path / "m.gguf"
    src.write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(SurgeryError) as info:
        cut_gguf(src, "0", out=tmp_path / "out.gguf")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message
    assert str(src) in message and expected in message, message
    assert not (tmp_path / "out.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    with pytest.raises(GGUFError):
        read_header(src)


def test_valid_hand_written_file_is_read(tmp_path):
    """The baseline the cases corrupt is itself valid, so each case fails for the reason it names."""
    src = tmp_path / "m.gguf"
    src.write_bytes(gguf())
    header = read_header(src)
    assert [t.name for t in header.tensors] == ["blk.0.attn_norm.weight", "blk.1.attn_norm.weight"]
    cut_gguf(src, "0", out=tmp_path / "out.gguf")
    assert read_header(tmp_path / "out.gguf").tensors[0].name == "blk.0.attn_norm.weight"


def test_block_beyond_block_count_refused(tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(gguf(tensors=[tensor_info("blk.0.a", [8], 0, 0), tensor_info("blk.9.a", [8], 0, 32)]))
    with pytest.raises(SurgeryError, match="block 9 but block_count is 2"):
        cut_gguf(src, "0", out=tmp_path / "out.gguf")


def test_symlink_fifo_and_folder_sources_refused(tmp_path):
    real = tmp_path / "real.gguf"
    real.write_bytes(gguf())
    (tmp_path / "link.gguf").symlink_to(real)
    os.mkfifo(tmp_path / "fifo.gguf")
    (tmp_path / "dir.gguf").mkdir()
    for name in ("link.gguf", "fifo.gguf", "dir.gguf"):
        with pytest.raises(SurgeryError, match="not a regular"):
            cut_gguf(tmp_path / name, "0", out=tmp_path / f"out-{name}")


def test_foreign_journal_refused(tmp_path):
    """A journal that came with a download (another folder's identity) is never replayed."""
    import json

    src = tmp_path / "m.gguf"
    src.write_bytes(gguf())
    journal = tmp_path / ".m.gguf.shortgpt-cut-journal.json"
    journal.write_text(json.dumps({"version": 1, "run_id": "0" * 32, "folder": {"dev": 1, "ino": 2},
                                   "plan_sha256": "0" * 64, "body_sha256": "0" * 64, "plan": {}}))
    before = src.read_bytes()
    with pytest.raises(SurgeryError, match="not a GGUF cut journal this tool wrote"):
        cut_gguf(src, "0", in_place=True)
    assert src.read_bytes() == before


def test_output_path_never_followed(tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(gguf())
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "out.gguf").symlink_to(victim)
    with pytest.raises(SurgeryError, match="already exists"):
        cut_gguf(src, "0", out=tmp_path / "out.gguf")
    assert victim.read_text() == "precious"


def test_refusals_are_quick_on_a_large_sparse_file(tmp_path: Path):
    """Counts are checked against the bytes actually present before any loop or allocation."""
    src = tmp_path / "m.gguf"
    with open(src, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 60000) + kv("x", U32, bytes(4)))
        f.truncate(1 << 30)  # sparse: 1 GiB of zeros, each read as an empty key
    start = time.perf_counter()
    with pytest.raises(SurgeryError, match="empty key"):
        cut_gguf(src, "0", out=tmp_path / "out.gguf")
    assert time.perf_counter() - start < 5
