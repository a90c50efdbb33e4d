// Counting NaN and infinite values of a float32, bfloat16 or float16 buffer by their exponent bits, at memory speed.
//
// Why: streamed scoring checks every weight it loads for NaN/inf (a corrupt shard must be refused, not scored), and
// torch's CPU isfinite(...).all() on bfloat16 runs at ~0.3 G elements/s, which made the check take more time than
// the block compute on a 26 GB bf16 checkpoint. The count is an integer sum, the same whatever the thread count.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "common.h"

namespace py = pybind11;

namespace sgf {
namespace dequant {

template <typename Bits, Bits kExponent>
static int64_t count_exponent_all_ones(const Bits* data, int64_t n, int num_threads) {
    int64_t count = 0;
#pragma omp parallel for schedule(static) reduction(+ : count) num_threads(num_threads > 0 ? num_threads : 1)
    for (int64_t i = 0; i < n; ++i) count += (data[i] & kExponent) == kExponent;
    return count;
}

static int64_t count_nonfinite(uintptr_t data, int64_t n, int dtype, int num_threads) {
    if (n < 0) throw std::invalid_argument("count_nonfinite: negative element count");
    py::gil_scoped_release release;
    switch (dtype) {
        case kFloat32:
            return count_exponent_all_ones<uint32_t, UINT32_C(0x7F800000)>(reinterpret_cast<const uint32_t*>(data), n,
                                                                           num_threads);
        case kBFloat16:
            return count_exponent_all_ones<uint16_t, 0x7F80>(reinterpret_cast<const uint16_t*>(data), n, num_threads);
        case kFloat16:
            return count_exponent_all_ones<uint16_t, 0x7C00>(reinterpret_cast<const uint16_t*>(data), n, num_threads);
        default:
            throw std::invalid_argument("count_nonfinite: dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16)");
    }
}

}  // namespace dequant
}  // namespace sgf

void register_finite(py::module_& m) {
    m.def("count_nonfinite", &sgf::dequant::count_nonfinite, py::arg("data"), py::arg("n"), py::arg("dtype"),
          py::arg("num_threads"),
          "Number of NaN/inf values among `n` contiguous elements at address `data` (dtype 0 fp32, 1 bf16, 2 fp16).");
}
