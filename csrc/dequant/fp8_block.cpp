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

// weight: address of uint8 [rows, cols] with row stride `weight_row_stride` (elements) and unit inner stride;
// scale: address of contiguous float32 [ceil(rows / block_rows), ceil(cols / block_cols)]; out: address of
// contiguous float32 [rows, cols], fully written. Each output element depends on one input byte and one scale, so
// any thread count gives the same bits.
static void fp8_block_dequantize(uintptr_t weight, int64_t weight_row_stride, uintptr_t scale, int64_t rows,
                                 int64_t cols, int64_t block_rows, int64_t block_cols, uintptr_t out,
                                 int num_threads) {
    if (rows < 0 || cols < 0 || block_rows <= 0 || block_cols <= 0 || weight_row_stride < cols) {
        throw std::invalid_argument("fp8_block_dequantize: bad shape, block size or row stride");
    }
    const uint8_t* w = reinterpret_cast<const uint8_t*>(weight);
    const float* s = reinterpret_cast<const float*>(scale);
    float* o = reinterpret_cast<float*>(out);
    const float* lut = table().value;
    const int64_t scale_cols = (cols + block_cols - 1) / block_cols;
    py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(num_threads > 0 ? num_threads : 1)
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* w_row = w + r * weight_row_stride;
        const float* s_row = s + (r / block_rows) * scale_cols;
        float* o_row = o + r * cols;
        for (int64_t c0 = 0; c0 < cols; c0 += block_cols) {
            const float block_scale = s_row[c0 / block_cols];
            const int64_t c1 = c0 + block_cols < cols ? c0 + block_cols : cols;
            for (int64_t c = c0; c < c1; ++c) o_row[c] = lut[w_row[c]] * block_scale;
        }
    }
}

}  // namespace dequant
}  // namespace sgf

void register_gguf_dequant(py::module_& m);
void register_finite(py::module_& m);

void register_dequant(py::module_& m) {
    register_gguf_dequant(m);
    register_finite(m);
    m.def("fp8_block_dequantize", &sgf::dequant::fp8_block_dequantize, py::arg("weight"),
          py::arg("weight_row_stride"), py::arg("scale"), py::arg("rows"), py::arg("cols"), py::arg("block_rows"),
          py::arg("block_cols"), py::arg("out"), py::arg("num_threads"),
          "e4m3fn block-scaled dequantization over raw buffers: weight uint8 [rows, cols] (row stride in elements, "
          "unit inner stride), scale float32 [ceil(rows/block_rows), ceil(cols/block_cols)] contiguous, out float32 "
          "[rows, cols] contiguous, fully written.");
}
