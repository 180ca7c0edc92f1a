// The Wanda variant's per-row cumulative-score cut on CPU: the `cpp` backend of gradprobe::row_cumsum_cut.
//
// Contract (gradprobe/ops/_schemas.py): per row, scores s = fp32(|w|) * |norm| are quantised to int64
// fixed point q = floor(s * 2^(B - e)) (B = 62 - bit_length(in), e = frexp exponent of the row max), so
// every partial sum is exact; tau = floor(alpha * total); the row prunes the longest stable-ascending
// prefix whose q-sum is <= tau. Method: radix select on the order-preserving 31-bit key of s with a
// (count, q-sum) histogram per digit (11 + 11 + 9 bits): the cut key K is the smallest key whose
// inclusive q-sum exceeds tau; below it everything is pruned, of its ties floor((tau - S(<K)) / q_K).
// No sort. Rows are independent (OpenMP over rows); q is recomputed from the key in every pass
// instead of being stored (one multiply, cheaper than 8 bytes of traffic per element).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "radix_select.h"
#include "score_cpu.h"

namespace gradprobe {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct CutOut {
  float* thr;
  int64_t* take;
  int64_t* pruned;
  int64_t* total;
};

// fixed-point value of the score with bit pattern `key`: fp32 -> fp64 times a power of two is exact,
// and for the product in [0, 2^62) the truncating conversion is the floor (no libm call, vectorises).
inline int64_t fixed(uint32_t key, double factor) {
  return static_cast<int64_t>(static_cast<double>(bits_f32(key)) * factor);
}

// Histogram of (count, q-sum) over digit (key >> shift) & (nb - 1) of keys[0:n]; returns the first
// bucket whose inclusive q-sum, plus `below`, exceeds tau, and adds to (below, c_below) what lies under it.
inline uint32_t cut_bucket(const uint32_t* keys, int64_t n, int shift, uint32_t nb, double factor, int64_t tau,
                           int64_t& below, int64_t& c_below, std::vector<int64_t>& cnt, std::vector<int64_t>& sum) {
  std::fill(cnt.begin(), cnt.begin() + nb, 0);
  std::fill(sum.begin(), sum.begin() + nb, 0);
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t d = (keys[j] >> shift) & (nb - 1);
    cnt[d] += 1;
    sum[d] += fixed(keys[j], factor);
  }
  uint32_t b = 0;
  for (; b + 1 < nb; ++b) {
    if (below + sum[b] > tau) break;
    below += sum[b];
    c_below += cnt[b];
  }
  return b;
}

template <typename T>
int64_t cut_rows(const at::Tensor& weight, const float* nrm, double alpha, const CutOut& out) {
  using Raw = typename AbsBits<T>::Raw;
  const int64_t rows = weight.size(0), n = weight.size(1);
  const Raw* base = reinterpret_cast<const Raw*>(weight.const_data_ptr());
  const int b_bits = 62 - static_cast<int>(64 - __builtin_clzll(static_cast<unsigned long long>(n)));
  int64_t first_bad = -1;
  // >= 256Ki scores per task: small tensors run on the calling thread (waking a pool costs more)
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / n);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<uint32_t> keys(static_cast<size_t>(n)), cand(static_cast<size_t>(n));
    std::vector<int64_t> cnt(kRowBuckets1), sum(kRowBuckets1);
    for (int64_t r = r0; r < r1; ++r) {
      const Raw* raw = base + r * n;
      uint32_t bad = 0, kmax = 0;
      for (int64_t j = 0; j < n; ++j) {
        const uint32_t a = AbsBits<T>::get(raw[j]);
        bad |= nonfinite(a);
        const uint32_t key = nrm ? (f32_bits(bits_f32(a) * nrm[j]) & kKeyMask) : a;
        keys[j] = key;
        kmax = std::max(kmax, key);
      }
      if (bad) {
#pragma omp critical(gradprobe_cut_bad)
        if (first_bad < 0 || r < first_bad) first_bad = r;
        continue;
      }
      int e = 0;
      std::frexp(bits_f32(kmax), &e);
      const double factor = std::ldexp(1.0, b_bits - e);
      int64_t total = 0, n_max = 0;
      for (int64_t j = 0; j < n; ++j) {
        total += fixed(keys[j], factor);
        n_max += keys[j] == kmax;
      }
      const int64_t tau = static_cast<int64_t>(std::floor(alpha * static_cast<double>(total)));
      out.total[r] = total;
      if (total <= tau) {  // the whole row fits under the cut
        out.thr[r] = bits_f32(kmax);
        out.take[r] = n_max;
        out.pruned[r] = n;
        continue;
      }
      int64_t below = 0, c_below = 0;
      const uint32_t b1 = cut_bucket(keys.data(), n, kRowShift1, kRowBuckets1, factor, tau, below, c_below, cnt, sum);
      int64_t m = 0;
      for (int64_t j = 0; j < n; ++j) {
        cand[m] = keys[j];
        m += (keys[j] >> kRowShift1) == b1;
      }
      const uint32_t b2 = cut_bucket(cand.data(), m, kRowShift2, kRowBuckets2, factor, tau, below, c_below, cnt, sum);
      int64_t m2 = 0;
      for (int64_t j = 0; j < m; ++j) {
        cand[m2] = cand[j];
        m2 += ((cand[j] >> kRowShift2) & (kRowBuckets2 - 1)) == b2;
      }
      const uint32_t b3 = cut_bucket(cand.data(), m2, 0, kRowBuckets3, factor, tau, below, c_below, cnt, sum);
      const uint32_t k = (b1 << kRowShift1) | (b2 << kRowShift2) | b3;
      // q_K >= 1: K is the first key whose inclusive sum exceeds tau while S(<K) <= tau
      const int64_t q_k = std::max<int64_t>(fixed(k, factor), 1);
      const int64_t take = std::min(cnt[b3], std::max<int64_t>(tau - below, 0) / q_k);
      const int64_t pruned = c_below + take;
      out.pruned[r] = pruned;
      out.thr[r] = pruned == 0 ? kNegInf : bits_f32(k);
      out.take[r] = pruned == 0 ? 0 : take;
    }
  });
  return first_bad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_cumsum_cut(const at::Tensor& weight,
                                                                          const std::optional<at::Tensor>& norm,
                                                                          double alpha) {
  check_weight(weight, "weight");
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "alpha must be in [0, 1] (the prunable share of each row's total "
                    "score), got ", alpha);
  const int64_t rows = weight.size(0), n = weight.size(1);
  std::vector<float> nrm;
  if (norm.has_value()) nrm = abs_norm(*norm, n, "norm", "weight");
  const auto opts = weight.options();
  at::Tensor thr = at::full({rows}, kNegInf, opts.dtype(at::kFloat));
  at::Tensor take = at::zeros({rows}, opts.dtype(at::kLong));
  at::Tensor pruned = at::zeros({rows}, opts.dtype(at::kLong));
  at::Tensor total = at::zeros({rows}, opts.dtype(at::kLong));
  if (rows == 0 || n == 0) return {thr, take, pruned, total};
  const CutOut out{thr.data_ptr<float>(), take.data_ptr<int64_t>(), pruned.data_ptr<int64_t>(),
                   total.data_ptr<int64_t>()};
  const float* np = nrm.empty() ? nullptr : nrm.data();
  const int64_t bad = dispatch_weight(weight.scalar_type(), [&](auto tag) {
    return cut_rows<decltype(tag)>(weight, np, alpha, out);
  });
  TORCH_CHECK_VALUE(bad < 0, "weight contains NaN or Inf (first in row ", bad, "); ", kFiniteHint);
  return {thr, take, pruned, total};
}

}  // namespace
}  // namespace gradprobe

TORCH_LIBRARY_FRAGMENT(gradprobe_cpp, m) {
  m.def("row_cumsum_cut(Tensor weight, Tensor? norm, float alpha) -> (Tensor threshold, Tensor take, Tensor pruned, Tensor total)");
}

TORCH_LIBRARY_IMPL(gradprobe_cpp, CPU, m) { m.impl("row_cumsum_cut", &gradprobe::row_cumsum_cut); }
