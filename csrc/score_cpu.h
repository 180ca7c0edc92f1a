// Validation shared by the CPU ops that score (weight, norm): messages name the argument and the fix.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

#include "radix_select.h"

namespace gradprobe {

inline constexpr const char* kFiniteHint =
    "pruning needs finite weights: fix the overflow upstream or replace them with torch.nan_to_num";

// |norm| as a contiguous fp32 vector (empty = magnitude score), after validating it against `in`.
inline std::vector<float> abs_norm(const at::Tensor& norm, int64_t in, const std::string& name, const std::string& wname) {
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

inline void check_weight(const at::Tensor& w, const std::string& name) {
  TORCH_CHECK_VALUE(w.device().is_cpu(), name, " must be a CPU tensor (got ", w.device(),
                    "); the C++ backend implements CPU only");
  TORCH_CHECK_VALUE(w.dim() == 2, name, " must be 2-D (out_features, in_features), got shape ", w.sizes());
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf,
                   name, " must be float32, bfloat16 or float16, got ", w.scalar_type(), "; convert it first");
  TORCH_CHECK_VALUE(w.is_contiguous(), name, " must be contiguous; call .contiguous() first");
}

// f(T{}) with T the element type of a weight of dtype `st` (float, c10::BFloat16 or c10::Half).
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

}  // namespace gradprobe
