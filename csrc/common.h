#pragma once
// Shared helpers for the C++ core. Nothing here may include torch: the core is ABI-independent.
#include <cstdint>
#include <string>
#include <vector>

namespace sgf {

// dtype codes shared with Python (DTYPE_CODES in shortgpt_fast/ops/bi_reduce/cpp.py keeps the same numbering).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Output columns of bi_reduce, in the order of Stat in shortgpt_fast/ops/bi_reduce/contract.py.
enum Stat : int {
    kTokens = 0,
    kSumOneMinusCos = 1,
    kSumAngular = 2,
    kSumRelMagnitude = 3,
    kLastOneMinusCos = 4,
    kLastAngular = 5,
    kNumStats = 6,
};

}  // namespace sgf
