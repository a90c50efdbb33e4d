// GGUF block dequantization for the types most GGUF releases are made of (F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K),
// to float32. Each type repeats gguf-py's numpy arithmetic operation for operation in float32 (the reference in
// shortgpt_fast/ops/dequant_gguf/reference.py is gguf-py itself), so the results are bit-identical to it; gguf-py
// still handles every other type.
//
// Why not gguf-py alone: its numpy dequantization runs at ~80 M elements/s on 2 cores, which made it, not compute
// or disk, the bound of streamed scoring of a 13B-shaped Q4_K GGUF.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

// gguf-py rounds after every multiply and add; a fused multiply-add (allowed by GCC's default -ffp-contract=fast
// when the target has FMA, e.g. with SHORTGPT_FAST_CXXFLAGS=-march=native) would round once and differ in the last
// bit.
#pragma GCC optimize("fp-contract=off")

namespace py = pybind11;

namespace sgf {
namespace dequant {

// ggml_type numbers (gguf GGMLQuantizationType).
enum GGMLType : int { kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14, kBF16 = 30 };

struct BlockLayout {
    int64_t elements;
    int64_t bytes;
};

static bool layout_of(int type, BlockLayout* out) {
    switch (type) {
        case kF16: *out = {1, 2}; return true;
        case kBF16: *out = {1, 2}; return true;
        case kQ4_0: *out = {32, 18}; return true;
        case kQ4_1: *out = {32, 20}; return true;
        case kQ8_0: *out = {32, 34}; return true;
        case kQ4_K: *out = {256, 144}; return true;
        case kQ6_K: *out = {256, 210}; return true;
        default: return false;
    }
}

// IEEE half to float, exact (every half is a float); a NaN keeps its payload bits as they are, as numpy's
// astype(float32) does (arithmetic on it later quiets it, in both).
static float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    uint32_t exponent = (h >> 10) & 0x1F;
    uint32_t mantissa = h & 0x3FF;
    uint32_t bits;
    if (exponent == 0x1F) {
        bits = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {
        // Subnormal half: normalise into a float exponent.
        exponent = 113;
        while (!(mantissa & 0x400)) {
            mantissa <<= 1;
            --exponent;
        }
        bits = sign | (exponent << 23) | ((mantissa & 0x3FF) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

static uint16_t read_u16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

static void block_q4_0(const uint8_t* b, float* out) {
    const float d = half_to_float(read_u16(b));
    const uint8_t* qs = b + 2;
    for (int e = 0; e < 32; ++e) {
        const int q = ((qs[e % 16] >> (4 * (e / 16))) & 0x0F) - 8;
        out[e] = d * static_cast<float>(q);
    }
}

static void block_q4_1(const uint8_t* b, float* out) {
    const float d = half_to_float(read_u16(b)), m = half_to_float(read_u16(b + 2));
    const uint8_t* qs = b + 4;
    for (int e = 0; e < 32; ++e) {
        const float q = static_cast<float>((qs[e % 16] >> (4 * (e / 16))) & 0x0F);
        const float scaled = d * q;
        out[e] = scaled + m;
    }
}

static void block_q8_0(const uint8_t* b, float* out) {
    const float d = half_to_float(read_u16(b));
    const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
    for (int e = 0; e < 32; ++e) out[e] = static_cast<float>(qs[e]) * d;
}

static void block_q4_k(const uint8_t* b, float* out) {
    const float d = half_to_float(read_u16(b)), dmin = half_to_float(read_u16(b + 2));
    const uint8_t* s = b + 4;  // 12 bytes: 6-bit scales and mins of the 8 sub-blocks
    const uint8_t* qs = b + 16;
    for (int j = 0; j < 8; ++j) {
        int sc, mn;
        if (j < 4) {
            sc = s[j] & 0x3F;
            mn = s[j + 4] & 0x3F;
        } else {
            sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30);
            mn = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
        }
        const float dj = d * static_cast<float>(sc);
        const float mj = dmin * static_cast<float>(mn);
        const uint8_t* group = qs + (j / 2) * 32;
        const int shift = 4 * (j % 2);
        for (int k = 0; k < 32; ++k) {
            const float scaled = dj * static_cast<float>((group[k] >> shift) & 0x0F);
            out[j * 32 + k] = scaled - mj;
        }
    }
}

static void block_q6_k(const uint8_t* b, float* out) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    const float d = half_to_float(read_u16(b + 208));
    for (int e = 0; e < 256; ++e) {
        const int h = e / 128, within = e % 128;
        const int low = (ql[h * 64 + within % 64] >> (4 * (within / 64))) & 0x0F;
        const int high = (qh[h * 32 + within % 32] >> (2 * (within / 32))) & 0x03;
        const int q = static_cast<int8_t>(static_cast<uint8_t>(low | (high << 4))) - 32;
        const float ds = d * static_cast<float>(scales[e / 16]);
        out[e] = ds * static_cast<float>(q);
    }
}

static void element_f16(const uint8_t* b, float* out) { out[0] = half_to_float(read_u16(b)); }

static void element_bf16(const uint8_t* b, float* out) {
    const uint32_t bits = static_cast<uint32_t>(read_u16(b)) << 16;
    std::memcpy(out, &bits, sizeof bits);
}

// src: `nbytes` bytes of whole blocks of `type`; out: float32 [elements], fully written. Blocks are independent,
// so any thread count gives the same bits.
static void gguf_dequantize(int type, uintptr_t src, int64_t nbytes, uintptr_t out, int num_threads) {
    BlockLayout layout;
    if (!layout_of(type, &layout)) {
        throw std::invalid_argument("gguf_dequantize: ggml type " + std::to_string(type) + " is not supported here");
    }
    if (nbytes < 0 || nbytes % layout.bytes != 0) {
        throw std::invalid_argument("gguf_dequantize: byte count is not a whole number of blocks");
    }
    void (*decode)(const uint8_t*, float*) = nullptr;
    switch (type) {
        case kF16: decode = element_f16; break;
        case kBF16: decode = element_bf16; break;
        case kQ4_0: decode = block_q4_0; break;
        case kQ4_1: decode = block_q4_1; break;
        case kQ8_0: decode = block_q8_0; break;
        case kQ4_K: decode = block_q4_k; break;
        case kQ6_K: decode = block_q6_k; break;
    }
    const uint8_t* in = reinterpret_cast<const uint8_t*>(src);
    float* o = reinterpret_cast<float*>(out);
    const int64_t blocks = nbytes / layout.bytes;
    py::gil_scoped_release release;
#pragma omp parallel for schedule(static) num_threads(num_threads > 0 ? num_threads : 1)
    for (int64_t i = 0; i < blocks; ++i) decode(in + i * layout.bytes, o + i * layout.elements);
}

static py::tuple gguf_block_layout(int type) {
    BlockLayout layout;
    if (!layout_of(type, &layout)) return py::make_tuple();
    return py::make_tuple(layout.elements, layout.bytes);
}

}  // namespace dequant
}  // namespace sgf

void register_gguf_dequant(py::module_& m) {
    m.def("gguf_dequantize", &sgf::dequant::gguf_dequantize, py::arg("type"), py::arg("src"), py::arg("nbytes"),
          py::arg("out"), py::arg("num_threads"),
          "Dequantize `nbytes` of GGUF blocks of ggml `type` at address `src` into float32 at address `out`.");
    m.def("gguf_block_layout", &sgf::dequant::gguf_block_layout, py::arg("type"),
          "(elements, bytes) of one block of ggml `type`, or () when gguf_dequantize does not handle it.");
}
