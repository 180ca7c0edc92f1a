// 2:4 packer, CPU (C++17, at::parallel_for): the `cpp` backend of gradprobe::pack_24_cutlass,
// unpack_24_cutlass, pack_24_bitmask and unpack_24_bitmask (layouts: gradprobe/ops/_schemas.py).
//
// One pass over the weight: each group of 4 (a pair for fp32 CUTLASS) is loaded as raw bits, its
// nonzero pattern looked up in a 16-entry table (pack_24.h), and its kept values, metadata nibble or
// bitmask bits written. A group with too many nonzeros is remembered (the first one, in row-major
// order) and reported after the pass; outputs are fresh tensors, so nothing the caller owns changes.
// With CUDA (GRADPROBE_WITH_CUDA) the same ops are registered for CUDA tensors, calling pack_24.cu.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <optional>
#include <string>

#include "checks.h"
#include "pack_24.h"

#ifdef GRADPROBE_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace gradprobe {
namespace {

using namespace pack24;

constexpr int64_t kGrainRows = 16;

inline void atomic_min(std::atomic<int64_t>& a, int64_t v) {
  int64_t cur = a.load(std::memory_order_relaxed);
  while (v < cur && !a.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
  }
}

inline int ctz4(uint32_t x) { return __builtin_ctz(x); }
inline int top4(uint32_t x) { return 31 - __builtin_clz(x); }

bool is_pack_dtype(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat; }

int64_t cutlass_col_multiple(at::ScalarType t) { return t == at::kFloat ? 16 : 32; }

void check_pack_weight(const at::Tensor& w, const std::string& fmt) {
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

// Validated, contiguous fp32 scores (or an undefined tensor when absent).
at::Tensor checked_scores(const std::optional<at::Tensor>& scores, const at::Tensor& w, const std::string& fmt) {
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
  TORCH_CHECK_VALUE(at::isfinite(c).all().item<bool>(),
                    "scores contains NaN or Inf; pruning needs finite weights: fix the overflow upstream or replace "
                    "them with torch.nan_to_num");
  return c;
}

[[noreturn]] void raise_not_sparse(const at::Tensor& w, int64_t flat_group, int64_t per, const std::string& fmt) {
  const int64_t groups = w.size(1) / per;
  const int64_t r = flat_group / groups, g = flat_group % groups;
  const int64_t nnz = (w[r].slice(0, g * per, g * per + per) != 0).sum().item<int64_t>();
  const std::string what = per == 2 ? "1:2 (the float32 CUTLASS layout)" : "2:4";
  TORCH_CHECK_VALUE(false, "pack_24(", fmt, "): weight is not ", what, " sparse: group at row ", r, ", columns ",
                    g * per, "..", g * per + per - 1, " has ", nnz, " nonzeros (at most ", per / 2,
                    " allowed); prune it first (gradprobe.prune_(w, None, structure=\"2:4\")) or pass scores= to "
                    "select the mask while packing");
}

// Loads group `base..base+3` of a row as raw bits, zeroing the 2 smallest-score elements if scored.
template <typename Raw>
inline uint32_t load_group(const Raw* w, const float* s, Raw* v) {
  std::memcpy(v, w, 4 * sizeof(Raw));
  if (s != nullptr) {
    const uint32_t pruned = prune2of4(s);
    for (int i = 0; i < 4; ++i)
      if ((pruned >> i) & 1u) v[i] = 0;
  }
  constexpr Raw kMag = static_cast<Raw>(~(Raw(1) << (8 * sizeof(Raw) - 1)));
  uint32_t code = 0;
  for (int i = 0; i < 4; ++i) code |= static_cast<uint32_t>((v[i] & kMag) != 0) << i;
  return code;
}

// ---- CUTLASS --------------------------------------------------------------------------------------

int64_t pack_cutlass16(const uint16_t* w, const float* s, uint16_t* packed, uint16_t* meta, int64_t rows, int64_t cols) {
  std::atomic<int64_t> bad{kNoBad};
  const int64_t meta_cols = cols / 16;
  at::parallel_for(0, rows, kGrainRows, [&](int64_t r0, int64_t r1) {
    int64_t local = kNoBad;
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* wr = w + r * cols;
      const float* sr = s != nullptr ? s + r * cols : nullptr;
      uint16_t* pr = packed + r * (cols / 2);
      for (int64_t c = 0; c < meta_cols; ++c) {
        uint32_t m = 0;
        for (int q = 0; q < 4; ++q) {
          const int64_t base = 16 * c + 4 * q;
          uint16_t v[4];
          const uint32_t code = load_group(wr + base, sr != nullptr ? sr + base : nullptr, v);
          if (popcount4(code) > 2 && local == kNoBad) local = r * (cols / 4) + base / 4;
          const uint32_t nib = cutlass_nibble(code);
          pr[base / 2] = v[nib & 3u];
          pr[base / 2 + 1] = v[nib >> 2];
          m |= nib << (4 * q);
        }
        meta[meta_offset(r, c, rows)] = static_cast<uint16_t>(m);
      }
    }
    if (local != kNoBad) atomic_min(bad, local);
  });
  return bad.load();
}

int64_t pack_cutlass32(const uint32_t* w, uint32_t* packed, uint16_t* meta, int64_t rows, int64_t cols) {
  std::atomic<int64_t> bad{kNoBad};
  const int64_t meta_cols = cols / 8;
  at::parallel_for(0, rows, kGrainRows, [&](int64_t r0, int64_t r1) {
    int64_t local = kNoBad;
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t* wr = w + r * cols;
      uint32_t* pr = packed + r * (cols / 2);
      for (int64_t c = 0; c < meta_cols; ++c) {
        uint32_t m = 0;
        for (int q = 0; q < 4; ++q) {
          const int64_t base = 8 * c + 2 * q;
          const uint32_t a = wr[base], b = wr[base + 1];
          const bool nza = (a & 0x7FFFFFFFu) != 0, nzb = (b & 0x7FFFFFFFu) != 0;
          if (nza && nzb && local == kNoBad) local = r * (cols / 2) + base / 2;
          pr[base / 2] = nza ? a : b;
          m |= (nza ? kNibbleFirst : kNibbleSecond) << (4 * q);
        }
        meta[meta_offset(r, c, rows)] = static_cast<uint16_t>(m);
      }
    }
    if (local != kNoBad) atomic_min(bad, local);
  });
  return bad.load();
}

std::tuple<at::Tensor, at::Tensor> pack_24_cutlass(const at::Tensor& weight, const std::optional<at::Tensor>& scores) {
  GP_CHECK_CPU(weight);
  check_pack_weight(weight, "cutlass");
  const at::Tensor s = checked_scores(scores, weight, "cutlass");
  const at::Tensor w = weight.contiguous();
  const int64_t rows = w.size(0), cols = w.size(1);
  const bool f32 = w.scalar_type() == at::kFloat;
  at::Tensor packed = at::empty({rows, cols / 2}, w.options());
  at::Tensor meta = at::empty({rows, cols / (f32 ? 8 : 16)}, w.options().dtype(at::kShort));
  uint16_t* mp = reinterpret_cast<uint16_t*>(meta.data_ptr<int16_t>());
  int64_t bad;
  if (f32) {
    bad = pack_cutlass32(reinterpret_cast<const uint32_t*>(w.const_data_ptr()),
                         reinterpret_cast<uint32_t*>(packed.data_ptr()), mp, rows, cols);
  } else {
    bad = pack_cutlass16(reinterpret_cast<const uint16_t*>(w.const_data_ptr()),
                         s.defined() ? s.const_data_ptr<float>() : nullptr, reinterpret_cast<uint16_t*>(packed.data_ptr()),
                         mp, rows, cols);
  }
  if (bad != kNoBad) raise_not_sparse(w, bad, f32 ? 2 : 4, "cutlass");
  return {packed, meta};
}

void check_cutlass_meta(const at::Tensor& packed, const at::Tensor& meta) {
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

[[noreturn]] void raise_bad_meta(int64_t flat_group, int64_t groups, int64_t per) {
  const int64_t r = flat_group / groups, g = flat_group % groups;
  TORCH_CHECK_VALUE(false, "unpack_24(cutlass): meta is not valid CUTLASS 2:4 metadata: group at row ", r, ", columns ",
                    g * per, "..", g * per + per - 1, " encodes an impossible index pair; pass the meta pack_24 returned");
}

at::Tensor unpack_24_cutlass(const at::Tensor& packed_in, const at::Tensor& meta_in) {
  GP_CHECK_CPU(packed_in);
  check_cutlass_meta(packed_in, meta_in);
  const at::Tensor packed = packed_in.contiguous(), meta = meta_in.contiguous();
  const int64_t rows = packed.size(0), cols = packed.size(1) * 2;
  const bool f32 = packed.scalar_type() == at::kFloat;
  at::Tensor dense = at::empty({rows, cols}, packed.options());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(meta.const_data_ptr<int16_t>());
  const int64_t meta_cols = meta.size(1);
  std::atomic<int64_t> bad{kNoBad};
  at::parallel_for(0, rows, kGrainRows, [&](int64_t r0, int64_t r1) {
    int64_t local = kNoBad;
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = 0; c < meta_cols; ++c) {
        const uint32_t m = mp[meta_offset(r, c, rows)];
        for (int q = 0; q < 4; ++q) {
          const uint32_t nib = (m >> (4 * q)) & 0xFu;
          if (f32) {
            const uint32_t* pr = reinterpret_cast<const uint32_t*>(packed.const_data_ptr()) + r * (cols / 2);
            uint32_t* dr = reinterpret_cast<uint32_t*>(dense.data_ptr()) + r * cols;
            const int64_t base = 8 * c + 2 * q;
            if (!valid_nibble32(nib) && local == kNoBad) local = r * (cols / 2) + base / 2;
            const bool first = nib == kNibbleFirst;
            dr[base] = first ? pr[base / 2] : 0u;
            dr[base + 1] = first ? 0u : pr[base / 2];
          } else {
            const uint16_t* pr = reinterpret_cast<const uint16_t*>(packed.const_data_ptr()) + r * (cols / 2);
            uint16_t* dr = reinterpret_cast<uint16_t*>(dense.data_ptr()) + r * cols;
            const int64_t base = 16 * c + 4 * q;
            uint16_t out[4] = {0, 0, 0, 0};
            if (!valid_nibble16(nib)) {
              if (local == kNoBad) local = r * (cols / 4) + base / 4;
            } else {
              out[nib & 3u] = pr[base / 2];
              out[nib >> 2] = pr[base / 2 + 1];
            }
            std::memcpy(dr + base, out, sizeof(out));
          }
        }
      }
    }
    if (local != kNoBad) atomic_min(bad, local);
  });
  const int64_t b = bad.load();
  if (b != kNoBad) raise_bad_meta(b, f32 ? cols / 2 : cols / 4, f32 ? 2 : 4);
  return dense;
}

// ---- sparse-24-bitmask ----------------------------------------------------------------------------

template <typename Raw>
int64_t pack_bitmask(const Raw* w, const float* s, Raw* values, uint8_t* bitmask, int64_t rows, int64_t cols) {
  std::atomic<int64_t> bad{kNoBad};
  const int64_t groups = cols / 4, nbytes = (cols + 7) / 8;
  at::parallel_for(0, rows, kGrainRows, [&](int64_t r0, int64_t r1) {
    int64_t local = kNoBad;
    for (int64_t r = r0; r < r1; ++r) {
      const Raw* wr = w + r * cols;
      const float* sr = s != nullptr ? s + r * cols : nullptr;
      Raw* vr = values + r * (cols / 2);
      uint8_t* br = bitmask + r * nbytes;
      for (int64_t b = 0; b < nbytes; ++b) {
        uint32_t byte = 0;
        for (int64_t g = 2 * b; g < std::min(2 * b + 2, groups); ++g) {
          Raw v[4];
          const uint32_t code = load_group(wr + 4 * g, sr != nullptr ? sr + 4 * g : nullptr, v);
          uint32_t keep = bitmask_keep(code);
          if (keep == 0) {  // 3-4 nonzeros
            if (local == kNoBad) local = r * groups + g;
            keep = 3;
          }
          vr[2 * g] = v[ctz4(keep)];
          vr[2 * g + 1] = v[top4(keep)];
          byte |= keep << (4 * (g - 2 * b));
        }
        br[b] = static_cast<uint8_t>(byte);
      }
    }
    if (local != kNoBad) atomic_min(bad, local);
  });
  return bad.load();
}

std::tuple<at::Tensor, at::Tensor> pack_24_bitmask(const at::Tensor& weight, const std::optional<at::Tensor>& scores) {
  GP_CHECK_CPU(weight);
  check_pack_weight(weight, "bitmask");
  const at::Tensor s = checked_scores(scores, weight, "bitmask");
  const at::Tensor w = weight.contiguous();
  const int64_t rows = w.size(0), cols = w.size(1);
  at::Tensor values = at::empty({rows, cols / 2}, w.options());
  at::Tensor bitmask = at::empty({rows, (cols + 7) / 8}, w.options().dtype(at::kByte));
  const float* sp = s.defined() ? s.const_data_ptr<float>() : nullptr;
  int64_t bad;
  if (w.scalar_type() == at::kFloat) {
    bad = pack_bitmask(reinterpret_cast<const uint32_t*>(w.const_data_ptr()), sp, reinterpret_cast<uint32_t*>(values.data_ptr()),
                       bitmask.data_ptr<uint8_t>(), rows, cols);
  } else {
    bad = pack_bitmask(reinterpret_cast<const uint16_t*>(w.const_data_ptr()), sp, reinterpret_cast<uint16_t*>(values.data_ptr()),
                       bitmask.data_ptr<uint8_t>(), rows, cols);
  }
  if (bad != kNoBad) raise_not_sparse(w, bad, 4, "bitmask");
  return {values, bitmask};
}

void check_bitmask_args(const at::Tensor& values, const at::Tensor& bitmask, int64_t cols) {
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

template <typename Raw>
int64_t unpack_bitmask(const Raw* values, const uint8_t* bitmask, Raw* dense, int64_t rows, int64_t cols) {
  std::atomic<int64_t> bad{kNoBad};
  const int64_t groups = cols / 4, nbytes = (cols + 7) / 8;
  at::parallel_for(0, rows, kGrainRows, [&](int64_t r0, int64_t r1) {
    int64_t local = kNoBad;
    for (int64_t r = r0; r < r1; ++r) {
      const Raw* vr = values + r * (cols / 2);
      const uint8_t* br = bitmask + r * nbytes;
      Raw* dr = dense + r * cols;
      for (int64_t g = 0; g < groups; ++g) {
        const uint32_t bits = (static_cast<uint32_t>(br[g / 2]) >> (4 * (g % 2))) & 0xFu;
        Raw out[4] = {0, 0, 0, 0};
        if (popcount4(bits) != 2) {
          if (local == kNoBad) local = r * groups + g;
        } else {
          out[ctz4(bits)] = vr[2 * g];
          out[top4(bits)] = vr[2 * g + 1];
        }
        std::memcpy(dr + 4 * g, out, sizeof(out));
      }
    }
    if (local != kNoBad) atomic_min(bad, local);
  });
  return bad.load();
}

[[noreturn]] void raise_bad_bitmask(const at::Tensor& bitmask, int64_t flat_group, int64_t groups) {
  const int64_t r = flat_group / groups, g = flat_group % groups;
  const int64_t byte = bitmask[r][g / 2].item<int64_t>();
  const int64_t bits = (byte >> (4 * (g % 2))) & 0xF;
  TORCH_CHECK_VALUE(false, "unpack_24(bitmask): bitmask group at row ", r, ", columns ", 4 * g, "..", 4 * g + 3, " has ",
                    popcount4(static_cast<uint32_t>(bits)),
                    " bits set; the sparse-24-bitmask layout keeps exactly 2 of every 4");
}

at::Tensor unpack_24_bitmask(const at::Tensor& values_in, const at::Tensor& bitmask_in, int64_t cols) {
  GP_CHECK_CPU(values_in);
  check_bitmask_args(values_in, bitmask_in, cols);
  const at::Tensor values = values_in.contiguous(), bitmask = bitmask_in.contiguous();
  const int64_t rows = values.size(0);
  at::Tensor dense = at::empty({rows, cols}, values.options());
  int64_t bad;
  if (values.scalar_type() == at::kFloat) {
    bad = unpack_bitmask(reinterpret_cast<const uint32_t*>(values.const_data_ptr()), bitmask.const_data_ptr<uint8_t>(),
                         reinterpret_cast<uint32_t*>(dense.data_ptr()), rows, cols);
  } else {
    bad = unpack_bitmask(reinterpret_cast<const uint16_t*>(values.const_data_ptr()), bitmask.const_data_ptr<uint8_t>(),
                         reinterpret_cast<uint16_t*>(dense.data_ptr()), rows, cols);
  }
  if (bad != kNoBad) raise_bad_bitmask(bitmask, bad, cols / 4);
  return dense;
}

#ifdef GRADPROBE_WITH_CUDA
// ---- CUDA tensors: thin wrappers over the pack_24.cu launchers ---------------------------------------

int64_t read_bad(const at::Tensor& flag) { return flag.item<int64_t>(); }

void check_launch(int err) { TORCH_CHECK(err == 0, "gradprobe 2:4 CUDA kernel launch failed (cudaError ", err, ")"); }

std::tuple<at::Tensor, at::Tensor> pack_24_cutlass_cuda(const at::Tensor& weight, const std::optional<at::Tensor>& scores) {
  check_pack_weight(weight, "cutlass");
  c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor s = checked_scores(scores, weight, "cutlass");
  const at::Tensor w = weight.contiguous();
  const int64_t rows = w.size(0), cols = w.size(1);
  const bool f32 = w.scalar_type() == at::kFloat;
  at::Tensor packed = at::empty({rows, cols / 2}, w.options());
  at::Tensor meta = at::empty({rows, cols / (f32 ? 8 : 16)}, w.options().dtype(at::kShort));
  at::Tensor flag = at::full({1}, kNoBad, w.options().dtype(at::kLong));
  check_launch(cuda::pack_24_cutlass(w.const_data_ptr(), s.defined() ? s.const_data_ptr<float>() : nullptr, packed.data_ptr(),
                                     meta.data_ptr<int16_t>(), rows, cols, f32 ? 4 : 2, flag.data_ptr<int64_t>(),
                                     c10::cuda::getCurrentCUDAStream().stream()));
  const int64_t bad = read_bad(flag);
  if (bad != kNoBad) raise_not_sparse(w, bad, f32 ? 2 : 4, "cutlass");
  return {packed, meta};
}

at::Tensor unpack_24_cutlass_cuda(const at::Tensor& packed_in, const at::Tensor& meta_in) {
  check_cutlass_meta(packed_in, meta_in);
  c10::cuda::CUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous(), meta = meta_in.contiguous();
  const int64_t rows = packed.size(0), cols = packed.size(1) * 2;
  const bool f32 = packed.scalar_type() == at::kFloat;
  at::Tensor dense = at::empty({rows, cols}, packed.options());
  at::Tensor flag = at::full({1}, kNoBad, packed.options().dtype(at::kLong));
  check_launch(cuda::unpack_24_cutlass(packed.const_data_ptr(), meta.const_data_ptr<int16_t>(), dense.data_ptr(), rows, cols,
                                       f32 ? 4 : 2, flag.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream()));
  const int64_t bad = read_bad(flag);
  if (bad != kNoBad) raise_bad_meta(bad, f32 ? cols / 2 : cols / 4, f32 ? 2 : 4);
  return dense;
}

std::tuple<at::Tensor, at::Tensor> pack_24_bitmask_cuda(const at::Tensor& weight, const std::optional<at::Tensor>& scores) {
  check_pack_weight(weight, "bitmask");
  c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor s = checked_scores(scores, weight, "bitmask");
  const at::Tensor w = weight.contiguous();
  const int64_t rows = w.size(0), cols = w.size(1);
  at::Tensor values = at::empty({rows, cols / 2}, w.options());
  at::Tensor bitmask = at::empty({rows, (cols + 7) / 8}, w.options().dtype(at::kByte));
  at::Tensor flag = at::full({1}, kNoBad, w.options().dtype(at::kLong));
  check_launch(cuda::pack_24_bitmask(w.const_data_ptr(), s.defined() ? s.const_data_ptr<float>() : nullptr, values.data_ptr(),
                                     bitmask.data_ptr<uint8_t>(), rows, cols, static_cast<int>(w.element_size()),
                                     flag.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream()));
  const int64_t bad = read_bad(flag);
  if (bad != kNoBad) raise_not_sparse(w, bad, 4, "bitmask");
  return {values, bitmask};
}

at::Tensor unpack_24_bitmask_cuda(const at::Tensor& values_in, const at::Tensor& bitmask_in, int64_t cols) {
  check_bitmask_args(values_in, bitmask_in, cols);
  c10::cuda::CUDAGuard guard(values_in.device());
  const at::Tensor values = values_in.contiguous(), bitmask = bitmask_in.contiguous();
  const int64_t rows = values.size(0);
  at::Tensor dense = at::empty({rows, cols}, values.options());
  at::Tensor flag = at::full({1}, kNoBad, values.options().dtype(at::kLong));
  check_launch(cuda::unpack_24_bitmask(values.const_data_ptr(), bitmask.const_data_ptr<uint8_t>(), dense.data_ptr(), rows, cols,
                                       static_cast<int>(values.element_size()), flag.data_ptr<int64_t>(),
                                       c10::cuda::getCurrentCUDAStream().stream()));
  const int64_t bad = read_bad(flag);
  if (bad != kNoBad) raise_bad_bitmask(bitmask, bad, cols / 4);
  return dense;
}
#endif  // GRADPROBE_WITH_CUDA

}  // namespace
}  // namespace gradprobe

TORCH_LIBRARY_FRAGMENT(gradprobe_cpp, m) {
  m.def("pack_24_cutlass(Tensor weight, Tensor? scores) -> (Tensor packed, Tensor meta)");
  m.def("unpack_24_cutlass(Tensor packed, Tensor meta) -> Tensor");
  m.def("pack_24_bitmask(Tensor weight, Tensor? scores) -> (Tensor values, Tensor bitmask)");
  m.def("unpack_24_bitmask(Tensor values, Tensor bitmask, int cols) -> Tensor");
}

TORCH_LIBRARY_IMPL(gradprobe_cpp, CPU, m) {
  m.impl("pack_24_cutlass", &gradprobe::pack_24_cutlass);
  m.impl("unpack_24_cutlass", &gradprobe::unpack_24_cutlass);
  m.impl("pack_24_bitmask", &gradprobe::pack_24_bitmask);
  m.impl("unpack_24_bitmask", &gradprobe::unpack_24_bitmask);
}

#ifdef GRADPROBE_WITH_CUDA
TORCH_LIBRARY_IMPL(gradprobe_cpp, CUDA, m) {
  m.impl("pack_24_cutlass", &gradprobe::pack_24_cutlass_cuda);
  m.impl("unpack_24_cutlass", &gradprobe::unpack_24_cutlass_cuda);
  m.impl("pack_24_bitmask", &gradprobe::pack_24_bitmask_cuda);
  m.impl("unpack_24_bitmask", &gradprobe::unpack_24_bitmask_cuda);
}
#endif
