// Key-block passes of the CPU radix select, shared by the row (row_select.cpp) and global
// (global_select.cpp) selection ops: compaction of the keys of one bucket (scalar and AVX2) and digit
// histograms with interleaved counter sets. Host-only (AVX2 intrinsics); include after cpu_util.h.
#pragma once
#include <cstdint>

#include "cpu_util.h"

namespace gradprobe {

// cand[0:m] = the keys of in[0:n] whose digit ((key >> shift) & dmask) == b, in order; returns m.
// cand may alias in (m <= j always). Needs kSlack writable slots past the last candidate.
inline int64_t compact_scalar(const uint32_t* in, int64_t n, int shift, uint32_t dmask, uint32_t b, uint32_t* cand) {
  int64_t m = 0;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t key = in[j];
    cand[m] = key;  // branch-free: always store, advance only on a match
    m += ((key >> shift) & dmask) == b;
  }
  return m;
}

constexpr int64_t kSlack = 8;

#if GP_X86_AVX2
// For each 8-bit lane mask, the lane indices of its set bits, packed to the front.
struct CompressLut {
  alignas(64) uint8_t idx[256][8];
  CompressLut() {
    for (int msk = 0; msk < 256; ++msk) {
      int c = 0;
      for (int i = 0; i < 8; ++i)
        if (msk >> i & 1) idx[msk][c++] = static_cast<uint8_t>(i);
      for (; c < 8; ++c) idx[msk][c] = 0;
    }
  }
};
inline const CompressLut kCompressLut;

GP_TARGET_AVX2 inline int64_t compact_avx2(const uint32_t* in, int64_t n, int shift, uint32_t dmask, uint32_t b,
                                           uint32_t* cand) {
  const __m256i vb = _mm256_set1_epi32(static_cast<int>(b));
  const __m256i vm = _mm256_set1_epi32(static_cast<int>(dmask));
  const __m128i sh = _mm_cvtsi32_si128(shift);
  int64_t m = 0, j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + j));
    const __m256i d = _mm256_and_si256(_mm256_srl_epi32(v, sh), vm);
    const int msk = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(d, vb)));
    const __m256i perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kCompressLut.idx[msk])));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cand + m), _mm256_permutevar8x32_epi32(v, perm));
    m += __builtin_popcount(static_cast<unsigned>(msk));
  }
  return m + compact_scalar(in + j, n - j, shift, dmask, b, cand + m);
}
#endif

template <bool kAvx2>
inline int64_t compact(const uint32_t* in, int64_t n, int shift, uint32_t dmask, uint32_t b, uint32_t* cand) {
#if GP_X86_AVX2
  if constexpr (kAvx2) return compact_avx2(in, n, shift, dmask, b, cand);
#endif
  return compact_scalar(in, n, shift, dmask, b, cand);
}

// hist[0:nb] = counts of digit(key) over keys[0:n]; hist needs kHistCopies * nb slots. Long inputs use
// kHistCopies interleaved counter sets: with ties (many equal keys, e.g. zeros of a pruned matrix)
// one counter set serialises every increment on the same address.
constexpr int kHistCopies = 4;

// Adds the counts of digit(key) over keys[0:n] into kHistCopies interleaved sets hist[c * nb + d].
template <typename D>
GP_INLINE void histogram_add(const uint32_t* keys, int64_t n, uint32_t* hist, uint32_t nb, D digit) {
  uint32_t *h1 = hist + nb, *h2 = hist + 2 * nb, *h3 = hist + 3 * nb;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    ++hist[digit(keys[j])];
    ++h1[digit(keys[j + 1])];
    ++h2[digit(keys[j + 2])];
    ++h3[digit(keys[j + 3])];
  }
  for (; j < n; ++j) ++hist[digit(keys[j])];
}

}  // namespace gradprobe
