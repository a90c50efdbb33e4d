"""gguf-py's own dequantization: the reference the C++ kernel is held to, and the path for every other type."""
from __future__ import annotations

import numpy as np


def gguf_dequantize_reference(raw: np.ndarray, ggml_type: int, shape: tuple) -> np.ndarray:
    """float32 array of `shape` from the stored bytes of a tensor of `ggml_type`, by gguf.quants.dequantize."""
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.constants import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    qtype = Q(ggml_type)
    block, size = GGML_QUANT_SIZES[qtype]
    stored = np.asarray(raw, dtype=np.uint8).reshape(*shape[:-1], shape[-1] // block * size)
    return np.asarray(dequantize(stored, qtype), dtype=np.float32).reshape(shape)
