// FP8 (e4m3fn) block-scaled dequantization, the DeepSeek-V3 / Kimi-K2 / Qwen3-FP8 layout: weight [rows, cols] of
// e4m3fn bytes, one float32 `weight_scale_inv` per block_rows x block_cols block (the last block row/column may be
// partial). out = float(e4m3) * scale in float32, one rounding, exactly what torch computes for
// `w.to(float32) * scale` (the reference in shortgpt_fast/ops/dequant_fp8/reference.py).
//
// Why not torch: on CPU, torch's float8 -> float32 cast runs at ~0.1 G elements/s on 2 cores, which made
// dequantization, not compute or disk, the bound of streamed scoring of FP8 MoE checkpoints. A 256-entry table
// makes the cast a load.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "../common.h"

namespace py = pybind11;

namespace sgf {
namespace dequant {

// e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, S.1111.111 is NaN; exponent 0 is subnormal.
// Decoded with the bit arithmetic of c10's fp8e4m3fn_to_fp32_value, so every code, NaN payloads and -0.0 included,
// gives the float torch's cast gives.
static float e4m3fn_value(uint8_t byte) {
    const uint32_t w = static_cast<uint32_t>(byte) << 24;
    const uint32_t sign = w & UINT32_C(0x80000000);
    const uint32_t nonsign = w & UINT32_C(0x7FFFFFFF);
    uint32_t renorm_shift = nonsign == 0 ? 32 : static_cast<uint32_t>(__builtin_clz(nonsign));
    renorm_shift = renorm_shift > 4 ? renorm_shift - 4 : 0;
    const int32_t inf_nan_mask = (static_cast<int32_t>(nonsign + 0x01000000) >> 8) & INT32_C(0x7F800000);
    const int32_t zero_mask = static_cast<int32_t>(nonsign - 1) >> 31;
    const uint32_t bits = sign | ((((nonsign << renorm_shift >> 4) + ((0x78 - renorm_shift) << 23)) |
                                   static_cast<uint32_t>(inf_nan_mask)) & ~static_cast<uint32_t>(zero_mask));
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

struct E4M3Table {
    float value[256];
    E4M3Table() {
        for (int i = 0; i < 256; ++i) value[i] = e4m3fn_value(static_cast<uint8_t>(i));
    }
};

static const E4M3Table& table() {
    static const E4M3Table t;
    return t;
}

// float -> bfloat16 rounded to nearest even, as c10::BFloat16 does (NaN becomes the quiet NaN 0x7FC0; streamed
// scoring refuses a NaN weight anyway, so only the finite results are held to torch's bits).
static inline uint16_t to_bfloat16(float value) {
    uint32_t u;
    std::memcpy(&u, &value, sizeof u);
    if ((u & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000)) return UINT16_C(0x7FC0);
    return static_cast<uint16_t>((u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16);
}

template <typename Out>
static inline Out store(float value);
template <>
inline float store<float>(float value) { return value; }
template <>
inline uint16_t store<uint16_t>(float value) { return to_bfloat16(value); }

template <typename Out>
static void dequantize_rows(const uint8_t* w, int64_t weight_row_stride, const float* s, int64_t rows, int64_t cols,
                            int64_t block_rows, int64_t block_cols, Out* o, int64_t out_row_stride,
                            int num_threads) {
    const float* lut = table().value;
    const int64_t scale_cols = (cols + block_cols - 1) / block_cols;
#pragma omp parallel for schedule(static) num_threads(num_threads > 0 ? num_threads : 1)
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* w_row = w + r * weight_row_stride;
        const float* s_row = s + (r / block_rows) * scale_cols;
        Out* o_row = o + r * out_row_stride;
        for (int64_t c0 = 0; c0 < cols; c0 += block_cols) {
            const float block_scale = s_row[c0 / block_cols];
            const int64_t c1 = c0 + block_cols < cols ? c0 + block_cols : cols;
            for (int64_t c = c0; c < c1; ++c) o_row[c] = store<Out>(lut[w_row[c]] * block_scale);
        }
    }
}

// weight: address of uint8 [rows, cols] with row stride `weight_row_stride` (elements) and unit inner stride;
// scale: address of contiguous float32 [ceil(rows / block_rows), ceil(cols / block_cols)]; out: address of
// [rows, cols] in `out_dtype` (kFloat32 or kBFloat16) with row stride `out_row_stride` and unit inner stride, fully
// written. The product is rounded once to float32, then once to bfloat16 where asked: the bits of torch's
// `(w.to(float32) * scale).to(bfloat16)`, without the float32 tensor in between (a second pass over memory that
// cost more than the dequantization in the streamed FP8 pass). Each output element depends on one input byte and
// one scale, so any thread count gives the same bits.
static void fp8_block_dequantize(uintptr_t weight, int64_t weight_row_stride, uintptr_t scale, int64_t rows,
                                 int64_t cols, int64_t block_rows, int64_t block_cols, uintptr_t out,
                                 int64_t out_row_stride, int out_dtype, int num_threads) {
    if (rows < 0 || cols < 0 || block_rows <= 0 || block_cols <= 0 || weight_row_stride < cols ||
        out_row_stride < cols) {
        throw std::invalid_argument("fp8_block_dequantize: bad shape, block size or row stride");
    }
    const uint8_t* w = reinterpret_cast<const uint8_t*>(weight);
    const float* s = reinterpret_cast<const float*>(scale);
    if (out_dtype != kFloat32 && out_dtype != kBFloat16) {
        throw std::invalid_argument("fp8_block_dequantize: out dtype must be float32 or bfloat16");
    }
    py::gil_scoped_release release;
    if (out_dtype == kFloat32) {
        dequantize_rows(w, weight_row_stride, s, rows, cols, block_rows, block_cols, reinterpret_cast<float*>(out),
                        out_row_stride, num_threads);
    } else {
        dequantize_rows(w, weight_row_stride, s, rows, cols, block_rows, block_cols,
                        reinterpret_cast<uint16_t*>(out), out_row_stride, num_threads);
    }
}

}  // namespace dequant
}  // namespace sgf

void register_gguf_dequant(py::module_& m);
void register_finite(py::module_& m);

void register_dequant(py::module_& m) {
    register_gguf_dequant(m);
    register_finite(m);
    m.def("fp8_block_dequantize_to", &sgf::dequant::fp8_block_dequantize, py::arg("weight"),
          py::arg("weight_row_stride"), py::arg("scale"), py::arg("rows"), py::arg("cols"), py::arg("block_rows"),
          py::arg("block_cols"), py::arg("out"), py::arg("out_row_stride"), py::arg("out_dtype"),
          py::arg("num_threads"),
          "e4m3fn block-scaled dequantization over raw buffers: weight uint8 [rows, cols] (row stride in elements, "
          "unit inner stride), scale float32 [ceil(rows/block_rows), ceil(cols/block_cols)] contiguous, out "
          "[rows, cols] in out_dtype (sgf::DType: float32 or bfloat16; row stride in elements, unit inner stride), "
          "fully written.");
}
