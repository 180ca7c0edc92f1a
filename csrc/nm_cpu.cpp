// N:M structured selection on CPU (C++17, at::parallel_for): the `cpp` backend of gradprobe::nm_mask
// and gradprobe::nm_prune_.
//
// Contract (gradprobe/ops/_schemas.py): score s = fp32(|w|) * |norm[j]| (or fp32(|w|)); in every m
// consecutive elements of a row the n smallest scores are pruned, ties to the lower index. Scores are
// >= 0, so their fp32 bit patterns compare like the floats (radix_select.h); each element's rank in
// its group, #{s_j < s_i} + #{j < i : s_j == s_i}, is computed directly (m <= 32: at most 1024
// integer compares per group, no sort). Non-finite weights raise ValueError before anything is written.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <vector>

#include "checks.h"
#include "radix_select.h"

namespace gradprobe {
namespace {

constexpr int64_t kGrainRows = 8;

void check_args(const at::Tensor& w, const std::optional<at::Tensor>& norm, int64_t n, int64_t m) {
  GP_CHECK_CPU(w);
  TORCH_CHECK_VALUE(w.dim() == 2, "weight must be 2-D (out_features, in_features), got shape ", w.sizes());
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf,
                   "weight must be float32, bfloat16 or float16, got ", w.scalar_type(), "; convert it first");
  GP_CHECK_CONTIGUOUS(w);
  TORCH_CHECK_VALUE(0 < n && n < m && m <= 32, "N:M = ", n, ":", m,
                    " needs 0 < N < M <= 32 (N pruned of every M consecutive inputs)");
  TORCH_CHECK_VALUE(w.size(1) % m == 0, "N:M = ", n, ":", m, " needs a 2-D weight with in_features divisible by ", m,
                    ", got shape ", w.sizes());
  if (norm.has_value() && norm->defined()) {
    const at::Tensor& nr = *norm;
    GP_CHECK_CPU(nr);
    TORCH_CHECK_TYPE(nr.scalar_type() == at::kFloat, "norm must be float32 (per-input-channel norms), got ",
                     nr.scalar_type(), "; pass norm.float()");
    TORCH_CHECK_VALUE(nr.dim() == 1 && nr.size(0) == w.size(1), "norm must have shape (", w.size(1),
                      ",) = (weight.shape[1],), got ", nr.sizes());
  }
}

// |norm| (empty = magnitude); non-finite norms raise.
std::vector<float> abs_norm(const std::optional<at::Tensor>& norm) {
  if (!norm.has_value() || !norm->defined()) return {};
  at::Tensor c = norm->contiguous();
  const float* p = c.const_data_ptr<float>();
  std::vector<float> out(static_cast<size_t>(c.numel()));
  uint32_t bad = 0;
  for (size_t j = 0; j < out.size(); ++j) {
    const uint32_t a = f32_bits(p[j]) & kKeyMask;
    bad |= nonfinite(a);
    out[j] = bits_f32(a);
  }
  TORCH_CHECK_VALUE(!bad, "norm contains NaN or Inf; activation norms must be finite");
  return out;
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

template <typename T>
bool nm_dispatch_m(const T* w, const float* nrm, int64_t rows, int64_t in, int64_t n, int64_t m, uint8_t* mask) {
  switch (m) {
    case 4: return nm_rows<T, 4>(w, nrm, rows, in, n, m, mask);
    case 8: return nm_rows<T, 8>(w, nrm, rows, in, n, m, mask);
    case 16: return nm_rows<T, 16>(w, nrm, rows, in, n, m, mask);
    default: return nm_rows<T, 0>(w, nrm, rows, in, n, m, mask);
  }
}

at::Tensor nm_mask(const at::Tensor& weight, const std::optional<at::Tensor>& norm, int64_t n, int64_t m) {
  check_args(weight, norm, n, m);
  const std::vector<float> nv = abs_norm(norm);
  const float* nrm = nv.empty() ? nullptr : nv.data();
  const int64_t rows = weight.size(0), in = weight.size(1);
  at::Tensor mask = at::empty({rows, in}, weight.options().dtype(at::kBool));
  uint8_t* mp = reinterpret_cast<uint8_t*>(mask.data_ptr<bool>());
  bool bad = false;
  switch (weight.scalar_type()) {
    case at::kFloat: bad = nm_dispatch_m(weight.const_data_ptr<float>(), nrm, rows, in, n, m, mp); break;
    case at::kBFloat16: bad = nm_dispatch_m(weight.const_data_ptr<c10::BFloat16>(), nrm, rows, in, n, m, mp); break;
    default: bad = nm_dispatch_m(weight.const_data_ptr<c10::Half>(), nrm, rows, in, n, m, mp); break;
  }
  if (bad) {
    const auto idx = (~at::isfinite(weight)).nonzero()[0];
    TORCH_CHECK_VALUE(false, "weight contains NaN or Inf (first at index (", idx[0].item<int64_t>(), ", ",
                      idx[1].item<int64_t>(),
                      ")); pruning needs finite weights: fix the overflow upstream or replace them with torch.nan_to_num");
  }
  return mask;
}

at::Tensor nm_prune_(at::Tensor& weight, const std::optional<at::Tensor>& norm, int64_t n, int64_t m) {
  at::Tensor mask = nm_mask(weight, norm, n, m);  // raises before any write
  const int64_t numel = weight.numel();
  const uint8_t* mp = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  const int64_t esize = weight.element_size();
  auto zero = [&](auto* p) {
    at::parallel_for(0, numel, 1 << 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        if (mp[i]) p[i] = 0;
    });
  };
  if (esize == 4) zero(reinterpret_cast<uint32_t*>(weight.data_ptr()));
  else zero(reinterpret_cast<uint16_t*>(weight.data_ptr()));
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
