// Exact k-smallest selection on CPU (C++17 + OpenMP): the `cpp` backend of the gradprobe:: selection ops.
//
// Contract (gradprobe/ops/_schemas.py): score s = fp32(|w|) * |norm[j]| (one fp32 multiply) or fp32(|w|);
// the pruned set of a group is the k smallest scores, ties to the earlier (tensor, flat index).
// Method: radix select on an order-preserving uint32 key of s (radix_select.h): histogram the top digit,
// find the bucket holding rank k-1, refine inside it. No sort, no concatenation.
//   * row ops: one row per task; the row's keys stay in a thread-local buffer (one read of W), the
//     refining passes only see the compacted candidates of the selected bucket.
//   * global ops: stream over the tensors in chunks, per-thread histograms reduced (O(buckets) memory).
// Non-finite weights are detected during the selection and raise ValueError before anything is written.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "radix_select.h"

namespace gradprobe {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kBlock = 4096;         // keys computed per block (16 KiB buffer, stays in L1)
constexpr int64_t kChunk = 1 << 16;      // global ops: elements per parallel task

int num_threads() { return std::max(1, at::get_num_threads()); }

const char* kFiniteHint =
    "pruning needs finite weights: fix the overflow upstream or replace them with torch.nan_to_num";

// |norm| as a contiguous fp32 vector (empty = magnitude score), after validating it against `in`.
std::vector<float> abs_norm(const at::Tensor& norm, int64_t in, const std::string& name, const std::string& wname) {
  TORCH_CHECK_VALUE(norm.device().is_cpu(), name, " must be a CPU tensor (got ", norm.device(),
                    "); the C++ backend implements CPU only");
  TORCH_CHECK_TYPE(norm.scalar_type() == at::kFloat, name, " must be float32 (per-input-channel norms), got ",
                   norm.scalar_type(), "; pass ", name, ".float()");
  TORCH_CHECK_VALUE(norm.dim() == 1 && norm.size(0) == in, name, " must have shape (", in, ",) = (", wname,
                    ".shape[1],), got ", norm.sizes());
  at::Tensor c = norm.contiguous();
  const float* p = c.data_ptr<float>();
  std::vector<float> out(static_cast<size_t>(in));
  uint32_t bad = 0;
  for (int64_t j = 0; j < in; ++j) {
    const float a = bits_f32(f32_bits(p[j]) & kKeyMask);
    bad |= static_cast<uint32_t>(f32_bits(a) >= kInfBits);
    out[j] = a;
  }
  TORCH_CHECK_VALUE(!bad, name, " contains NaN or Inf; activation norms must be finite");
  return out;
}

void check_weight(const at::Tensor& w, const std::string& name) {
  TORCH_CHECK_VALUE(w.device().is_cpu(), name, " must be a CPU tensor (got ", w.device(),
                    "); the C++ backend implements CPU only");
  TORCH_CHECK_VALUE(w.dim() == 2, name, " must be 2-D (out_features, in_features), got shape ", w.sizes());
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf,
                   name, " must be float32, bfloat16 or float16, got ", w.scalar_type(), "; convert it first");
  TORCH_CHECK_VALUE(w.is_contiguous(), name, " must be contiguous; call .contiguous() first");
}

// keys[j] = key(score(w[j], nrm[j])) for j < n; returns nonzero iff some w[j] is NaN/Inf.
template <typename T>
inline uint32_t fill_keys(const T* w, const float* __restrict nrm, int64_t n, uint32_t* __restrict keys) {
  using Raw = typename AbsBits<T>::Raw;
  const Raw* __restrict raw = reinterpret_cast<const Raw*>(w);
  uint32_t bad = 0;
  if (nrm != nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t a = AbsBits<T>::get(raw[j]);
      bad |= nonfinite(a);
      keys[j] = f32_bits(bits_f32(a) * nrm[j]) & kKeyMask;
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t a = AbsBits<T>::get(raw[j]);
      bad |= nonfinite(a);
      keys[j] = a;
    }
  }
  return bad;
}

// ---- per row -------------------------------------------------------------------------------------

struct Kth {
  uint32_t key;
  int64_t take, equal;
};

// The k-th smallest key (1 <= k <= n) of keys[0:n], and its take/equal counts.
// cand: scratch of n keys; hist: scratch of 2 * kRowBuckets1 counters.
inline Kth row_select(const uint32_t* keys, int64_t n, int64_t k, uint32_t* cand, uint32_t* hist) {
  int64_t r = k - 1;  // 0-based rank, reduced by the count of every lower bucket as we refine
  // two interleaved histograms: neighbouring keys often share a bucket, and one counter would
  // serialise their increments
  uint32_t* hist_b = hist + kRowBuckets1;
  std::fill(hist, hist + 2 * kRowBuckets1, 0u);
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    ++hist[keys[j] >> kRowShift1];
    ++hist_b[keys[j + 1] >> kRowShift1];
  }
  if (j < n) ++hist[keys[j] >> kRowShift1];
  for (uint32_t b = 0; b < kRowBuckets1; ++b) hist[b] += hist_b[b];
  const uint32_t b1 = find_bucket(hist, kRowBuckets1, r);
  int64_t m = 0;
  for (j = 0; j < n; ++j) {
    const uint32_t key = keys[j];
    cand[m] = key;
    m += (key >> kRowShift1) == b1;
  }
  std::fill(hist, hist + kRowBuckets2, 0u);
  for (int64_t i = 0; i < m; ++i) ++hist[(cand[i] >> kRowShift2) & (kRowBuckets2 - 1)];
  const uint32_t b2 = find_bucket(hist, kRowBuckets2, r);
  int64_t m2 = 0;
  for (int64_t i = 0; i < m; ++i) {
    const uint32_t key = cand[i];
    cand[m2] = key;
    m2 += ((key >> kRowShift2) & (kRowBuckets2 - 1)) == b2;
  }
  std::fill(hist, hist + kRowBuckets3, 0u);
  for (int64_t i = 0; i < m2; ++i) ++hist[cand[i] & (kRowBuckets3 - 1)];
  const uint32_t b3 = find_bucket(hist, kRowBuckets3, r);
  return {(b1 << kRowShift1) | (b2 << kRowShift2) | b3, r + 1, static_cast<int64_t>(hist[b3])};
}

// mask[j] = key < T, or key == T among the first `take` such keys in index order.
inline void row_mask_write(const uint32_t* keys, int64_t n, const Kth& t, bool* mask) {
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

// Runs the per-row selection; writes the triple (if thr != nullptr) and/or the mask (if mask != nullptr).
// Returns the first row holding a non-finite weight, or -1.
template <typename T>
int64_t row_run(const at::Tensor& weight, const float* nrm, int64_t k, float* thr, int64_t* take, int64_t* equal,
                bool* mask) {
  const int64_t rows = weight.size(0), n = weight.size(1);
  const T* wp = weight.data_ptr<T>();
  std::vector<uint8_t> bad(static_cast<size_t>(rows), 0);
#pragma omp parallel num_threads(num_threads())
  {
    std::unique_ptr<uint32_t[]> keys(new uint32_t[std::max<int64_t>(n, 1)]);
    std::unique_ptr<uint32_t[]> cand(new uint32_t[std::max<int64_t>(n, 1)]);
    uint32_t hist[2 * kRowBuckets1];
#pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < rows; ++i) {
      bad[i] = fill_keys(wp + i * n, nrm, n, keys.get()) != 0;
      Kth t{0, 0, 0};
      if (k > 0) t = row_select(keys.get(), n, k, cand.get(), hist);
      if (thr != nullptr) {
        thr[i] = k > 0 ? bits_f32(t.key) : kNegInf;
        take[i] = t.take;
        equal[i] = t.equal;
      }
      if (mask != nullptr) {
        if (k > 0) {
          row_mask_write(keys.get(), n, t, mask + i * n);
        } else {
          std::fill(mask + i * n, mask + (i + 1) * n, false);
        }
      }
    }
  }
  for (int64_t i = 0; i < rows; ++i)
    if (bad[i]) return i;
  return -1;
}

template <typename F>
auto dispatch_weight(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    case at::kHalf:
      return f(c10::Half{});
    default:
      TORCH_CHECK_TYPE(false, "weight must be float32, bfloat16 or float16, got ", st);
  }
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
    return row_run<decltype(tag)>(weight, a.nrm_ptr(), k, thr.data_ptr<float>(), take.data_ptr<int64_t>(),
                                  equal.data_ptr<int64_t>(), nullptr);
  });
  throw_bad_row(bad);
  return {thr, take, equal};
}

at::Tensor row_mask(const at::Tensor& weight, const std::optional<at::Tensor>& norm, int64_t k) {
  const RowArgs a = check_row(weight, norm, k);
  at::Tensor mask = at::empty(weight.sizes(), weight.options().dtype(at::kBool));
  const int64_t bad = dispatch_weight(weight.scalar_type(), [&](auto tag) {
    return row_run<decltype(tag)>(weight, a.nrm_ptr(), k, nullptr, nullptr, nullptr, mask.data_ptr<bool>());
  });
  throw_bad_row(bad);
  return mask;
}

// w[i] = mask[i] ? +0 : w[i] on the raw storage (U = uint32_t for fp32, uint16_t for bf16/fp16).
template <typename U>
void zero_masked(void* w, const bool* mask, int64_t n) {
  U* p = static_cast<U*>(w);
#pragma omp parallel for num_threads(num_threads()) schedule(static)
  for (int64_t b = 0; b < n; b += kChunk) {
    const int64_t e = std::min(n, b + kChunk);
    for (int64_t i = b; i < e; ++i) p[i] = mask[i] ? U{0} : p[i];
  }
}

void zero_masked_any(at::Tensor& w, const at::Tensor& mask) {
  if (w.scalar_type() == at::kFloat) {
    zero_masked<uint32_t>(w.data_ptr(), mask.data_ptr<bool>(), w.numel());
  } else {
    zero_masked<uint16_t>(w.data_ptr(), mask.data_ptr<bool>(), w.numel());
  }
}

at::Tensor row_prune_(at::Tensor& weight, const std::optional<at::Tensor>& norm, int64_t k) {
  at::Tensor mask = row_mask(weight, norm, k);  // throws on NaN/Inf before anything is written
  zero_masked_any(weight, mask);
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
};

Group make_group(at::TensorList weights, at::TensorList norms) {
  TORCH_CHECK_VALUE(!weights.empty(), "weights is empty; pass at least one tensor to prune");
  TORCH_CHECK_VALUE(norms.empty() || norms.size() == weights.size(), "norms has ", norms.size(), " entries for ",
                    weights.size(), " weights; pass one per weight or an empty list (magnitude scores)");
  Group g;
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

// Calls fn(keys, len) for consecutive blocks of chunk c's keys, in flat order; returns the bad flag.
template <typename F>
uint32_t chunk_keys(const Group& g, const Chunk& c, uint32_t* buf, F&& fn) {
  const at::Tensor& w = g.w[c.t];
  const int64_t cols = w.size(1);
  const float* nrm = g.nrm[c.t].empty() ? nullptr : g.nrm[c.t].data();
  return dispatch_weight(w.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* wp = w.data_ptr<T>();
    uint32_t bad = 0;
    for (int64_t f = c.f0; f < c.f1;) {
      const int64_t c0 = f % cols;
      const int64_t len = std::min({cols - c0, c.f1 - f, kBlock});
      bad |= fill_keys(wp + f, nrm == nullptr ? nullptr : nrm + c0, len, buf);
      fn(static_cast<const uint32_t*>(buf), f, len);
      f += len;
    }
    return bad;
  });
}

void throw_bad_chunk(const Group& g, const std::vector<uint8_t>& bad) {
  for (size_t c = 0; c < bad.size(); ++c)
    TORCH_CHECK_VALUE(!bad[c], "weights[", g.chunks[c].t, "] contains NaN or Inf; ", kFiniteHint);
}

// Histogram pass over the whole group: per-thread histograms of `nb` buckets, reduced.
// digit(key) returns the bucket or nb (= skip the element).
template <typename D>
std::vector<int64_t> group_histogram(const Group& g, uint32_t nb, D digit, std::vector<uint8_t>& bad) {
  const int nt = num_threads();
  std::vector<std::vector<int64_t>> hists(static_cast<size_t>(nt));
  const int64_t nc = static_cast<int64_t>(g.chunks.size());
#pragma omp parallel num_threads(nt)
  {
    std::vector<int64_t>& h = hists[omp_get_thread_num()];
    h.assign(nb + 1, 0);
    uint32_t buf[kBlock];
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < nc; ++c) {
      bad[c] |= chunk_keys(g, g.chunks[c], buf, [&](const uint32_t* keys, int64_t, int64_t len) {
                  for (int64_t j = 0; j < len; ++j) ++h[digit(keys[j])];
                }) != 0;
    }
  }
  std::vector<int64_t> out(nb, 0);
  for (const auto& h : hists)
    if (!h.empty())
      for (uint32_t b = 0; b < nb; ++b) out[b] += h[b];
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> global_threshold(at::TensorList weights, at::TensorList norms,
                                                                int64_t k) {
  const Group g = make_group(weights, norms);
  TORCH_CHECK_VALUE(0 <= k && k <= g.total, "k must be in [0, total elements=", g.total, "], got ", k);
  std::vector<uint8_t> bad(g.chunks.size(), 0);
  const at::TensorOptions opt = weights[0].options();
  std::vector<int64_t> h1 = group_histogram(g, kGlobBuckets1, [](uint32_t key) { return key >> kGlobShift; }, bad);
  throw_bad_chunk(g, bad);
  float thr = kNegInf;
  int64_t take = 0, equal = 0;
  if (k > 0) {
    int64_t r = k - 1;
    const uint32_t b1 = find_bucket(h1.data(), kGlobBuckets1, r);
    // second pass counts only the elements inside the selected top-digit bucket
    std::vector<int64_t> h2 = group_histogram(
        g, kGlobBuckets2,
        [b1](uint32_t key) { return (key >> kGlobShift) == b1 ? (key & (kGlobBuckets2 - 1)) : kGlobBuckets2; }, bad);
    const uint32_t b2 = find_bucket(h2.data(), kGlobBuckets2, r);
    thr = bits_f32((b1 << kGlobShift) | b2);
    take = r + 1;
    equal = h2[b2];
  }
  return {at::scalar_tensor(thr, opt.dtype(at::kFloat)), at::scalar_tensor(take, opt.dtype(at::kLong)),
          at::scalar_tensor(equal, opt.dtype(at::kLong))};
}

// Writes masks[i] for the group from (threshold, take); returns nothing, throws on NaN/Inf.
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
  // pruned tied elements per chunk: the first `take` keys == T in group order
  std::vector<int64_t> prune_eq(static_cast<size_t>(nc), 0), eq(static_cast<size_t>(nc), 0);
  if (!none && take > 0) {
#pragma omp parallel num_threads(num_threads())
    {
      uint32_t buf[kBlock];
#pragma omp for schedule(dynamic, 1)
      for (int64_t c = 0; c < nc; ++c) {
        int64_t cnt = 0;
        bad[c] |= chunk_keys(g, g.chunks[c], buf, [&](const uint32_t* keys, int64_t, int64_t len) {
                    for (int64_t j = 0; j < len; ++j) cnt += keys[j] == T;
                  }) != 0;
        eq[c] = cnt;
      }
    }
    throw_bad_chunk(g, bad);
    int64_t before = 0;
    for (int64_t c = 0; c < nc; ++c) {
      prune_eq[c] = std::clamp<int64_t>(take - before, 0, eq[c]);
      before += eq[c];
    }
  }
#pragma omp parallel num_threads(num_threads())
  {
    uint32_t buf[kBlock];
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < nc; ++c) {
      bool* m = masks[g.chunks[c].t].data_ptr<bool>();
      const int64_t pe = prune_eq[c];
      const bool all_eq = pe > 0 && pe == eq[c];
      int64_t left = pe;
      bad[c] |= chunk_keys(g, g.chunks[c], buf, [&](const uint32_t* keys, int64_t f, int64_t len) {
                  bool* mm = m + f;
                  if (none) {
                    std::fill(mm, mm + len, false);
                  } else if (pe == 0) {
                    for (int64_t j = 0; j < len; ++j) mm[j] = keys[j] < T;
                  } else if (all_eq) {
                    for (int64_t j = 0; j < len; ++j) mm[j] = keys[j] <= T;
                  } else {  // the one chunk where the tie cut falls
                    for (int64_t j = 0; j < len; ++j) {
                      const bool e = keys[j] == T && left > 0;
                      left -= e;
                      mm[j] = keys[j] < T || e;
                    }
                  }
                }) != 0;
    }
  }
  throw_bad_chunk(g, bad);
}

std::vector<at::Tensor> global_mask(at::TensorList weights, at::TensorList norms, const at::Tensor& threshold,
                                    const at::Tensor& take) {
  const Group g = make_group(weights, norms);
  std::vector<at::Tensor> masks;
  for (const auto& w : g.w) masks.push_back(at::empty(w.sizes(), w.options().dtype(at::kBool)));
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
    zero_masked_any(w, ms[i]);
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
