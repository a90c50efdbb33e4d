"""The C++ GGUF block dequantization equals gguf-py's to the bit, on random bytes (NaN payloads and subnormal halves
included), odd block counts and any thread count; other types go to gguf-py."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gguf")
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.constants import GGMLQuantizationType as Q  # noqa: E402

from shortgpt_fast.ops.dequant_gguf import (  # noqa: E402
    gguf_dequantize,
    gguf_dequantize_reference,
    why_not_native,
)

NATIVE = (Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K)
pytestmark = pytest.mark.skipif(bool(why_not_native(int(Q.Q4_K))), reason="the extension lacks the GGUF kernel")


def random_tensor(qtype: Q, rows: int, blocks_per_row: int, seed: int) -> tuple[np.ndarray, tuple]:
    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(seed).integers(0, 256, size=rows * blocks_per_row * size, dtype=np.uint8)
    return raw, (rows, blocks_per_row * block)


@pytest.mark.parametrize("qtype", NATIVE, ids=lambda q: q.name)
@pytest.mark.parametrize("rows, blocks_per_row", [(1, 1), (3, 7), (37, 5)])
def test_every_native_type_equals_gguf_py_bit_for_bit(qtype, rows, blocks_per_row):
    assert not why_not_native(int(qtype))
    raw, shape = random_tensor(qtype, rows, blocks_per_row, seed=rows * 31 + blocks_per_row)
    with np.errstate(all="ignore"):  # random bytes make NaN scales, on which gguf-py's numpy warns
        expected = gguf_dequantize_reference(raw, int(qtype), shape)
    got = gguf_dequantize(raw, int(qtype), shape)
    assert got.dtype == np.float32 and got.shape == shape
    assert np.array_equal(got.view(np.int32), expected.view(np.int32))


def test_thread_counts_give_the_same_bits():
    raw, shape = random_tensor(Q.Q6_K, 64, 9, seed=2)
    one = gguf_dequantize(raw, int(Q.Q6_K), shape, num_threads=1)
    for threads in (2, 3):
        assert np.array_equal(gguf_dequantize(raw, int(Q.Q6_K), shape, num_threads=threads).view(np.int32),
                              one.view(np.int32))


def test_other_types_go_to_gguf_py_and_bad_sizes_are_refused():
    assert "not one the C++ kernel decodes" in why_not_native(int(Q.Q5_K))[0]
    raw, shape = random_tensor(Q.Q5_K, 2, 3, seed=4)
    with np.errstate(all="ignore"):
        assert np.array_equal(gguf_dequantize(raw, int(Q.Q5_K), shape).view(np.int32),
                              gguf_dequantize_reference(raw, int(Q.Q5_K), shape).view(np.int32))
    raw, shape = random_tensor(Q.Q4_K, 2, 3, seed=5)
    with pytest.raises(ValueError, match="are not 768 elements of ggml type 12"):
        gguf_dequantize(raw[:-1], int(Q.Q4_K), (1, 768))
