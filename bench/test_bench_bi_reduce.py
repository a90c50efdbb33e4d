"""pytest-benchmark view of the BI reduction. The project's addopts disable benchmarks, so run:

    python -m pytest bench/test_bench_bi_reduce.py --benchmark-enable -p no:xdist

Each benchmark's extra_info carries GB/s (bytes of both inputs / mean time), so the saved JSON compares across
machines. bench/bench_bi_reduce.py measures the same methods interleaved, with ratios to the read ceiling.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from shortgpt_fast.ops import bi_reduce as bi

SHAPES = [(2048, 576), (8192, 4096)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(tokens, hidden, dtype, device="cpu"):
    gen = torch.Generator(device=device).manual_seed(0)
    x_in = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype)
    x_out = (x_in.float() + 0.5 * torch.randn(tokens, hidden, generator=gen, device=device)).to(dtype)
    return x_in, x_out


def _record(benchmark, nbytes):
    benchmark.extra_info["bytes"] = nbytes
    if benchmark.stats is not None:  # None when benchmarks are disabled (one plain call)
        benchmark.extra_info["gb_per_s"] = nbytes / benchmark.stats.stats.mean / 1e9


def _cpu_methods():
    methods = {
        "torch_backend": lambda x_in, x_out: bi.torch_backend(bi.validate(x_in, x_out, None, None, None)),
        "cosine_similarity": lambda x_in, x_out: 1 - F.cosine_similarity(x_in, x_out, dim=-1).mean(),
    }
    from shortgpt_fast.ops.bi_reduce import cpp as bi_reduce_cpp

    if bi_reduce_cpp._EXTENSION_PROBLEM is None:
        methods["cpp"] = lambda x_in, x_out: bi_reduce_cpp.run(bi.validate(x_in, x_out, None, None, None))
    return methods


@pytest.mark.parametrize("method", sorted(_cpu_methods()))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("tokens,hidden", SHAPES, ids=lambda v: str(v))
def test_bench_cpu(benchmark, method, dtype, tokens, hidden):
    x_in, x_out = _inputs(tokens, hidden, DTYPES[dtype])
    benchmark.group = f"cpu {tokens}x{hidden} {dtype}"
    benchmark(_cpu_methods()[method], x_in, x_out)
    _record(benchmark, 2 * x_in.numel() * x_in.element_size())


@pytest.mark.parametrize("tokens,hidden", SHAPES, ids=lambda v: str(v))
def test_bench_cpu_read_ceiling(benchmark, tokens, hidden):
    """fp32 sum over the bytes of two bf16 inputs: the read-bandwidth ceiling the kernel is compared with."""
    nbytes = 2 * tokens * hidden * 2
    data = torch.randn(nbytes // 4)
    benchmark.group = f"cpu {tokens}x{hidden} bf16"
    benchmark(data.sum)
    _record(benchmark, nbytes)


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a GPU and compiled Triton")
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("tokens,hidden", SHAPES + [(32768, 8192)], ids=lambda v: str(v))
def test_bench_triton(benchmark, dtype, tokens, hidden):
    from shortgpt_fast.ops.bi_reduce import triton_kernel as bi_reduce_triton

    x_in, x_out = _inputs(tokens, hidden, DTYPES[dtype], device="cuda")
    inputs = bi.validate(x_in, x_out, None, None, None)

    def synced():
        bi_reduce_triton.run(inputs)
        torch.cuda.synchronize()

    benchmark.group = f"cuda {tokens}x{hidden} {dtype}"
    benchmark(synced)
    _record(benchmark, 2 * x_in.numel() * x_in.element_size())
