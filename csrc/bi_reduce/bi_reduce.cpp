// Fused Block Influence reduction on CPU: one read of x_in and x_out gives, per sequence, the six float64 columns
// documented in shortgpt_fast/ops/bi_reduce/contract.py (their order: sgf::Stat in common.h). Torch-free on
// purpose: it takes raw addresses, strides in elements and dtype codes, so one build serves any torch.
//
// Determinism: phase 1 computes each valid row's fp32 sums and fp64 terms, with a summation tree fixed by the
// hidden size alone; rows are shared among threads, but one row never is. Phase 2 sums each sequence's rows
// serially in row order in fp64. So the result does not depend on the thread count or the schedule.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BI_X86 1
#else
#define BI_X86 0
#endif

#include "common.h"

// The 64-byte vector type changes the ABI of functions that pass it by value in builds without AVX-512;
// every such function here is always_inline inside one ISA build, so no call ever crosses that boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace py = pybind11;

namespace sgf {
namespace bi {

struct RowSums {
    float dot, sq_in, sq_out, sq_diff;
};

struct RowJob {
    const char* x_in;
    const char* x_out;
    int64_t in_row_bytes;
    int64_t out_row_bytes;
    int dtype;
    int64_t hidden;
    const uint8_t* mask;
};

#if BI_X86
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace isa_avx512 {
#define BI_ROWS_AVX2 1
#define BI_ROWS_AVX512 1
#include "bi_reduce/bi_reduce_rows.h"
#undef BI_ROWS_AVX512
#undef BI_ROWS_AVX2
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace isa_avx2 {
#define BI_ROWS_AVX2 1
#define BI_ROWS_AVX512 0
#include "bi_reduce/bi_reduce_rows.h"
#undef BI_ROWS_AVX512
#undef BI_ROWS_AVX2
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

namespace isa_generic {
#define BI_ROWS_AVX2 0
#define BI_ROWS_AVX512 0
#include "bi_reduce/bi_reduce_rows.h"
#undef BI_ROWS_AVX512
#undef BI_ROWS_AVX2
}  // namespace isa_generic

using RowsFn = void (*)(const RowJob&, int64_t, int64_t, RowSums*);

struct IsaChoice {
    const char* name;
    RowsFn rows;
};

static bool cpu_has(const char* feature_level) {
#if BI_X86
    __builtin_cpu_init();
    if (std::strcmp(feature_level, "avx512") == 0) return __builtin_cpu_supports("x86-64-v4");
    if (std::strcmp(feature_level, "avx2") == 0) return __builtin_cpu_supports("x86-64-v3");
#endif
    return std::strcmp(feature_level, "generic") == 0;
}

static IsaChoice choose_isa(const std::string& requested) {
    if (requested != "auto" && requested != "avx512" && requested != "avx2" && requested != "generic") {
        throw std::invalid_argument("bi_reduce_cpu: isa must be auto, avx512, avx2 or generic, got " + requested);
    }
    if (requested != "auto" && !cpu_has(requested.c_str())) {
        throw std::invalid_argument("bi_reduce_cpu: this CPU cannot run the " + requested + " build");
    }
#if BI_X86
    if ((requested == "auto" || requested == "avx512") && cpu_has("avx512")) return {"avx512", isa_avx512::rows_to_sums};
    if ((requested == "auto" || requested == "avx2") && cpu_has("avx2")) return {"avx2", isa_avx2::rows_to_sums};
#endif
    return {"generic", isa_generic::rows_to_sums};
}

struct RowTerms {
    double one_minus_cos, angular, rel_magnitude;
};

constexpr double kEps = 1e-12;

// Same operations, in the same order, as _per_row_terms in bi_reduce.py; NaN passes through the clamps.
static inline RowTerms terms_from_sums(const RowSums& s) {
    double norm_in = std::sqrt(double(s.sq_in));
    double norm_out = std::sqrt(double(s.sq_out));
    double norm_diff = std::sqrt(double(s.sq_diff));
    double raw_denom = norm_in * norm_out;
    double denom = raw_denom < kEps ? kEps : raw_denom;
    // Law of cosines instead of dot/denom: nearly parallel rows would lose 1 - cos to float32 cancellation.
    double gap = std::fabs(norm_in - norm_out);
    double cos = raw_denom < kEps ? double(s.dot) / denom
                                  : 1.0 - (norm_diff - gap) * (norm_diff + gap) / (2.0 * denom);
    if (cos < -1.0) cos = -1.0;
    if (cos > 1.0) cos = 1.0;
    double out_floor = norm_out < kEps ? kEps : norm_out;
    return RowTerms{1.0 - cos, std::acos(cos) / M_PI, norm_diff / out_floor};
}

static void check_offsets(const int64_t* offsets, int64_t num_seqs, int64_t tokens) {
    if (offsets[0] < 0 || offsets[num_seqs] > tokens) {
        throw std::invalid_argument("bi_reduce_cpu: sequence offsets fall outside [0, tokens]");
    }
    for (int64_t s = 0; s < num_seqs; ++s) {
        if (offsets[s + 1] < offsets[s]) {
            throw std::invalid_argument("bi_reduce_cpu: sequence offsets must be non-decreasing");
        }
    }
}

static std::string bi_reduce_cpu(uintptr_t x_in, int64_t in_row_stride, uintptr_t x_out, int64_t out_row_stride,
                                 int dtype, int64_t tokens, int64_t hidden, uintptr_t mask, uintptr_t seq_offsets,
                                 int64_t num_seqs, uintptr_t out, int num_threads, const std::string& isa) {
    if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16) {
        throw std::invalid_argument("bi_reduce_cpu: dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16), got " +
                                    std::to_string(dtype));
    }
    if (hidden < 1) throw std::invalid_argument("bi_reduce_cpu: hidden size must be >= 1");
    if (tokens < 0) throw std::invalid_argument("bi_reduce_cpu: tokens must be >= 0");
    if (num_seqs < 1) throw std::invalid_argument("bi_reduce_cpu: num_seqs must be >= 1");
    if (num_threads < 1) throw std::invalid_argument("bi_reduce_cpu: num_threads must be >= 1");
    if (in_row_stride < 0 || out_row_stride < 0) throw std::invalid_argument("bi_reduce_cpu: negative row stride");
    if (!seq_offsets || !out || (tokens > 0 && (!x_in || !x_out || !mask))) {
        throw std::invalid_argument("bi_reduce_cpu: null pointer");
    }
    const IsaChoice choice = choose_isa(isa);
    const int64_t* offsets = reinterpret_cast<const int64_t*>(seq_offsets);
    check_offsets(offsets, num_seqs, tokens);

    const int64_t elem_bytes = dtype == kFloat32 ? 4 : 2;
    const RowJob job{reinterpret_cast<const char*>(x_in), reinterpret_cast<const char*>(x_out),
                     in_row_stride * elem_bytes, out_row_stride * elem_bytes, dtype, hidden,
                     reinterpret_cast<const uint8_t*>(mask)};
    double* result = reinterpret_cast<double*>(out);

    py::gil_scoped_release no_gil;
    const int64_t row_begin = offsets[0];
    const int64_t row_end = offsets[num_seqs];
    std::vector<RowSums> sums(static_cast<size_t>(row_end));
    std::vector<RowTerms> terms(static_cast<size_t>(row_end));

    // Chunks of ~256 KiB of input keep scheduling overhead small while masked rows still balance out.
    const int64_t row_bytes = hidden * elem_bytes * 2;
    const int64_t rows_per_chunk = std::max<int64_t>(1, (int64_t(256) << 10) / row_bytes);
    const int64_t num_chunks = (row_end - row_begin + rows_per_chunk - 1) / rows_per_chunk;
    const bool parallel = num_threads > 1 && num_chunks > 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (parallel)
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
        const int64_t first = row_begin + chunk * rows_per_chunk;
        const int64_t last = std::min(row_end, first + rows_per_chunk);
        choice.rows(job, first, last, sums.data());
        for (int64_t row = first; row < last; ++row) {
            if (job.mask[row]) terms[row] = terms_from_sums(sums[row]);
        }
    }

    const bool parallel_seqs = num_threads > 1 && num_seqs > 1 && row_end - row_begin > 4096;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (parallel_seqs)
    for (int64_t s = 0; s < num_seqs; ++s) {
        double count = 0.0, one_minus_cos = 0.0, angular = 0.0, rel_magnitude = 0.0;
        int64_t last_valid = -1;
        for (int64_t row = offsets[s]; row < offsets[s + 1]; ++row) {
            if (!job.mask[row]) continue;
            count += 1.0;
            one_minus_cos += terms[row].one_minus_cos;
            angular += terms[row].angular;
            rel_magnitude += terms[row].rel_magnitude;
            last_valid = row;
        }
        double* out_row = result + s * sgf::kNumStats;
        out_row[sgf::kTokens] = count;
        out_row[sgf::kSumOneMinusCos] = one_minus_cos;
        out_row[sgf::kSumAngular] = angular;
        out_row[sgf::kSumRelMagnitude] = rel_magnitude;
        out_row[sgf::kLastOneMinusCos] = last_valid >= 0 ? terms[last_valid].one_minus_cos : 0.0;
        out_row[sgf::kLastAngular] = last_valid >= 0 ? terms[last_valid].angular : 0.0;
    }
    return choice.name;
}

static std::vector<std::string> available_isas() {
    std::vector<std::string> names;
    for (const char* name : {"avx512", "avx2", "generic"}) {
        if (cpu_has(name)) names.push_back(name);
    }
    return names;
}

}  // namespace bi
}  // namespace sgf

void register_bi_reduce(py::module_& m) {
    m.def("bi_reduce_cpu", &sgf::bi::bi_reduce_cpu, py::arg("x_in"), py::arg("in_row_stride"), py::arg("x_out"),
          py::arg("out_row_stride"), py::arg("dtype"), py::arg("tokens"), py::arg("hidden"), py::arg("mask"),
          py::arg("seq_offsets"), py::arg("num_seqs"), py::arg("out"), py::arg("num_threads"),
          py::arg("isa") = "auto",
          "Fused BI reduction over raw buffers. x_in/x_out: addresses of [tokens, hidden] rows with unit inner "
          "stride and the given row strides (elements); dtype: 0 fp32, 1 bf16, 2 fp16; mask: address of "
          "[tokens] uint8; seq_offsets: address of int64 [num_seqs + 1]; out: address of float64 "
          "[num_seqs, 6], fully written. Returns the ISA build that ran.");
    m.def("bi_reduce_isas", &sgf::bi::available_isas,
          "ISA builds of the BI kernel this CPU can run, fastest first.");
}
