// Exact k-smallest selection on CPU (C++17 + OpenMP): the `cpp` backend of the gradprobe:: selection ops.
//
// Contract (gradprobe/ops/_schemas.py): score s = fp32(|w|) * |norm[j]| (one fp32 multiply) or fp32(|w|);
// the pruned set of a group is the k smallest scores, ties to the earlier (tensor, flat index).
// Method: radix select on an order-preserving uint32 key of s (radix_select.h): histogram the top digit,
// find the bucket holding rank k-1, refine inside it. No sort, no concatenation.
//   * row ops: blocks of rows per thread; a row's keys stay in a thread-local buffer (W is read once,
//     the mask pass reads the buffer). A strided sample brackets the k-th key so that one vector pass
//     counts the keys below the bracket and compacts those inside; the radix refinement then only
//     sees those candidates (falls back to the full-row histogram if the bracket missed: exact always).
//   * global ops: stream over the tensors in 64Ki-element chunks, per-thread histograms reduced
//     (O(buckets) memory, two passes); the mask pass writes key <= T and counts ties per chunk, then
//     rewrites only the chunks after the take-th tie in group order.
//   * hot loops are compiled twice (baseline and AVX2) and picked at run time.
// Non-finite weights are detected during the selection and raise ValueError before anything is written.
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
#include "radix_select.h"
#include "score_cpu.h"

namespace gradprobe {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kBlock = 4096;         // keys computed per block (16 KiB buffer, stays in L1)
constexpr int64_t kChunk = 1 << 16;      // global ops: elements per parallel task

int num_threads() { return std::max(1, at::get_num_threads()); }

// ---- per row -------------------------------------------------------------------------------------

struct Kth {
  uint32_t key;
  int64_t take, equal;
};

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
const CompressLut kCompressLut;

GP_TARGET_AVX2 int64_t compact_avx2(const uint32_t* in, int64_t n, int shift, uint32_t dmask, uint32_t b,
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

// ---- global (one group over a list of tensors) ---------------------------------------------------

struct Chunk {
  int64_t t, f0, f1;  // tensor position, flat range [f0, f1)
};

struct Group {
  std::vector<at::Tensor> w;
  std::vector<std::vector<float>> nrm;  // |norms[i]|, or empty (magnitude)
  std::vector<Chunk> chunks;            // in group order
  int64_t total = 0;
  bool avx2 = false;                    // AVX2 loops (avx2_enabled(), read once per op)
};

Group make_group(at::TensorList weights, at::TensorList norms) {
  TORCH_CHECK_VALUE(!weights.empty(), "weights is empty; pass at least one tensor to prune");
  TORCH_CHECK_VALUE(norms.empty() || norms.size() == weights.size(), "norms has ", norms.size(), " entries for ",
                    weights.size(), " weights; pass one per weight or an empty list (magnitude scores)");
  Group g;
  g.avx2 = avx2_enabled();
  for (size_t i = 0; i < weights.size(); ++i) {
    const std::string name = "weights[" + std::to_string(i) + "]";
    check_weight(weights[i], name);
    g.w.push_back(weights[i]);
    g.nrm.push_back(norms.empty() ? std::vector<float>{}
                                  : abs_norm(norms[i], weights[i].size(1), "norms[" + std::to_string(i) + "]", name));
    const int64_t n = weights[i].numel();
    for (int64_t f = 0; f < n; f += kChunk) g.chunks.push_back({static_cast<int64_t>(i), f, std::min(n, f + kChunk)});
    g.total += n;
  }
  return g;
}

// One streaming pass over a chunk of the group, block by block (keys of a block stay in L1).
enum class Pass { kHist1, kHist2, kMask };
enum class MaskMode { kNone, kLess, kLessEq, kCut };

struct PassArgs {
  Pass pass;
  uint32_t b1 = 0;            // kHist2: the selected top digit
  uint32_t T = 0;             // kMask: the threshold key
  uint32_t* hist = nullptr;   // kHist1 / kHist2: the thread's counters (kHistCopies sets)
  uint32_t* cand = nullptr;   // kHist2: kBlock + kSlack scratch
  int64_t count = 0;          // kMask with kLessEq: out, the ties seen
  bool* mask = nullptr;       // kMask: the tensor's mask (flat)
  MaskMode mode = MaskMode::kNone;
  int64_t left = 0;           // kCut: tied keys still to prune in this chunk
};

template <typename W, bool kAvx2>
GP_INLINE uint32_t chunk_pass(const W* wp, const float* nrm, int64_t cols, int64_t f0, int64_t f1, uint32_t* buf,
                              PassArgs& a) {
  uint32_t bad = 0;
  for (int64_t f = f0; f < f1;) {
    const int64_t c0 = f % cols;
    const int64_t len = std::min({cols - c0, f1 - f, kBlock});
    bad |= fill_keys(wp + f, nrm == nullptr ? nullptr : nrm + c0, len, buf);
    const uint32_t T = a.T;
    switch (a.pass) {
      case Pass::kHist1:
        histogram_add(buf, len, a.hist, kGlobBuckets1, [](uint32_t key) { return key >> kGlobShift; });
        break;
      case Pass::kHist2: {  // only keys inside the selected top-digit bucket are counted
        const int64_t m = compact<kAvx2>(buf, len, kGlobShift, kGlobBuckets1 - 1, a.b1, a.cand);
        histogram_add(a.cand, m, a.hist, kGlobBuckets2, [](uint32_t key) { return key & (kGlobBuckets2 - 1); });
        break;
      }
      case Pass::kMask: {
        bool* mm = a.mask + f;
        switch (a.mode) {
          case MaskMode::kNone:
            std::fill(mm, mm + len, false);
            break;
          case MaskMode::kLess:
            for (int64_t j = 0; j < len; ++j) mm[j] = buf[j] < T;
            break;
          case MaskMode::kLessEq: {  // also counts the ties, for the fix-up of the tie cut
            int64_t c = 0;
            for (int64_t j = 0; j < len; ++j) {
              mm[j] = buf[j] <= T;
              c += buf[j] == T;
            }
            a.count += c;
            break;
          }
          case MaskMode::kCut:  // the one chunk where the tie cut falls: first `left` ties pruned
            for (int64_t j = 0; j < len; ++j) {
              const bool e = buf[j] == T && a.left > 0;
              a.left -= e;
              mm[j] = buf[j] < T || e;
            }
            break;
        }
        break;
      }
    }
    f += len;
  }
  return bad;
}

template <typename T>
uint32_t chunk_pass_default(const T* wp, const float* nrm, int64_t cols, int64_t f0, int64_t f1, uint32_t* buf,
                            PassArgs& a) {
  return chunk_pass<T, false>(wp, nrm, cols, f0, f1, buf, a);
}

#if GP_X86_AVX2
template <typename T>
GP_TARGET_AVX2 uint32_t chunk_pass_avx2(const T* wp, const float* nrm, int64_t cols, int64_t f0, int64_t f1,
                                        uint32_t* buf, PassArgs& a) {
  return chunk_pass<T, true>(wp, nrm, cols, f0, f1, buf, a);
}
#endif

// Runs pass `a` over chunk c; returns the non-finite flag.
uint32_t run_chunk(const Group& g, const Chunk& c, uint32_t* buf, PassArgs& a) {
  const at::Tensor& w = g.w[c.t];
  const float* nrm = g.nrm[c.t].empty() ? nullptr : g.nrm[c.t].data();
  return dispatch_weight(w.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* wp = w.data_ptr<T>();
#if GP_X86_AVX2
    if (g.avx2) return chunk_pass_avx2<T>(wp, nrm, w.size(1), c.f0, c.f1, buf, a);
#endif
    return chunk_pass_default<T>(wp, nrm, w.size(1), c.f0, c.f1, buf, a);
  });
}

void throw_bad_chunk(const Group& g, const std::vector<uint8_t>& bad) {
  for (size_t c = 0; c < bad.size(); ++c)
    TORCH_CHECK_VALUE(!bad[c], "weights[", g.chunks[c].t, "] contains NaN or Inf; ", kFiniteHint);
}

// Histogram pass (kHist1 / kHist2) over the whole group: per-thread uint32 counters, flushed into
// int64 before they could overflow, then reduced.
std::vector<int64_t> group_histogram(const Group& g, PassArgs proto, uint32_t nb, std::vector<uint8_t>& bad) {
  const int nt = num_threads();
  std::vector<std::vector<int64_t>> sums(static_cast<size_t>(nt));
  const int64_t nc = static_cast<int64_t>(g.chunks.size());
#pragma omp parallel num_threads(nt)
  {
    std::vector<int64_t>& sum = sums[omp_get_thread_num()];
    sum.assign(nb, 0);
    std::vector<uint32_t> h(kHistCopies * static_cast<size_t>(nb), 0);
    std::vector<uint32_t> cand(kBlock + kSlack);
    alignas(64) uint32_t buf[kBlock];
    PassArgs a = proto;
    a.hist = h.data();
    a.cand = cand.data();
    int64_t since_flush = 0;
    auto flush = [&] {
      for (int c = 0; c < kHistCopies; ++c)
        for (uint32_t b = 0; b < nb; ++b) sum[b] += h[static_cast<size_t>(c) * nb + b];
      std::fill(h.begin(), h.end(), 0u);
      since_flush = 0;
    };
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < nc; ++c) {
      if (since_flush > (int64_t{1} << 31)) flush();
      bad[c] |= run_chunk(g, g.chunks[c], buf, a) != 0;
      since_flush += g.chunks[c].f1 - g.chunks[c].f0;
    }
    flush();
  }
  std::vector<int64_t> out(nb, 0);
  for (const auto& sum : sums)
    for (size_t b = 0; b < sum.size(); ++b) out[b] += sum[b];
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> global_threshold(at::TensorList weights, at::TensorList norms,
                                                                int64_t k) {
  const Group g = make_group(weights, norms);
  TORCH_CHECK_VALUE(0 <= k && k <= g.total, "k must be in [0, total elements=", g.total, "], got ", k);
  std::vector<uint8_t> bad(g.chunks.size(), 0);
  const at::TensorOptions opt = weights[0].options();
  PassArgs p1{Pass::kHist1};
  const std::vector<int64_t> h1 = group_histogram(g, p1, kGlobBuckets1, bad);
  throw_bad_chunk(g, bad);
  float thr = kNegInf;
  int64_t take = 0, equal = 0;
  if (k > 0) {
    int64_t r = k - 1;
    PassArgs p2{Pass::kHist2};
    p2.b1 = find_bucket(h1.data(), kGlobBuckets1, r);
    const std::vector<int64_t> h2 = group_histogram(g, p2, kGlobBuckets2, bad);
    const uint32_t b2 = find_bucket(h2.data(), kGlobBuckets2, r);
    thr = bits_f32((p2.b1 << kGlobShift) | b2);
    take = r + 1;
    equal = h2[b2];
  }
  return {at::scalar_tensor(thr, opt.dtype(at::kFloat)), at::scalar_tensor(take, opt.dtype(at::kLong)),
          at::scalar_tensor(equal, opt.dtype(at::kLong))};
}

// Writes masks[i] for the group from (threshold, take); throws on NaN/Inf (masks may then be partial,
// weights are untouched).
void global_mask_into(const Group& g, const at::Tensor& threshold, const at::Tensor& take_t,
                      std::vector<at::Tensor>& masks) {
  TORCH_CHECK_VALUE(threshold.numel() == 1 && threshold.scalar_type() == at::kFloat,
                    "threshold must be a 0-dim float32 tensor (from global_threshold), got ", threshold.scalar_type(),
                    " of shape ", threshold.sizes());
  TORCH_CHECK_VALUE(take_t.numel() == 1 && take_t.scalar_type() == at::kLong,
                    "take must be a 0-dim int64 tensor (from global_threshold), got ", take_t.scalar_type(),
                    " of shape ", take_t.sizes());
  const float thr = threshold.item<float>();
  const int64_t take = take_t.item<int64_t>();
  TORCH_CHECK_VALUE(!std::isnan(thr), "threshold is NaN; pass the threshold returned by global_threshold");
  TORCH_CHECK_VALUE(take >= 0, "take must be >= 0, got ", take);
  // scores are >= 0: a negative threshold (-inf when k == 0) selects nothing
  const bool none = thr < 0.0f;
  const uint32_t T = none ? 0u : f32_bits(thr + 0.0f);  // + 0.0f maps -0.0 to +0.0
  const int64_t nc = static_cast<int64_t>(g.chunks.size());
  std::vector<uint8_t> bad(static_cast<size_t>(nc), 0);
  // One pass writes key <= T everywhere and counts each chunk's ties; then only the chunks whose
  // ties must not all be pruned (the first `take` ties in group order are) are rewritten.
  std::vector<int64_t> eq(static_cast<size_t>(nc), 0);
  const MaskMode first = none ? MaskMode::kNone : take > 0 ? MaskMode::kLessEq : MaskMode::kLess;
#pragma omp parallel num_threads(num_threads())
  {
    alignas(64) uint32_t buf[kBlock];
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < nc; ++c) {
      PassArgs a{Pass::kMask};
      a.T = T;
      a.mask = masks[g.chunks[c].t].data_ptr<bool>();
      a.mode = first;
      bad[c] |= run_chunk(g, g.chunks[c], buf, a) != 0;
      eq[c] = a.count;
    }
  }
  throw_bad_chunk(g, bad);
  if (first != MaskMode::kLessEq) return;
  std::vector<int64_t> redo;
  std::vector<int64_t> prune_eq(static_cast<size_t>(nc), 0);
  int64_t before = 0;
  for (int64_t c = 0; c < nc; ++c) {
    prune_eq[c] = std::clamp<int64_t>(take - before, 0, eq[c]);
    before += eq[c];
    if (prune_eq[c] < eq[c]) redo.push_back(c);
  }
  const int64_t nr = static_cast<int64_t>(redo.size());
#pragma omp parallel num_threads(num_threads())
  {
    alignas(64) uint32_t buf[kBlock];
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t c = redo[i];
      PassArgs a{Pass::kMask};
      a.T = T;
      a.mask = masks[g.chunks[c].t].data_ptr<bool>();
      a.mode = prune_eq[c] == 0 ? MaskMode::kLess : MaskMode::kCut;
      a.left = prune_eq[c];
      run_chunk(g, g.chunks[c], buf, a);
    }
  }
}

std::vector<at::Tensor> global_mask(at::TensorList weights, at::TensorList norms, const at::Tensor& threshold,
                                    const at::Tensor& take) {
  const Group g = make_group(weights, norms);
  std::vector<at::Tensor> masks;
  for (const auto& w : g.w) masks.push_back(empty_huge(w.sizes(), w.options().dtype(at::kBool)));
  global_mask_into(g, threshold, take, masks);
  return masks;
}

void global_prune_(at::TensorList weights, at::TensorList masks, at::TensorList norms, const at::Tensor& threshold,
                   const at::Tensor& take) {
  const Group g = make_group(weights, norms);
  TORCH_CHECK_VALUE(masks.size() == weights.size(), "masks has ", masks.size(), " entries for ", weights.size(),
                    " weights; pass one preallocated bool tensor per weight");
  std::vector<at::Tensor> ms;
  for (size_t i = 0; i < masks.size(); ++i) {
    TORCH_CHECK_TYPE(masks[i].scalar_type() == at::kBool, "masks[", i, "] must be torch.bool, got ",
                     masks[i].scalar_type());
    TORCH_CHECK_VALUE(masks[i].sizes() == weights[i].sizes() && masks[i].is_contiguous() &&
                          masks[i].device().is_cpu(),
                      "masks[", i, "] must be a contiguous CPU bool tensor of shape ", weights[i].sizes(), ", got ",
                      masks[i].sizes());
    ms.push_back(masks[i]);
  }
  global_mask_into(g, threshold, take, ms);  // throws on NaN/Inf before any weight is written
  for (size_t i = 0; i < ms.size(); ++i) {
    at::Tensor w = weights[i];
    zero_masked(w, ms[i]);
  }
}

}  // namespace
}  // namespace gradprobe

// Schemas: exactly the first six entries of SCHEMAS in gradprobe/ops/_schemas.py.
TORCH_LIBRARY_FRAGMENT(gradprobe_cpp, m) {
  m.def("row_threshold(Tensor weight, Tensor? norm, int k) -> (Tensor threshold, Tensor take, Tensor equal)");
  m.def("row_mask(Tensor weight, Tensor? norm, int k) -> Tensor");
  m.def("row_prune_(Tensor(a!) weight, Tensor? norm, int k) -> Tensor");
  m.def("global_threshold(Tensor[] weights, Tensor[] norms, int k) -> (Tensor threshold, Tensor take, Tensor equal)");
  m.def("global_mask(Tensor[] weights, Tensor[] norms, Tensor threshold, Tensor take) -> Tensor[]");
  m.def(
      "global_prune_(Tensor(a!)[] weights, Tensor(b!)[] masks, Tensor[] norms, Tensor threshold, Tensor take) -> ()");
}

TORCH_LIBRARY_IMPL(gradprobe_cpp, CPU, m) {
  m.impl("row_threshold", &gradprobe::row_threshold);
  m.impl("row_mask", &gradprobe::row_mask);
  m.impl("row_prune_", &gradprobe::row_prune_);
  m.impl("global_threshold", &gradprobe::global_threshold);
  m.impl("global_mask", &gradprobe::global_mask);
  m.impl("global_prune_", &gradprobe::global_prune_);
}
