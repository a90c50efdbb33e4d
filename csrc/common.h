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

inline std::vector<std::string> cpu_features() {
    std::vector<std::string> out;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) out.push_back("avx2");
    if (__builtin_cpu_supports("fma")) out.push_back("fma");
    if (__builtin_cpu_supports("avx512f")) out.push_back("avx512f");
    if (__builtin_cpu_supports("avx512bw")) out.push_back("avx512bw");
#endif
    return out;
}

}  // namespace sgf
