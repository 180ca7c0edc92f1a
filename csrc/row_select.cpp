// Exact k-smallest selection per row on CPU (C++17 + OpenMP): the `cpp` backend of gradprobe::row_threshold,
// row_mask and row_prune_.
//
// Contract (gradprobe/ops/_schemas.py): score s = fp32(|w|) * |norm[j]| (one fp32 multiply) or fp32(|w|);
// each row prunes its k smallest scores, ties to the lower column index.
// Method: radix select on an order-preserving uint32 key of s (radix_select.h): histogram the top digit,
// find the bucket holding rank k-1, refine inside it (radix_passes.h). No sort.
// Blocks of rows per thread; a row's keys stay in a thread-local buffer (W is read once, the mask pass
// reads the buffer). A strided sample brackets the k-th key so that one vector pass counts the keys
// below the bracket and compacts those inside; the radix refinement then only sees those candidates
// (falls back to the full-row histogram if the bracket missed: exact always). Hot loops are compiled
// twice (baseline and AVX2) and picked at run time. Non-finite weights are detected during the
// selection and raise ValueError before anything is written.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_util.h"
#include "radix_passes.h"
#include "radix_select.h"
#include "score_cpu.h"

namespace gradprobe {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Kth {
  uint32_t key;
  int64_t take, equal;
};

template <typename D>
GP_INLINE void histogram(const uint32_t* keys, int64_t n, uint32_t* hist, uint32_t nb, D digit) {
  if (n < static_cast<int64_t>(nb)) {
    std::fill(hist, hist + nb, 0u);
    for (int64_t j = 0; j < n; ++j) ++hist[digit(keys[j])];
    return;
  }
  std::fill(hist, hist + kHistCopies * nb, 0u);
  histogram_add(keys, n, hist, nb, digit);
  for (uint32_t b = 0; b < nb; ++b) hist[b] += hist[nb + b] + hist[2 * nb + b] + hist[3 * nb + b];
}

// True iff keys[0:n] (n >= 1) are all the same key (a vectorised min/max).
GP_INLINE bool all_equal(const uint32_t* keys, int64_t n) {
  uint32_t lo = keys[0], hi = keys[0];
  for (int64_t j = 0; j < n; ++j) {
    lo = std::min(lo, keys[j]);
    hi = std::max(hi, keys[j]);
  }
  return lo == hi;
}

// The k-th smallest key (1 <= k <= n) of keys[0:n], and its take/equal counts.
// cand: scratch of n + kSlack keys; hist: scratch of kHistCopies * kRowBuckets1 counters.
template <bool kAvx2>
GP_INLINE Kth row_select(const uint32_t* keys, int64_t n, int64_t k, uint32_t* cand, uint32_t* hist) {
  int64_t r = k - 1;  // 0-based rank, reduced by the count of every lower bucket as we refine
  histogram(keys, n, hist, kRowBuckets1, [](uint32_t key) { return key >> kRowShift1; });
  const uint32_t b1 = find_bucket(hist, kRowBuckets1, r);
  const int64_t m = compact<kAvx2>(keys, n, kRowShift1, kRowBuckets1 - 1, b1, cand);
  if (all_equal(cand, m)) return {cand[0], r + 1, m};  // ties: nothing left to refine
  histogram(cand, m, hist, kRowBuckets2, [](uint32_t key) { return (key >> kRowShift2) & (kRowBuckets2 - 1); });
  const uint32_t b2 = find_bucket(hist, kRowBuckets2, r);
  const int64_t m2 = compact<kAvx2>(cand, m, kRowShift2, kRowBuckets2 - 1, b2, cand);
  if (all_equal(cand, m2)) return {cand[0], r + 1, m2};
  histogram(cand, m2, hist, kRowBuckets3, [](uint32_t key) { return key & (kRowBuckets3 - 1); });
  const uint32_t b3 = find_bucket(hist, kRowBuckets3, r);
  return {(b1 << kRowShift1) | (b2 << kRowShift2) | b3, r + 1, static_cast<int64_t>(hist[b3])};
}

// cand[0:m] = the keys of in[0:n] inside [lo, hi], in order; *less = how many keys are < lo.
inline int64_t compact_range_scalar(const uint32_t* in, int64_t n, uint32_t lo, uint32_t hi, uint32_t* cand,
                                    int64_t* less) {
  int64_t m = 0, lt = 0;
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t key = in[j];
    cand[m] = key;
    m += (key >= lo) & (key <= hi);
    lt += key < lo;
  }
  *less += lt;
  return m;
}

#if GP_X86_AVX2
GP_TARGET_AVX2 int64_t compact_range_avx2(const uint32_t* in, int64_t n, uint32_t lo, uint32_t hi, uint32_t* cand,
                                          int64_t* less) {
  // keys are < 2^31, so signed 32-bit compares order them correctly
  const __m256i vlo = _mm256_set1_epi32(static_cast<int>(lo)), vhi = _mm256_set1_epi32(static_cast<int>(hi));
  __m256i vless = _mm256_setzero_si256();
  int64_t m = 0, j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + j));
    const __m256i below = _mm256_cmpgt_epi32(vlo, v);
    const __m256i out = _mm256_or_si256(below, _mm256_cmpgt_epi32(v, vhi));
    vless = _mm256_sub_epi32(vless, below);
    const int msk = ~_mm256_movemask_ps(_mm256_castsi256_ps(out)) & 0xFF;
    const __m256i perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kCompressLut.idx[msk])));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cand + m), _mm256_permutevar8x32_epi32(v, perm));
    m += __builtin_popcount(static_cast<unsigned>(msk));
  }
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), vless);
  for (uint32_t c : lanes) *less += c;
  return m + compact_range_scalar(in + j, n - j, lo, hi, cand + m, less);
}
#endif

// row_select with a sampled first pass: a histogram of every kSampleStride-th key brackets rank k-1
// in a key range [lo, hi]; one vector pass counts the keys below lo and compacts those inside; if
// rank k-1 falls among them, the exact select runs on that small set. Otherwise (unlucky sample,
// adversarial data) it falls back to the full histogram. The result is exact either way.
template <bool kAvx2>
GP_INLINE Kth row_select_sampled(const uint32_t* keys, int64_t n, int64_t k, uint32_t* cand, uint32_t* hist) {
  constexpr int64_t kSampleStride = 8, kMinN = 2048;
  if (n < kMinN) return row_select<kAvx2>(keys, n, k, cand, hist);
  std::fill(hist, hist + kRowBuckets1, 0u);
  int64_t s = 0;
  for (int64_t j = 0; j < n; j += kSampleStride, ++s) ++hist[keys[j] >> kRowShift1];
  const double p = static_cast<double>(k - 1) / static_cast<double>(n);
  const int64_t ks = static_cast<int64_t>(p * static_cast<double>(s));
  // +-4 standard deviations of the sample rank (binomial), plus a little for small samples
  const int64_t delta = static_cast<int64_t>(4.0 * std::sqrt(static_cast<double>(s) * p * (1.0 - p))) + 4;
  int64_t rlo = std::max<int64_t>(0, ks - delta), rhi = std::min<int64_t>(s - 1, ks + delta);
  const uint32_t blo = find_bucket(hist, kRowBuckets1, rlo), bhi = find_bucket(hist, kRowBuckets1, rhi);
  const uint32_t lo = blo << kRowShift1, hi = ((bhi + 1) << kRowShift1) - 1;
  int64_t less = 0;
  int64_t m;
#if GP_X86_AVX2
  if constexpr (kAvx2) {
    m = compact_range_avx2(keys, n, lo, hi, cand, &less);
  } else {
    m = compact_range_scalar(keys, n, lo, hi, cand, &less);
  }
#else
  m = compact_range_scalar(keys, n, lo, hi, cand, &less);
#endif
  if (less <= k - 1 && k - 1 < less + m) {
    // every key equal to the k-th lies in [lo, hi], so take/equal within cand are the row's
    return row_select<kAvx2>(cand, m, k - less, cand, hist);
  }
  return row_select<kAvx2>(keys, n, k, cand, hist);
}

// mask[j] = key < T, or key == T among the first `take` such keys in index order.
GP_INLINE void row_mask_write(const uint32_t* keys, int64_t n, const Kth& t, bool* mask) {
  int64_t cut = -1;  // last index whose tied key is pruned
  if (t.take >= t.equal) {
    cut = n;
  } else if (t.take > 0) {
    int64_t seen = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (keys[j] == t.key && ++seen == t.take) {
        cut = j;
        break;
      }
    }
  }
  const uint32_t T = t.key;
  const int64_t split = std::min(n, cut + 1);  // tied keys before `split` are pruned, after it kept
  for (int64_t j = 0; j < split; ++j) mask[j] = keys[j] <= T;
  for (int64_t j = split; j < n; ++j) mask[j] = keys[j] < T;
}

struct RowOut {
  float* thr;  // all three null, or all three set
  int64_t* take;
  int64_t* equal;
  bool* mask;  // may be null
};

// One row: keys into the thread's buffer (the only read of W), select, triple and/or mask.
// Returns the non-finite flag.
template <typename T, bool kAvx2>
GP_INLINE uint32_t row_one(const T* w, const float* nrm, int64_t n, int64_t k, int64_t i, uint32_t* keys,
                           uint32_t* cand, uint32_t* hist, const RowOut& out) {
  const uint32_t bad = fill_keys(w, nrm, n, keys);
  Kth t{0, 0, 0};
  if (k > 0) t = row_select_sampled<kAvx2>(keys, n, k, cand, hist);
  if (out.thr != nullptr) {
    out.thr[i] = k > 0 ? bits_f32(t.key) : kNegInf;
    out.take[i] = t.take;
    out.equal[i] = t.equal;
  }
  if (out.mask != nullptr) {
    if (k > 0) {
      row_mask_write(keys, n, t, out.mask + i * n);
    } else {
      std::fill(out.mask + i * n, out.mask + (i + 1) * n, false);
    }
  }
  return bad;
}

template <typename T>
uint32_t row_one_default(const T* w, const float* nrm, int64_t n, int64_t k, int64_t i, uint32_t* keys,
                         uint32_t* cand, uint32_t* hist, const RowOut& out) {
  return row_one<T, false>(w, nrm, n, k, i, keys, cand, hist, out);
}

#if GP_X86_AVX2
// The same code compiled for AVX2 (wider vector loops and the vector compaction), picked at run time.
template <typename T>
GP_TARGET_AVX2 uint32_t row_one_avx2(const T* w, const float* nrm, int64_t n, int64_t k, int64_t i, uint32_t* keys,
                                     uint32_t* cand, uint32_t* hist, const RowOut& out) {
  return row_one<T, true>(w, nrm, n, k, i, keys, cand, hist, out);
}
#endif

// Runs the per-row selection into `out`. Returns the first row holding a non-finite weight, or -1.
template <typename T>
int64_t row_run(const at::Tensor& weight, const float* nrm, int64_t k, const RowOut& out) {
  const int64_t rows = weight.size(0), n = weight.size(1);
  const T* wp = weight.data_ptr<T>();
  std::vector<uint8_t> bad(static_cast<size_t>(rows), 0);
  auto row_fn = &row_one_default<T>;
#if GP_X86_AVX2
  if (avx2_enabled()) row_fn = &row_one_avx2<T>;
#endif
  const int nt = threads_for(rows * n);
  // contiguous blocks of rows (streaming reads of W and writes of the mask), 8 per thread for balance
  const int64_t rows_per_task = std::max<int64_t>(1, rows / (8 * nt));
#pragma omp parallel num_threads(nt)
  {
    std::unique_ptr<uint32_t[]> keys(new uint32_t[n + kSlack]);
    std::unique_ptr<uint32_t[]> cand(new uint32_t[n + kSlack]);
    alignas(64) uint32_t hist[kHistCopies * kRowBuckets1];
#pragma omp for schedule(dynamic, rows_per_task)
    for (int64_t i = 0; i < rows; ++i) {
      bad[i] = row_fn(wp + i * n, nrm, n, k, i, keys.get(), cand.get(), hist, out) != 0;
    }
  }
  for (int64_t i = 0; i < rows; ++i)
    if (bad[i]) return i;
  return -1;
}

struct RowArgs {
  std::vector<float> nrm;
  const float* nrm_ptr() const { return nrm.empty() ? nullptr : nrm.data(); }
};

RowArgs check_row(const at::Tensor& weight, const std::optional<at::Tensor>& norm, int64_t k) {
  check_weight(weight, "weight");
  TORCH_CHECK_VALUE(weight.size(1) < (int64_t{1} << 32), "weight rows longer than 2^32 are not supported");
  TORCH_CHECK_VALUE(0 <= k && k <= weight.size(1), "k must be in [0, in_features=", weight.size(1), "], got ", k);
  RowArgs a;
  if (norm.has_value()) a.nrm = abs_norm(*norm, weight.size(1), "norm", "weight");
  return a;
}

void throw_bad_row(int64_t row) {
  TORCH_CHECK_VALUE(row < 0, "weight contains NaN or Inf (first in row ", row, "); ", kFiniteHint);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_threshold(const at::Tensor& weight,
                                                             const std::optional<at::Tensor>& norm, int64_t k) {
  const RowArgs a = check_row(weight, norm, k);
  const int64_t rows = weight.size(0);
  at::Tensor thr = at::empty({rows}, weight.options().dtype(at::kFloat));
  at::Tensor take = at::empty({rows}, weight.options().dtype(at::kLong));
  at::Tensor equal = at::empty({rows}, weight.options().dtype(at::kLong));
  const int64_t bad = dispatch_weight(weight.scalar_type(), [&](auto tag) {
    return row_run<decltype(tag)>(
        weight, a.nrm_ptr(), k,
        RowOut{thr.data_ptr<float>(), take.data_ptr<int64_t>(), equal.data_ptr<int64_t>(), nullptr});
  });
  throw_bad_row(bad);
  return {thr, take, equal};
}

at::Tensor row_mask(const at::Tensor& weight, const std::optional<at::Tensor>& norm, int64_t k) {
  const RowArgs a = check_row(weight, norm, k);
  at::Tensor mask = empty_huge(weight.sizes(), weight.options().dtype(at::kBool));
  const int64_t bad = dispatch_weight(weight.scalar_type(), [&](auto tag) {
    return row_run<decltype(tag)>(weight, a.nrm_ptr(), k, RowOut{nullptr, nullptr, nullptr, mask.data_ptr<bool>()});
  });
  throw_bad_row(bad);
  return mask;
}

at::Tensor row_prune_(at::Tensor& weight, const std::optional<at::Tensor>& norm, int64_t k) {
  at::Tensor mask = row_mask(weight, norm, k);  // throws on NaN/Inf before anything is written
  zero_masked(weight, mask);
  return mask;
}

}  // namespace
}  // namespace gradprobe

// Schemas: the row_* entries of SCHEMAS in gradprobe/ops/_schemas.py.
TORCH_LIBRARY_FRAGMENT(gradprobe_cpp, m) {
  m.def("row_threshold(Tensor weight, Tensor? norm, int k) -> (Tensor threshold, Tensor take, Tensor equal)");
  m.def("row_mask(Tensor weight, Tensor? norm, int k) -> Tensor");
  m.def("row_prune_(Tensor(a!) weight, Tensor? norm, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(gradprobe_cpp, CPU, m) {
  m.impl("row_threshold", &gradprobe::row_threshold);
  m.impl("row_mask", &gradprobe::row_mask);
  m.impl("row_prune_", &gradprobe::row_prune_);
}
