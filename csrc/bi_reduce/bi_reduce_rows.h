// Per-row sums for the fused BI reduction, written once with GCC vector extensions and compiled several times
// by csrc/bi_reduce.cpp, each time inside a different `#pragma GCC target` region and namespace. The logical
// vector is 16 floats on every ISA (one zmm, two ymm or four xmm), so the summation tree depends only on the
// hidden size, never on the thread count. The AVX-512 and AVX2 builds run the same tree with fused
// multiply-adds (same bits expected, not verified on AVX-512 hardware); the portable build does not fuse.
//
// Deliberately no include guard: each inclusion is a separate ISA build.
// Expected from the includer: <cstring>, <cstdint>, <immintrin.h>, BI_ROWS_AVX2 (1 where AVX2 and F16C
// intrinsics may be used) and BI_ROWS_AVX512 (1 where a Vec16 fits one register).

typedef float Vec16 __attribute__((vector_size(64)));
typedef uint16_t Half16 __attribute__((vector_size(32)));
typedef uint32_t Word16 __attribute__((vector_size(64)));
typedef float Vec8 __attribute__((vector_size(32)));

// Where a Vec16 is one zmm, a shuffle is one vinsert; where it is two ymm, GCC lowers the same shuffle
// lane by lane through the stack but keeps a memcpy of each half in registers.
static inline __attribute__((always_inline)) Vec16 concat_halves(const Vec8& lo, const Vec8& hi) {
#if BI_ROWS_AVX512
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    Vec16 v;
    std::memcpy(&v, &lo, sizeof(lo));
    std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
    return v;
#endif
}

constexpr int kLanes = 16;
constexpr int kBlockVectors = 8;
constexpr int64_t kBlockElems = int64_t(kLanes) * kBlockVectors;

struct Partial {
    Vec16 dot, sq_in, sq_out, sq_diff;
};

static inline __attribute__((always_inline)) Partial zero_partial() {
    Partial p;
    p.dot = p.sq_in = p.sq_out = p.sq_diff = Vec16{};
    return p;
}

// Group and row totals live in plain float arrays on purpose: kept as Partial structs, GCC moved them between
// blocks through general registers in 8-byte pieces, which cost as much as the block's own arithmetic.
struct Totals {
    alignas(64) float lanes[4][kLanes];
};

static inline __attribute__((always_inline)) void zero_totals(Totals& totals) {
    std::memset(&totals, 0, sizeof(totals));
}

static inline __attribute__((always_inline)) void add_half(float* total, const Vec8& half) {
    Vec8 current;
    std::memcpy(&current, total, sizeof(current));
    current += half;
    std::memcpy(total, &current, sizeof(current));
}

// Memory traffic in native 32-byte halves: a 64-byte vector is not native to AVX2, and GCC copies it to
// and from memory in 8-byte pieces.
static inline __attribute__((always_inline)) void add_vector(float* total, const Vec16& v) {
    add_half(total, __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7));
    add_half(total + 8, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}

static inline __attribute__((always_inline)) void add_partial(Totals& totals, const Partial& p) {
    add_vector(totals.lanes[0], p.dot);
    add_vector(totals.lanes[1], p.sq_in);
    add_vector(totals.lanes[2], p.sq_out);
    add_vector(totals.lanes[3], p.sq_diff);
}

static inline __attribute__((always_inline)) void add_totals(Totals& totals, const Totals& other) {
    for (int q = 0; q < 4; ++q) {
        for (int h = 0; h < kLanes; h += 8) {
            Vec8 half;
            std::memcpy(&half, other.lanes[q] + h, sizeof(half));
            add_half(totals.lanes[q] + h, half);
        }
    }
}

static inline __attribute__((always_inline)) float bf16_bits_to_float(uint16_t bits) {
    uint32_t widened = uint32_t(bits) << 16;
    float value;
    std::memcpy(&value, &widened, 4);
    return value;
}

static inline __attribute__((always_inline)) float fp16_bits_to_float(uint16_t bits) {
#if BI_ROWS_AVX2
    return _cvtsh_ss(bits);
#else
    // Bit-exact IEEE half -> single without F16C, so the fallback build needs no libgcc soft-float helper.
    uint32_t sign = uint32_t(bits & 0x8000u) << 16;
    uint32_t exponent = (bits >> 10) & 0x1fu;
    uint32_t mantissa = bits & 0x3ffu;
    uint32_t word;
    if (exponent == 0x1fu) {
        word = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
        word = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        word = sign;
    } else {
        // Subnormal half: renormalise into a normal single.
        int shift = 0;
        while ((mantissa & 0x400u) == 0) {
            mantissa <<= 1;
            ++shift;
        }
        mantissa &= 0x3ffu;
        word = sign | (uint32_t(113 - shift) << 23) | (mantissa << 13);
    }
    float value;
    std::memcpy(&value, &word, 4);
    return value;
#endif
}

template <int DT>
static inline __attribute__((always_inline)) Vec16 load16(const char* p) {
    if constexpr (DT == sgf::kFloat32) {
        Vec16 v;
        std::memcpy(&v, p, sizeof(v));
        return v;
    } else if constexpr (DT == sgf::kBFloat16) {
#if BI_ROWS_AVX2
        // Interleaving zero words below each bf16 is the fp32 value, at one shuffle per 8 values (zero-extend
        // plus shift costs two). The lanes come out permuted (0-3, 8-11 | 4-7, 12-15), identically for x_in
        // and x_out, so every lane still pairs matching elements; the permutation is part of the fixed tree.
        __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        __m256i zero = _mm256_setzero_si256();
        __m256 lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
        __m256 hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
        return concat_halves(lo, hi);
#else
        Half16 raw;
        std::memcpy(&raw, p, sizeof(raw));
        Word16 widened = __builtin_convertvector(raw, Word16) << 16;
        Vec16 v;
        std::memcpy(&v, &widened, sizeof(v));
        return v;
#endif
    } else {
#if BI_ROWS_AVX2
        // GCC lowers a vector _Float16 conversion to one vcvtph2ps per element; the intrinsic does 8 at once.
        __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
        return concat_halves(lo, hi);
#else
        Vec16 v;
        for (int lane = 0; lane < kLanes; ++lane) {
            uint16_t bits;
            std::memcpy(&bits, p + 2 * lane, 2);
            v[lane] = fp16_bits_to_float(bits);
        }
        return v;
#endif
    }
}

static inline __attribute__((always_inline)) void accumulate_vector(Partial& acc, const Vec16& a, const Vec16& b) {
    Vec16 diff = b - a;
    acc.dot += a * b;
    acc.sq_in += a * a;
    acc.sq_out += b * b;
    acc.sq_diff += diff * diff;
}

static inline __attribute__((always_inline)) float lane_sum(const float* v) {
    // Fixed pairwise tree over the 16 lanes.
    float s8[8], s4[4], s2[2];
    for (int i = 0; i < 8; ++i) s8[i] = v[i] + v[i + 8];
    for (int i = 0; i < 4; ++i) s4[i] = s8[i] + s8[i + 4];
    for (int i = 0; i < 2; ++i) s2[i] = s4[i] + s4[i + 2];
    return s2[0] + s2[1];
}

// Three fixed levels instead of one long chain per lane: vectors into a block (kBlockVectors), blocks into a
// group (kGroupBlocks), groups into the row. Each lane's serial chains stay short, so the fp32 error of an
// 8192-wide row stays close to that of torch's cascaded sum, and the tree depends on the hidden size only.
// (A binary-counter cascade was tried first: its variable-depth merges cost more than the loads they guard.)
constexpr int kGroupBlocks = 16;
// Software prefetch 1 KiB ahead in both streams: it lifted single-thread DRAM reads from ~75% to ~95% of an
// fp32 sum here (512 B and 2-4 KiB did worse). Prefetching past the end of a buffer cannot fault.
constexpr int64_t kPrefetchBytes = 1024;

template <int DT>
static inline __attribute__((always_inline)) void block_into(Totals& group, const char* a, const char* b,
                                                             int64_t vectors) {
    constexpr int64_t elem_bytes = DT == sgf::kFloat32 ? 4 : 2;
    Partial block = zero_partial();
    if (vectors == kBlockVectors) {
        for (int64_t line = 0; line < kBlockElems * elem_bytes; line += 64) {
            __builtin_prefetch(a + kPrefetchBytes + line);
            __builtin_prefetch(b + kPrefetchBytes + line);
        }
#pragma GCC unroll 8
        for (int v = 0; v < kBlockVectors; ++v) {
            accumulate_vector(block, load16<DT>(a + v * kLanes * elem_bytes), load16<DT>(b + v * kLanes * elem_bytes));
        }
    } else {
        for (int64_t v = 0; v < vectors; ++v) {
            accumulate_vector(block, load16<DT>(a + v * kLanes * elem_bytes), load16<DT>(b + v * kLanes * elem_bytes));
        }
    }
    add_partial(group, block);
}

template <int DT>
static RowSums row_sums(const char* a, const char* b, int64_t hidden) {
    constexpr int64_t elem_bytes = DT == sgf::kFloat32 ? 4 : 2;
    constexpr int64_t group_elems = kBlockElems * kGroupBlocks;
    Totals row;
    zero_totals(row);
    int64_t start = 0;
    for (; start + group_elems <= hidden; start += group_elems) {
        Totals group;
        zero_totals(group);
        for (int blk = 0; blk < kGroupBlocks; ++blk) {
            const int64_t offset = (start + blk * kBlockElems) * elem_bytes;
            block_into<DT>(group, a + offset, b + offset, kBlockVectors);
        }
        add_totals(row, group);
    }
    if (start < hidden) {
        Totals group;
        zero_totals(group);
        for (; start + kLanes <= hidden; start += kBlockElems) {
            const int64_t vectors = std::min<int64_t>(kBlockVectors, (hidden - start) / kLanes);
            block_into<DT>(group, a + start * elem_bytes, b + start * elem_bytes, vectors);
            if (vectors < kBlockVectors) {
                start += vectors * kLanes;
                break;
            }
        }
        if (start < hidden) {
            // Zero padding adds exactly nothing to any of the four sums.
            alignas(64) char tail_a[kLanes * elem_bytes] = {};
            alignas(64) char tail_b[kLanes * elem_bytes] = {};
            std::memcpy(tail_a, a + start * elem_bytes, (hidden - start) * elem_bytes);
            std::memcpy(tail_b, b + start * elem_bytes, (hidden - start) * elem_bytes);
            block_into<DT>(group, tail_a, tail_b, 1);
        }
        add_totals(row, group);
    }
    return RowSums{lane_sum(row.lanes[0]), lane_sum(row.lanes[1]), lane_sum(row.lanes[2]), lane_sum(row.lanes[3])};
}

static void rows_to_sums(const RowJob& job, int64_t row_begin, int64_t row_end, RowSums* sums) {
    for (int64_t row = row_begin; row < row_end; ++row) {
        if (!job.mask[row]) continue;
        const char* a = job.x_in + row * job.in_row_bytes;
        const char* b = job.x_out + row * job.out_row_bytes;
        switch (job.dtype) {
            case sgf::kFloat32: sums[row] = row_sums<sgf::kFloat32>(a, b, job.hidden); break;
            case sgf::kBFloat16: sums[row] = row_sums<sgf::kBFloat16>(a, b, job.hidden); break;
            default: sums[row] = row_sums<sgf::kFloat16>(a, b, job.hidden); break;
        }
    }
}
