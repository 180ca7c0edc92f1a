// Argument checks and error messages of the 2:4 packer, shared by its CPU kernels (pack_24.cpp) and its
// CUDA host wrappers (pack_24_cuda.cpp): the same message for the same mistake on either device.
// Host-only (ATen); the CUDA kernels themselves include pack_24.h only.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#include "pack_24.h"

namespace gradprobe {
namespace pack24 {

inline bool is_pack_dtype(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat; }

inline int64_t cutlass_col_multiple(at::ScalarType t) { return t == at::kFloat ? 16 : 32; }

inline void check_pack_weight(const at::Tensor& w, const std::string& fmt) {
  TORCH_CHECK_VALUE(w.dim() == 2, "pack_24(", fmt, "): weight must be 2-D (rows, cols), got shape ", w.sizes());
  TORCH_CHECK_TYPE(is_pack_dtype(w.scalar_type()), "pack_24(", fmt, "): weight must be float16, bfloat16 or float32, got ",
                   w.scalar_type());
  const int64_t rows = w.size(0), cols = w.size(1);
  if (fmt == "cutlass") {
    const int64_t mult = cutlass_col_multiple(w.scalar_type());
    TORCH_CHECK_VALUE(rows % 32 == 0 && cols % mult == 0, "pack_24(cutlass): the CUTLASS layout of ", w.scalar_type(),
                      " needs rows % 32 == 0 and cols % ", mult,
                      " == 0 (metadata is interleaved in pairs of int16 columns), got shape (", rows, ", ", cols,
                      "); pad the weight or use format=\"bitmask\"");
  } else {
    TORCH_CHECK_VALUE(cols % 4 == 0, "pack_24(bitmask): the sparse-24-bitmask layout needs cols % 4 == 0, got shape (",
                      rows, ", ", cols, ")");
  }
}

[[noreturn]] inline void raise_nonfinite_scores() {
  TORCH_CHECK_VALUE(false,
                    "scores contains NaN or Inf; pruning needs finite weights: fix the overflow upstream or replace "
                    "them with torch.nan_to_num");
}

// Validated, contiguous fp32 scores (or an undefined tensor when absent). check_finite=false: the
// caller's pass detects non-finite scores itself.
inline at::Tensor checked_scores(const std::optional<at::Tensor>& scores, const at::Tensor& w, const std::string& fmt,
                          bool check_finite) {
  if (!scores.has_value() || !scores->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(!(fmt == "cutlass" && w.scalar_type() == at::kFloat),
                    "pack_24(cutlass) with scores: the float32 CUTLASS layout is 1:2 (tf32), not 2:4; prune to 1:2 "
                    "first and pack without scores, or convert the weight to float16/bfloat16");
  const at::Tensor& s = *scores;
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, "scores must be float32, got ", s.scalar_type(), "; pass scores.float()");
  TORCH_CHECK_VALUE(s.sizes() == w.sizes(), "scores must have weight's shape ", w.sizes(), ", got ", s.sizes());
  TORCH_CHECK_VALUE(s.device() == w.device(), "scores is on ", s.device(), " but weight on ", w.device(),
                    "; move both to one device");
  at::Tensor c = s.contiguous();
  if (check_finite && !at::isfinite(c).all().item<bool>()) raise_nonfinite_scores();
  return c;
}

// The checked inputs of a pack op: contiguous weight, contiguous fp32 scores or undefined.
struct PackIn {
  at::Tensor w, s;
  int64_t rows, cols;
  const float* sp() const { return s.defined() ? s.const_data_ptr<float>() : nullptr; }
};

inline PackIn prepare_pack(const at::Tensor& weight, const std::optional<at::Tensor>& scores, const std::string& fmt,
                    bool check_finite) {
  check_pack_weight(weight, fmt);
  at::Tensor s = checked_scores(scores, weight, fmt, check_finite);
  at::Tensor w = weight.contiguous();
  return {w, s, w.size(0), w.size(1)};
}

[[noreturn]] inline void raise_not_sparse(const at::Tensor& w, int64_t flat_group, int64_t per, const std::string& fmt) {
  const int64_t groups = w.size(1) / per;
  const int64_t r = flat_group / groups, g = flat_group % groups;
  const int64_t nnz = (w[r].slice(0, g * per, g * per + per) != 0).sum().item<int64_t>();
  const std::string what = per == 2 ? "1:2 (the float32 CUTLASS layout)" : "2:4";
  TORCH_CHECK_VALUE(false, "pack_24(", fmt, "): weight is not ", what, " sparse: group at row ", r, ", columns ",
                    g * per, "..", g * per + per - 1, " has ", nnz, " nonzeros (at most ", per / 2,
                    " allowed); prune it first (gradprobe.prune_(w, None, structure=\"2:4\")) or pass scores= to "
                    "select the mask while packing");
}


inline void check_cutlass_meta(const at::Tensor& packed, const at::Tensor& meta) {
  TORCH_CHECK_VALUE(packed.dim() == 2 && meta.dim() == 2, "unpack_24(cutlass): packed and meta must be 2-D, got ",
                    packed.sizes(), ", ", meta.sizes());
  TORCH_CHECK_TYPE(is_pack_dtype(packed.scalar_type()), "unpack_24(cutlass): packed must be float16, bfloat16 or float32, got ",
                   packed.scalar_type());
  TORCH_CHECK_TYPE(meta.scalar_type() == at::kShort, "unpack_24(cutlass): meta must be int16 (as pack_24 returns it), got ",
                   meta.scalar_type());
  TORCH_CHECK_VALUE(meta.device() == packed.device(), "unpack_24(cutlass): meta is on ", meta.device(), " but packed on ",
                    packed.device());
  const int64_t rows = packed.size(0), half = packed.size(1);
  const int64_t per = packed.scalar_type() == at::kFloat ? 4 : 8;
  TORCH_CHECK_VALUE(rows % 32 == 0 && half % (2 * per) == 0 && meta.size(0) == rows && meta.size(1) == half / per,
                    "unpack_24(cutlass): packed (rows, cols/2) needs rows % 32 == 0, cols % ", 4 * per,
                    " == 0 and meta of shape (rows, cols/", 2 * per, ") = (", rows, ", ", half / per, "); got packed ",
                    packed.sizes(), ", meta ", meta.sizes());
}

[[noreturn]] inline void raise_bad_meta(int64_t flat_group, int64_t groups, int64_t per) {
  const int64_t r = flat_group / groups, g = flat_group % groups;
  TORCH_CHECK_VALUE(false, "unpack_24(cutlass): meta is not valid CUTLASS 2:4 metadata: group at row ", r, ", columns ",
                    g * per, "..", g * per + per - 1, " encodes an impossible index pair; pass the meta pack_24 returned");
}

inline void check_bitmask_args(const at::Tensor& values, const at::Tensor& bitmask, int64_t cols) {
  TORCH_CHECK_TYPE(values.dim() == 2 && is_pack_dtype(values.scalar_type()),
                   "unpack_24(bitmask): values must be 2-D float16/bfloat16/float32, got ", values.scalar_type(), " ",
                   values.sizes());
  const int64_t rows = values.size(0);
  TORCH_CHECK_VALUE(bitmask.scalar_type() == at::kByte && cols % 4 == 0 && bitmask.dim() == 2 && bitmask.size(0) == rows &&
                        bitmask.size(1) == (cols + 7) / 8 && values.size(1) * 2 == cols,
                    "unpack_24(bitmask): for shape (", rows, ", ", cols, ") (cols % 4 == 0) values must be (", rows, ", ",
                    cols / 2, ") and bitmask (", rows, ", ", (cols + 7) / 8, ") uint8; got values ", values.sizes(),
                    ", bitmask ", bitmask.sizes(), " ", bitmask.scalar_type());
  TORCH_CHECK_VALUE(bitmask.device() == values.device(), "unpack_24(bitmask): bitmask is on ", bitmask.device(),
                    " but values on ", values.device());
}

[[noreturn]] inline void raise_bad_bitmask(const at::Tensor& bitmask, int64_t flat_group, int64_t groups) {
  const int64_t r = flat_group / groups, g = flat_group % groups;
  const int64_t byte = bitmask[r][g / 2].item<int64_t>();
  const int64_t bits = (byte >> (4 * (g % 2))) & 0xF;
  TORCH_CHECK_VALUE(false, "unpack_24(bitmask): bitmask group at row ", r, ", columns ", 4 * g, "..", 4 * g + 3, " has ",
                    popcount4(static_cast<uint32_t>(bits)),
                    " bits set; the sparse-24-bitmask layout keeps exactly 2 of every 4");
}

}  // namespace pack24
}  // namespace gradprobe
