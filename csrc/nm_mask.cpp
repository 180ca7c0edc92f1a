// N:M structured selection on CPU (C++17, at::parallel_for): the `cpp` backend of gradprobe::nm_mask
// and gradprobe::nm_prune_.
//
// Contract (gradprobe/ops/_schemas.py): score s = fp32(|w|) * |norm[j]| (or fp32(|w|)); in every m
// consecutive elements of a row the n smallest scores are pruned, ties to the lower index. Scores are
// >= 0, so their fp32 bit patterns compare like the floats (radix_select.h); each element's rank in
// its group, #{s_j < s_i} + #{j < i : s_j == s_i}, is computed directly (m <= 32: at most 1024
// integer compares per group, no sort). Non-finite weights raise ValueError before anything is written.
// M = 4 (2:4 and friends): keys are computed a chunk of a row at a time in a vectorisable loop (AVX2
// build picked at run time; GRADPROBE_CPP_DISABLE_AVX2=1 forces the portable one), and each group's
// 4-byte mask is a lookup indexed by its 6 pairwise comparisons; rows go in blocks dynamically
// scheduled over the OpenMP pool, and the mask asks for huge pages (cpu_util.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <optional>
#include <vector>

#include "cpu_util.h"
#include "radix_select.h"
#include "score_cpu.h"


namespace gradprobe {
namespace {

constexpr int64_t kGrainRows = 8;

// Validates the arguments; returns |norm| (empty = magnitude). Non-finite norms raise.
std::vector<float> check_args(const at::Tensor& w, const std::optional<at::Tensor>& norm, int64_t n, int64_t m) {
  check_weight(w, "weight");
  TORCH_CHECK_VALUE(0 < n && n < m && m <= 32, "N:M = ", n, ":", m,
                    " needs 0 < N < M <= 32 (N pruned of every M consecutive inputs)");
  TORCH_CHECK_VALUE(w.size(1) % m == 0, "N:M = ", n, ":", m, " needs a 2-D weight with in_features divisible by ", m,
                    ", got shape ", w.sizes());
  if (!norm.has_value() || !norm->defined()) return {};
  return abs_norm(*norm, w.size(1), "norm", "weight");
}

// Marks the n smallest of each group of M keys (ties: lower index) in `out`.
template <int M>
inline void select_group(const uint32_t* keys, int64_t n, int64_t m_rt, uint8_t* out) {
  const int m = M > 0 ? M : static_cast<int>(m_rt);
  for (int i = 0; i < m; ++i) {
    const uint32_t ki = keys[i];
    int rank = 0;
    for (int j = 0; j < m; ++j) rank += (keys[j] < ki) | ((keys[j] == ki) & (j < i));
    out[i] = static_cast<uint8_t>(rank < n);
  }
}

template <typename T, int M>
bool nm_rows(const T* w, const float* nrm, int64_t rows, int64_t in, int64_t n, int64_t m, uint8_t* mask) {
  using Raw = typename AbsBits<T>::Raw;
  std::atomic<bool> bad{false};
  at::parallel_for(0, rows, kGrainRows, [&](int64_t r0, int64_t r1) {
    uint32_t keys[32];
    uint32_t nonfin = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const Raw* raw = reinterpret_cast<const Raw*>(w) + r * in;
      uint8_t* mr = mask + r * in;
      for (int64_t g = 0; g < in; g += m) {
        for (int64_t i = 0; i < m; ++i) {
          const uint32_t a = AbsBits<T>::get(raw[g + i]);
          nonfin |= nonfinite(a);
          keys[i] = nrm != nullptr ? (f32_bits(bits_f32(a) * nrm[g + i]) & kKeyMask) : a;
        }
        select_group<M>(keys, n, m, mr + g);
      }
    }
    if (nonfin) bad.store(true, std::memory_order_relaxed);
  });
  return bad.load();
}

// ---- M = 4 ------------------------------------------------------------------------------------------

constexpr int64_t kChunk = 2048;  // keys per chunk (8 KiB, stays in L1)

// words[idx]: the 4 mask bytes of a group whose pairwise comparisons are idx (bit p = k_j <= k_i for
// the p-th pair (j < i) in (0,1) (0,2) (0,3) (1,2) (1,3) (2,3), i.e. j ranks before i); byte i = rank_i < n.
std::array<uint32_t, 64> group_words(int64_t n) {
  constexpr int kJ[6] = {0, 0, 0, 1, 1, 2}, kI[6] = {1, 2, 3, 2, 3, 3};
  std::array<uint32_t, 64> words{};
  for (uint32_t idx = 0; idx < 64; ++idx) {
    int rank[4] = {0, 0, 0, 0};
    for (int p = 0; p < 6; ++p) ++rank[((idx >> p) & 1u) ? kI[p] : kJ[p]];
    uint8_t bytes[4];
    for (int i = 0; i < 4; ++i) bytes[i] = static_cast<uint8_t>(rank[i] < n);
    std::memcpy(&words[idx], bytes, 4);
  }
  return words;
}

// out[g..g+3] = the mask bytes of the groups of keys[g0..len), g0 % 4 == 0
GP_INLINE void select4(const uint32_t* keys, int64_t g0, int64_t len, const uint32_t* words, uint8_t* out) {
  for (int64_t g = g0; g < len; g += 4) {
    const uint32_t* k = keys + g;
    const uint32_t idx = static_cast<uint32_t>(k[0] <= k[1]) | static_cast<uint32_t>(k[0] <= k[2]) << 1 |
                         static_cast<uint32_t>(k[0] <= k[3]) << 2 | static_cast<uint32_t>(k[1] <= k[2]) << 3 |
                         static_cast<uint32_t>(k[1] <= k[3]) << 4 | static_cast<uint32_t>(k[2] <= k[3]) << 5;
    std::memcpy(out + g, &words[idx], 4);
  }
}

#if GP_X86_AVX2
// -1 in the lanes of the n lowest-ranked keys of each group of 4 (one group per 128-bit half): rank_i
// counts j with k_j < k_i + [j < i] (keys <= 0x7FFFFFFF, so k_i + 1 cannot wrap for finite keys), over
// the 3 rotations of the group.
GP_TARGET_AVX2 GP_INLINE __m256i pruned8(__m256i v, __m256i nvec) {
  const __m256i r1 = _mm256_shuffle_epi32(v, _MM_SHUFFLE(0, 3, 2, 1)), r2 = _mm256_shuffle_epi32(v, _MM_SHUFFLE(1, 0, 3, 2)),
                r3 = _mm256_shuffle_epi32(v, _MM_SHUFFLE(2, 1, 0, 3));
  const __m256i a1 = _mm256_setr_epi32(0, 0, 0, 1, 0, 0, 0, 1), a2 = _mm256_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1),
                a3 = _mm256_setr_epi32(0, 1, 1, 1, 0, 1, 1, 1);
  __m256i rank = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_cmpgt_epi32(_mm256_add_epi32(v, a1), r1));
  rank = _mm256_sub_epi32(rank, _mm256_cmpgt_epi32(_mm256_add_epi32(v, a2), r2));
  rank = _mm256_sub_epi32(rank, _mm256_cmpgt_epi32(_mm256_add_epi32(v, a3), r3));
  return _mm256_cmpgt_epi32(nvec, rank);
}

// select4 for keys[0..len), 32 at a time in vectors, the rest by the table (one call per chunk)
GP_TARGET_AVX2 void select4_avx2(const uint32_t* keys, int64_t len, int64_t n, const uint32_t* words, uint8_t* out) {
  const __m256i nvec = _mm256_set1_epi32(static_cast<int>(n)), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t g = 0;
  for (; g + 32 <= len; g += 32) {
    __m256i p[4];
    for (int h = 0; h < 4; ++h)
      p[h] = pruned8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + g + 8 * h)), nvec);
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(p[0], p[1]), _mm256_packs_epi32(p[2], p[3]));
    const __m256i bytes = _mm256_and_si256(_mm256_permutevar8x32_epi32(b, order), _mm256_set1_epi8(1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g), bytes);
  }
  select4(keys, g, len, words, out);
}
#endif

template <typename T, bool kAvx2>
GP_INLINE uint32_t nm4_rows_impl(const T* w, const float* nrm, int64_t in, int64_t n, int64_t r0, int64_t r1,
                                 const uint32_t* words, uint8_t* mask) {
  uint32_t keys[kChunk];
  uint32_t nonfin = 0;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c0 = 0; c0 < in; c0 += kChunk) {
      const int64_t len = std::min(kChunk, in - c0);
      nonfin |= fill_keys(w + r * in + c0, nrm != nullptr ? nrm + c0 : nullptr, len, keys);
#if GP_X86_AVX2
      if constexpr (kAvx2) {
        select4_avx2(keys, len, n, words, mask + r * in + c0);
        continue;
      }
#endif
      select4(keys, 0, len, words, mask + r * in + c0);
    }
  }
  return nonfin;
}

template <typename T>
uint32_t nm4_rows(const T* w, const float* nrm, int64_t in, int64_t n, int64_t r0, int64_t r1, const uint32_t* words,
                  uint8_t* mask) {
  return nm4_rows_impl<T, false>(w, nrm, in, n, r0, r1, words, mask);
}

#if GP_X86_AVX2
template <typename T>
GP_TARGET_AVX2 uint32_t nm4_rows_avx2(const T* w, const float* nrm, int64_t in, int64_t n, int64_t r0, int64_t r1,
                                      const uint32_t* words, uint8_t* mask) {
  return nm4_rows_impl<T, true>(w, nrm, in, n, r0, r1, words, mask);
}
#endif

// Blocks of rows (~256 KiB of weight each), dynamically scheduled: robust to a loaded machine.
template <typename T>
bool nm4(const T* w, const float* nrm, int64_t rows, int64_t in, int64_t n, uint8_t* mask) {
  const std::array<uint32_t, 64> words = group_words(n);
  auto fn = &nm4_rows<T>;
#if GP_X86_AVX2
  if (avx2_enabled()) fn = &nm4_rows_avx2<T>;
#endif
  const int64_t block = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, in * static_cast<int64_t>(sizeof(T))));
  const int64_t nb = (rows + block - 1) / block;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nb)));
  uint32_t nonfin = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) reduction(| : nonfin)
  for (int64_t b = 0; b < nb; ++b) nonfin |= fn(w, nrm, in, n, b * block, std::min(rows, b * block + block), words.data(), mask);
  return nonfin != 0;
}

template <typename T>
bool nm_dispatch_m(const T* w, const float* nrm, int64_t rows, int64_t in, int64_t n, int64_t m, uint8_t* mask) {
  switch (m) {
    case 4: return nm4<T>(w, nrm, rows, in, n, mask);
    case 8: return nm_rows<T, 8>(w, nrm, rows, in, n, m, mask);
    case 16: return nm_rows<T, 16>(w, nrm, rows, in, n, m, mask);
    default: return nm_rows<T, 0>(w, nrm, rows, in, n, m, mask);
  }
}

at::Tensor nm_mask(const at::Tensor& weight, const std::optional<at::Tensor>& norm, int64_t n, int64_t m) {
  const std::vector<float> nv = check_args(weight, norm, n, m);
  const float* nrm = nv.empty() ? nullptr : nv.data();
  const int64_t rows = weight.size(0), in = weight.size(1);
  at::Tensor mask = empty_huge({rows, in}, weight.options().dtype(at::kBool));
  uint8_t* mp = reinterpret_cast<uint8_t*>(mask.data_ptr<bool>());
  const bool bad = dispatch_weight(weight.scalar_type(), [&](auto tag) {
    return nm_dispatch_m(weight.const_data_ptr<decltype(tag)>(), nrm, rows, in, n, m, mp);
  });
  if (bad) {
    const auto idx = (~at::isfinite(weight)).nonzero()[0];
    TORCH_CHECK_VALUE(false, "weight contains NaN or Inf (first at index (", idx[0].item<int64_t>(), ", ",
                      idx[1].item<int64_t>(),
                      ")); ", kFiniteHint);
  }
  return mask;
}

at::Tensor nm_prune_(at::Tensor& weight, const std::optional<at::Tensor>& norm, int64_t n, int64_t m) {
  at::Tensor mask = nm_mask(weight, norm, n, m);  // raises before any write
  zero_masked(weight, mask);
  return mask;
}

}  // namespace
}  // namespace gradprobe

TORCH_LIBRARY_FRAGMENT(gradprobe_cpp, m) {
  m.def("nm_mask(Tensor weight, Tensor? norm, int n, int m) -> Tensor");
  m.def("nm_prune_(Tensor(a!) weight, Tensor? norm, int n, int m) -> Tensor");
}

TORCH_LIBRARY_IMPL(gradprobe_cpp, CPU, m) {
  m.impl("nm_mask", &gradprobe::nm_mask);
  m.impl("nm_prune_", &gradprobe::nm_prune_);
}
