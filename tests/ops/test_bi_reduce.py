"""Fused BI reduction: every backend against the float64 reference, under the flash-attention accuracy rule.

A kernel passes when, per output column, its error against the float64 reference is at most twice the error of
plain torch computing the same per-row terms in fp32 (the torch backend), plus a small atol. For bf16/fp16
inputs that baseline is stricter than torch arithmetic in bf16/fp16 would be. atol allows two fp32 ulps per
contributing row, random-walk style (2 * 2^-23 * sqrt(rows)): the per-row fp32 convention cannot do better.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from shortgpt_fast.ops import bi_reduce as bi
from shortgpt_fast.ops.bi_reduce import BACKEND_ENV, NUM_STATS, BIReduceError, bi_reduce, bi_reduce_reference

cpp = pytest.importorskip("shortgpt_fast.ops.bi_reduce.cpp")
HAVE_CPP = cpp._EXTENSION_PROBLEM is None
needs_cpp = pytest.mark.skipif(not HAVE_CPP, reason=f"C++ extension unavailable: {cpp._EXTENSION_PROBLEM}")

try:
    from shortgpt_fast.ops.bi_reduce import triton_kernel as tri

    HAVE_TRITON = tri._TRITON_PROBLEM is None
except ImportError:  # pragma: no cover
    tri, HAVE_TRITON = None, False
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cpu" if INTERPRETING else ("cuda" if torch.cuda.is_available() else None)
needs_triton = pytest.mark.skipif(not HAVE_TRITON or TRITON_DEVICE is None,
                                  reason="needs Triton, and a GPU or TRITON_INTERPRET=1")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HIDDEN = [1, 7, 333, 576, 4097, 8192]
TOKENS = [1, 63, 1000]
MASKS = ["all_one", "all_zero", "random"]
LAYOUTS = ["contiguous", "row_strided"]
FP32_ULP = 2.0 ** -23


def make_case(tokens, hidden, dtype, mask_kind, layout, seed=0, device="cpu"):
    """Correlated (residual-stream-like) inputs, several sequences, zero-norm rows, NaN in masked rows."""
    gen = torch.Generator().manual_seed(seed * 7919 + tokens * 31 + hidden)
    x_in = torch.randn(tokens, hidden, generator=gen)
    x_out = x_in + 0.5 * torch.randn(tokens, hidden, generator=gen)
    if tokens >= 63:
        x_in[5] = 0.0  # zero-norm input row: cos is defined as 0
        x_in[9] = 0.0
        x_out[9] = 0.0  # both zero: rel_magnitude is 0 / EPS = 0
        # (x_out = 0 with x_in != 0 gives |x_in| / EPS ~ 1e12, which would swamp the column's error budget;
        # test_zero_norm_rows_have_defined_values checks that case exactly.)
    if mask_kind == "all_one":
        mask = torch.ones(tokens, dtype=torch.bool)
    elif mask_kind == "all_zero":
        mask = torch.zeros(tokens, dtype=torch.bool)
    else:
        mask = torch.rand(tokens, generator=gen) > 0.3
        if tokens > 1:
            mask[-1] = False  # the last valid row is then not the last row
    x_in[~mask] = float("nan")
    x_out[~mask] = float("inf")
    if tokens >= 63:
        # three sequences plus an empty one in the middle and one at the end
        cut1, cut2 = tokens // 3, (2 * tokens) // 3
        seq_index = torch.zeros(tokens, dtype=torch.long)
        seq_index[cut1:cut2] = 2
        seq_index[cut2:] = 3
        num_seqs = 5
    else:
        seq_index, num_seqs = torch.zeros(tokens, dtype=torch.long), 1

    def place(x, pad):
        x = x.to(dtype)
        if layout == "contiguous":
            return x.to(device)
        wide = torch.full((tokens, hidden + pad), float("nan"), dtype=dtype)
        wide[:, :hidden] = x
        return wide.to(device)[:, :hidden]

    return place(x_in, 3), place(x_out, 5), mask.to(device), seq_index.to(device), num_seqs


_expected_cache = {}


def _reference_and_baseline(args):
    # Layouts share values, so the float64 reference (the slow part of this file) is computed once per values.
    key = tuple((t.dtype, tuple(t.shape), t.nan_to_num().double().sum().item()) if torch.is_tensor(t) else t
                for t in args)
    if key not in _expected_cache:
        if len(_expected_cache) > 4:
            _expected_cache.clear()
        _expected_cache[key] = (bi_reduce_reference(*args), bi.torch_backend(bi.validate(*args)))
    return _expected_cache[key]


def assert_accurate(got, x_in, x_out, mask, seq_index, num_seqs):
    got = got.cpu()
    assert got.shape == (num_seqs, NUM_STATS) and got.dtype == torch.float64
    if not mask.any():
        assert torch.equal(got, torch.zeros_like(got)), f"nothing is valid, yet:\n{got}"
        return
    args = (x_in.cpu().contiguous(), x_out.cpu().contiguous(), mask.cpu(), seq_index.cpu(), num_seqs)
    ref, baseline = _reference_and_baseline(args)
    assert torch.isfinite(got).all(), f"non-finite output (unwritten entry or NaN leak):\n{got}"
    assert torch.equal(got[:, 0], ref[:, 0]), "token counts differ"
    rows = ref[:, 0].clamp(min=1.0)
    for col in range(1, NUM_STATS):
        atol = 2 * FP32_ULP * (rows.sqrt() if col <= 3 else torch.ones_like(rows))
        err = (got[:, col] - ref[:, col]).abs()
        allowed = 2 * (baseline[:, col] - ref[:, col]).abs().max() + atol
        worst = int((err - allowed).argmax())
        assert (err <= allowed).all(), (
            f"column {bi.STAT_COLUMNS[col]}: seq {worst} error {err[worst]:.3e} > allowed {allowed[worst]:.3e} "
            f"(kernel {got[worst, col]!r}, reference {ref[worst, col]!r}, torch {baseline[worst, col]!r})"
        )


# ------------------------------------------------------------------------------------------------- C++ kernel


@needs_cpp
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_matches_reference(dtype, hidden, tokens, mask_kind, layout):
    case = make_case(tokens, hidden, dtype, mask_kind, layout)
    out = torch.full((case[4], NUM_STATS), float("nan"), dtype=torch.float64)  # catches unwritten entries
    got = cpp.bi_reduce_cpp(*case, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_accurate(got, *case)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [7, 333, 4097])
def test_cpp_portable_build_matches_reference(dtype, hidden):
    # The generic (no AVX) build is what a CPU without AVX2 runs; it must meet the same rule.
    case = make_case(63, hidden, dtype, "random", "row_strided")
    assert_accurate(cpp.bi_reduce_cpp(*case, isa="generic"), *case)


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [333, 8192])
def test_cpp_deterministic_across_threads_and_calls(dtype, hidden):
    case = make_case(1000, hidden, dtype, "random", "row_strided", seed=3)
    one = cpp.bi_reduce_cpp(*case, num_threads=1)
    two = cpp.bi_reduce_cpp(*case, num_threads=2)
    assert torch.equal(one, two)
    for _ in range(3):
        assert torch.equal(cpp.bi_reduce_cpp(*case, num_threads=2), one)
    assert torch.equal(cpp.bi_reduce_cpp(*case, num_threads=7), one)  # more threads than cores


@needs_cpp
def test_cpp_is_the_default_on_cpu(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    case = make_case(63, 333, torch.bfloat16, "random", "contiguous")
    assert bi.select_backend(bi.validate(*case)).name == "cpp"
    assert torch.equal(bi_reduce(*case), cpp.bi_reduce_cpp(*case, num_threads=torch.get_num_threads()))


@needs_cpp
def test_cpp_refuses_non_unit_inner_stride(monkeypatch):
    x = torch.randn(16, 8).t()  # inner stride 16
    assert any("inner stride" in r for r in cpp.not_supported_reasons(bi.validate(x, x.clone(), None, None, None)))
    monkeypatch.setenv(BACKEND_ENV, "cpp")
    with pytest.raises(BIReduceError, match="inner stride"):
        bi_reduce(x, x.clone())
    monkeypatch.delenv(BACKEND_ENV)
    assert_accurate(bi_reduce(x, x + 1), x, x + 1, torch.ones(8, dtype=torch.bool), torch.zeros(8, dtype=torch.long), 1)


@needs_cpp
def test_cpp_raw_entry_point_rejects_bad_arguments():
    from shortgpt_fast import _C

    x = torch.randn(4, 8)
    mask = torch.ones(4, dtype=torch.bool)
    out = torch.empty(1, NUM_STATS, dtype=torch.float64)
    good = dict(x_in=x.data_ptr(), in_row_stride=8, x_out=x.data_ptr(), out_row_stride=8, dtype=0, tokens=4,
                hidden=8, mask=mask.data_ptr(), num_seqs=1, out=out.data_ptr(), num_threads=2)
    offsets = torch.tensor([0, 4])
    _C.bi_reduce_cpu(seq_offsets=offsets.data_ptr(), **good)
    with pytest.raises(ValueError, match="dtype code"):
        _C.bi_reduce_cpu(seq_offsets=offsets.data_ptr(), **{**good, "dtype": 5})
    with pytest.raises(ValueError, match="hidden"):
        _C.bi_reduce_cpu(seq_offsets=offsets.data_ptr(), **{**good, "hidden": 0})
    with pytest.raises(ValueError, match="num_threads"):
        _C.bi_reduce_cpu(seq_offsets=offsets.data_ptr(), **{**good, "num_threads": 0})
    bad_offsets = torch.tensor([0, 9])
    with pytest.raises(ValueError, match="offsets"):
        _C.bi_reduce_cpu(seq_offsets=bad_offsets.data_ptr(), **good)
    missing = [isa for isa in ("avx512", "avx2") if isa not in _C.bi_reduce_isas()]
    for isa in missing:
        with pytest.raises(ValueError, match="cannot run"):
            _C.bi_reduce_cpu(seq_offsets=offsets.data_ptr(), isa=isa, **good)


def test_missing_extension_is_a_reason_not_an_import_error(monkeypatch):
    problem = "the C++ extension shortgpt_fast._C could not be imported (test); build it with pip install -e ."
    monkeypatch.setattr(cpp, "_EXTENSION_PROBLEM", problem)
    monkeypatch.setenv(BACKEND_ENV, "cpp")
    with pytest.raises(BIReduceError, match="could not be imported"):
        bi_reduce(torch.randn(3, 4), torch.randn(3, 4))
    monkeypatch.delenv(BACKEND_ENV)
    x = torch.randn(3, 4)
    assert bi.select_backend(bi.validate(x, x, None, None, None)).name == "torch"


@needs_cpp
def test_extension_and_torch_import_in_either_order():
    # torch ships its own libgomp; both load orders must give one working OpenMP runtime.
    snippet = (
        "import torch; from shortgpt_fast.ops.bi_reduce.cpp import bi_reduce_cpp; "
        "x = torch.randn(257, 333); y = x + 1; "
        "a = bi_reduce_cpp(x, y, num_threads=2); b = bi_reduce_cpp(x, y, num_threads=1); "
        "assert torch.equal(a, b) and a[0, 0] == 257, a; print('ok')"
    )
    for first in ("import shortgpt_fast._C", "import torch"):
        done = subprocess.run([sys.executable, "-c", f"{first}; {snippet}"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# ----------------------------------------------------------------------------------------------------- Triton

TRITON_CASES = [
    (torch.float32, 1, 7, "all_one", "contiguous"),
    (torch.float32, 63, 333, "random", "row_strided"),
    (torch.float32, 63, 1, "random", "contiguous"),
    (torch.bfloat16, 63, 333, "random", "contiguous"),
    (torch.bfloat16, 63, 576, "all_one", "row_strided"),
    (torch.bfloat16, 63, 7, "all_zero", "contiguous"),
    (torch.float16, 63, 333, "random", "row_strided"),
]


@needs_triton
@pytest.mark.parametrize("dtype,tokens,hidden,mask_kind,layout", TRITON_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_triton_matches_reference(dtype, tokens, hidden, mask_kind, layout):
    case = make_case(tokens, hidden, dtype, mask_kind, layout, device=TRITON_DEVICE)
    out = torch.full((case[4], NUM_STATS), float("nan"), dtype=torch.float64, device=TRITON_DEVICE)
    got = tri.run(bi.validate(*case), out=out)
    assert got.data_ptr() == out.data_ptr()
    assert_accurate(got, *case)


@needs_triton
def test_triton_angular_is_float64_accurate():
    # Two-element rows make the fp32 sums exact, so what is left is the kernel's own float64 arithmetic:
    # the sum of 65 angles (about 32) must agree to rounding. A constant bound to a local name once turned
    # fp32 in the acos here and cost 3e-8 per row.
    angle = torch.linspace(0, math.pi, 65, dtype=torch.float64)
    x_in = torch.zeros(65, 2)
    x_in[:, 0] = 1.0
    x_out = torch.stack([torch.cos(angle), torch.sin(angle)], 1).float()
    got = tri.run(bi.validate(x_in.to(TRITON_DEVICE), x_out.to(TRITON_DEVICE), None, None, None)).cpu()
    expected = bi.torch_backend(bi.validate(x_in, x_out, None, None, None))
    assert (got - expected).abs().max() <= 1e-13


COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from shortgpt_fast.ops.bi_reduce import triton_kernel as tri

row_sig = {"x_in_ptr": "*bf16", "x_out_ptr": "*bf16", "mask_ptr": "*i1", "terms_ptr": "*fp64", "tokens": "i32",
           "hidden": "i32", "in_row_stride": "i32", "in_col_stride": "i32", "out_row_stride": "i32",
           "out_col_stride": "i32", "EPS_": "constexpr", "BLOCK_ROWS": "constexpr", "LANES_": "constexpr",
           "LOG2_LANES": "constexpr"}
row_consts = {"EPS_": 1e-12, "BLOCK_ROWS": 4, "LANES_": tri.LANES, "LOG2_LANES": tri.LOG2_LANES}
seq_sig = {"terms_ptr": "*fp64", "mask_ptr": "*i1", "offsets_ptr": "*i64", "out_ptr": "*fp64",
           "SEQ_BLOCK_": "constexpr"}
seq_consts = {"SEQ_BLOCK_": tri.SEQ_BLOCK}
for fn, sig, consts in ((tri._bi_row_terms_kernel, row_sig, row_consts),
                        (tri._bi_seq_reduce_kernel, seq_sig, seq_consts)):
    ptx = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 4}).asm["ptx"]
    assert "atom." not in ptx, fn
print("ok")
"""


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")
def test_triton_kernels_compile_for_hopper_without_a_gpu():
    # The interpreter never lowers to PTX, so this is the one CPU-side check of the compiled path (reshape
    # trees, fp64 math, bool masks); stage 2 must reduce without atomics. A subprocess, because the
    # interpreter flag is fixed when the kernels are defined.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], capture_output=True, text=True, env=env,
                          timeout=300)
    if done.returncode != 0 and "ptxas" in done.stderr and "No such file" in done.stderr:
        pytest.skip("this Triton install has no ptxas")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@needs_triton
@pytest.mark.skipif(INTERPRETING, reason="large shapes only when compiled on a GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [4097, 8192])
def test_triton_large_on_gpu(dtype, hidden):
    case = make_case(1000, hidden, dtype, "random", "row_strided", device="cuda")
    first = tri.run(bi.validate(*case))
    assert_accurate(first, *case)
    fixed = tri.run(bi.validate(*case), autotune=False)
    assert torch.equal(first, fixed), "autotuned and fixed configs must give the same bits"
    assert torch.equal(tri.run(bi.validate(*case)), first)


@needs_triton
def test_triton_deterministic_and_forced_by_env(monkeypatch):
    case = make_case(63, 333, torch.bfloat16, "random", "contiguous", device=TRITON_DEVICE)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    first = bi_reduce(*case)
    assert torch.equal(tri.run(bi.validate(*case)), first)


@needs_triton
@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="about CPU tensors")
def test_triton_is_never_picked_for_cpu_unless_forced(monkeypatch):
    case = make_case(4, 8, torch.float32, "all_one", "contiguous")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert bi.select_backend(bi.validate(*case)).name != "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv(BACKEND_ENV, "triton")
    with pytest.raises(BIReduceError, match="not a CUDA tensor"):
        bi_reduce(*case)


# -------------------------------------------------------------------------------------------- bad input, dispatch


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda: (torch.randn(4, 8), torch.randn(4, 9)), "shape mismatch"),
        (lambda: (torch.randn(4, 8), torch.randn(4, 8, device="meta")), "x_in is on cpu but x_out is on meta"),
        (lambda: (torch.ones(4, 8, dtype=torch.int32), torch.ones(4, 8, dtype=torch.int32)), "not supported"),
        (lambda: (torch.randn(4, 8), torch.randn(4, 8), torch.ones(5, dtype=torch.bool)), "mask has shape"),
        (lambda: (torch.randn(4, 0), torch.randn(4, 0)), "hidden size is 0"),
        (lambda: (torch.randn(8), torch.randn(8)), "2-D"),
    ],
    ids=["shapes", "devices", "integer", "mask_length", "hidden_0", "one_dim"],
)
def test_bad_input_raises(make_args, message):
    with pytest.raises(BIReduceError, match=message):
        bi_reduce(*make_args())


def test_forcing_unknown_backend_lists_the_known_ones(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cuda-magic")
    with pytest.raises(BIReduceError, match="names no available backend"):
        bi_reduce(torch.randn(3, 4), torch.randn(3, 4))


def test_zero_norm_rows_have_defined_values():
    x_in = torch.zeros(3, 16)
    x_out = torch.zeros(3, 16)
    x_out[1] = 1.0
    x_in[2] = 1.0
    expected_rel = 0.0 + 1.0 + 4.0 / bi.EPS  # |b - a| / max(|b|, EPS) per row; |b - a| = 4 in row 2
    for name, backend in bi.backends().items():
        inputs = bi.validate(x_in, x_out, None, None, None)
        if backend.not_supported_reasons(inputs):
            continue
        got = backend.run(inputs)
        assert got[0, 1] == 3.0, name  # cos = 0 for every zero-norm row, so each row adds 1 - 0
        assert math.isclose(got[0, 2], 1.5, rel_tol=1e-12), name  # arccos(0) / pi = 1/2 per row
        assert math.isclose(got[0, 3], expected_rel, rel_tol=1e-12), name


def test_registered_custom_op_passes_opcheck_and_matches_the_python_entry():
    gen = torch.Generator().manual_seed(5)
    x_in = torch.randn(63, 7, generator=gen)
    x_out = x_in + 0.1 * torch.randn(63, 7, generator=gen)
    mask = torch.rand(63, generator=gen) > 0.2
    seq_index = torch.repeat_interleave(torch.arange(3), torch.tensor([20, 21, 22]))
    args = (x_in, x_out, mask, seq_index, 3)
    torch.library.opcheck(torch.ops.shortgpt_fast.bi_reduce.default, args)
    assert torch.equal(torch.ops.shortgpt_fast.bi_reduce(*args), bi_reduce(*args))


def test_bi_reduce_traces_under_torch_compile_without_graph_breaks():
    import torch._dynamo

    def layer_bi(h_in, h_out):
        stats = bi_reduce(h_in, h_out)
        return stats[:, bi.Stat.SUM_ONE_MINUS_COS] / stats[:, bi.Stat.TOKENS]

    torch._dynamo.reset()
    compiled = torch.compile(layer_bi, fullgraph=True, backend="aot_eager")
    x = torch.randn(17, 33)
    y = x + torch.randn(17, 33)
    assert torch.equal(compiled(x, y), layer_bi(x, y))
    explained = torch._dynamo.explain(layer_bi)(x, y)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_columns_are_named_in_one_enum_that_every_backend_follows():
    assert bi.STAT_COLUMNS == ("tokens", "sum_one_minus_cos", "sum_angular", "sum_rel_magnitude",
                               "last_one_minus_cos", "last_angular")
    assert [b.name for b in bi.BACKENDS] == ["triton", "cpp", "torch"]
