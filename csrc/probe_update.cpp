// Gradient-probe updates on CPU (C++17, at::parallel_for): the `cpp` backend of
// gradprobe::probe_accumulate_ and gradprobe::probe_apply_.
//
// Contract (gradprobe/ops/_schemas.py, "probe"):
// * accumulate: acc[i] <- |grad[i]| where |grad[i]| > acc[i] or |grad[i]| is NaN, else unchanged.
//   |x| clears the sign bit; the compare runs in fp32 (fp64 for fp64), exact for every format.
// * apply: candidate i of rank j (= number of candidates before i in row-major order) is pruned iff
//   fp32(g1[j]) <= fp32(g0[j]) * fp32(scale); weight[i] = +0.0 if pruned, else the raw bits of
//   backup[j]; non-candidates untouched; returns the bool mask of pruned candidates.
//   Ranks: pass 1 counts the candidates of every chunk (in parallel), a serial prefix over the chunk
//   counts gives each chunk's first rank, pass 2 writes every chunk (in parallel), visiting only the
//   candidates (set bits of 64-element words), so its cost follows k, not the weight size.
// The argument checks and their messages mirror gradprobe/ops/reference.py (check_probe_*); every
// check, the popcount one included, runs before anything is written.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "checks.h"
#include "radix_select.h"

namespace gradprobe {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per popcount / write chunk of probe_apply_
constexpr int64_t kGrain = 1 << 15;  // elements per task of probe_accumulate_

bool is_probe_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// Value of a sign-cleared bit pattern, in the compare type (exact widening).
struct F32 {
  using Raw = uint32_t;
  static constexpr Raw kAbs = 0x7FFFFFFFu;
  static float value(Raw r) { return bits_f32(r); }
};
struct F64 {
  using Raw = uint64_t;
  static constexpr Raw kAbs = 0x7FFFFFFFFFFFFFFFull;
  static double value(Raw r) { double f; std::memcpy(&f, &r, 8); return f; }
};
struct BF16 {
  using Raw = uint16_t;
  static constexpr Raw kAbs = 0x7FFF;
  static float value(Raw r) { return bits_f32(static_cast<uint32_t>(r) << 16); }
};
struct F16 {
  using Raw = uint16_t;
  static constexpr Raw kAbs = 0x7FFF;
  static float value(Raw r) { return c10::detail::fp16_ieee_to_fp32_value(r); }
};

template <typename F>
void accumulate(void* acc, const void* grad, int64_t n) {
  using Raw = typename F::Raw;
  Raw* a = static_cast<Raw*>(acc);
  const Raw* g = static_cast<const Raw*>(grad);
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const Raw gi = g[i] & F::kAbs;
      const auto gv = F::value(gi);
      const auto av = F::value(a[i]);
      a[i] = (gv > av || gv != gv) ? gi : a[i];
    }
  });
}

void probe_accumulate_(at::Tensor& acc, const at::Tensor& grad) {
  TORCH_CHECK_TYPE(is_probe_float(acc.scalar_type()), "acc must be float32, bfloat16, float16 or float64, got ",
                   acc.scalar_type());
  TORCH_CHECK_TYPE(grad.scalar_type() == acc.scalar_type(), "grad must have acc's dtype ", acc.scalar_type(),
                   " (the max is kept in acc's dtype), got ", grad.scalar_type(), "; pass grad.to(",
                   acc.scalar_type(), ")");
  TORCH_CHECK_VALUE(grad.sizes() == acc.sizes(), "grad must have acc's shape ", acc.sizes(), ", got ", grad.sizes());
  TORCH_CHECK_VALUE(grad.device() == acc.device(), "grad is on ", grad.device(), " but acc on ", acc.device(),
                    "; move both to one device");
  GP_CHECK_CPU(acc);
  const int64_t n = acc.numel();
  if (n == 0) return;
  at::Tensor a = acc.contiguous();
  const at::Tensor g = grad.contiguous();
  switch (a.scalar_type()) {
    case at::kFloat: accumulate<F32>(a.data_ptr(), g.const_data_ptr(), n); break;
    case at::kDouble: accumulate<F64>(a.data_ptr(), g.const_data_ptr(), n); break;
    case at::kBFloat16: accumulate<BF16>(a.data_ptr(), g.const_data_ptr(), n); break;
    default: accumulate<F16>(a.data_ptr(), g.const_data_ptr(), n); break;
  }
  if (!a.is_same(acc)) acc.copy_(a);
}

void check_apply(const at::Tensor& weight, const at::Tensor& candidates, const at::Tensor& backup,
                 const at::Tensor& g0, const at::Tensor& g1, double scale) {
  GP_CHECK_WEIGHT_DTYPE(weight);
  TORCH_CHECK_TYPE(candidates.scalar_type() == at::kBool, "candidates must be a bool tensor (True = candidate), got ",
                   candidates.scalar_type(), "; pass it as .bool()");
  TORCH_CHECK_VALUE(candidates.sizes() == weight.sizes(), "candidates must have weight's shape ", weight.sizes(),
                    ", got ", candidates.sizes());
  TORCH_CHECK_TYPE(backup.scalar_type() == weight.scalar_type(), "backup must have weight's dtype ",
                   weight.scalar_type(), " (the original candidate values, restored bit for bit), got ",
                   backup.scalar_type());
  TORCH_CHECK_VALUE(backup.dim() == 1, "backup must be 1-D (k,) in row-major candidate order, got shape ",
                    backup.sizes());
  for (const auto& [name, g] : {std::pair<const char*, const at::Tensor&>{"g0", g0}, {"g1", g1}}) {
    TORCH_CHECK_TYPE(is_probe_float(g.scalar_type()), name, " must be float32, bfloat16, float16 or float64, got ",
                     g.scalar_type());
    TORCH_CHECK_VALUE(g.sizes() == backup.sizes(), name, " must have backup's shape (", backup.numel(),
                      ",) = (k,), got ", g.sizes());
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"candidates", candidates},
                                {"backup", backup}, {"g0", g0}, {"g1", g1}}) {
    TORCH_CHECK_VALUE(t.device() == weight.device(), name, " is on ", t.device(), " but weight on ", weight.device(),
                      "; move all to one device");
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite (prune iff g1 <= g0 * scale, scale = 1 + tau), got ",
                    scale);
  GP_CHECK_CPU(weight);
}

// Bit t of the result = (byte t of the 8 bytes at p != 0).
inline uint64_t byte_bits8(const uint8_t* p) {
  uint64_t x;
  std::memcpy(&x, p, 8);
  x |= x >> 4;  // bit 0 of each byte becomes the OR of its 8 bits (no bit crosses into a lower byte's bit 0)
  x |= x >> 2;
  x |= x >> 1;
  x &= 0x0101010101010101ull;
  return (x * 0x0102040810204080ull) >> 56;  // gathers bit 0 of byte t into bit t
}

// Writes chunk [i0, i1) whose first candidate has rank `rank`. 64 elements at a time: their candidate
// bits are gathered into one word, then only the set bits are visited (count-trailing-zeros).
template <typename Raw>
void apply_chunk(Raw* w, const uint8_t* c, const Raw* b, const float* g0, const float* g1, float s, uint8_t* m,
                 int64_t i0, int64_t i1, int64_t rank) {
  for (int64_t i = i0; i < i1; i += 64) {
    const int64_t len = std::min<int64_t>(64, i1 - i);
    uint64_t set = 0;
    int64_t t = 0;
    for (; t + 8 <= len; t += 8) set |= byte_bits8(c + i + t) << t;
    for (; t < len; ++t) set |= static_cast<uint64_t>(c[i + t] != 0) << t;
    std::memset(m + i, 0, static_cast<size_t>(len));
    while (set) {
      const int64_t at = i + __builtin_ctzll(set);
      set &= set - 1;
      const bool prune = g1[rank] <= g0[rank] * s;
      w[at] = b[rank] & static_cast<Raw>(prune ? 0 : ~Raw(0));  // +0.0 or the backup's bits
      m[at] = prune;
      ++rank;
    }
  }
}

at::Tensor probe_apply_(at::Tensor& weight, const at::Tensor& candidates, const at::Tensor& backup,
                        const at::Tensor& g0, const at::Tensor& g1, double scale) {
  check_apply(weight, candidates, backup, g0, g1, scale);
  const int64_t n = weight.numel(), k = backup.numel();
  const at::Tensor cand = candidates.contiguous();
  const uint8_t* c = reinterpret_cast<const uint8_t*>(cand.const_data_ptr<bool>());
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  std::vector<int64_t> base(static_cast<size_t>(n_chunks) + 1, 0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int64_t cnt = 0;
      for (int64_t i = p * kChunk, e = std::min(n, i + kChunk); i < e; ++i) cnt += c[i] != 0;
      base[p + 1] = cnt;
    }
  });
  for (int64_t p = 0; p < n_chunks; ++p) base[p + 1] += base[p];
  TORCH_CHECK_VALUE(base[n_chunks] == k, "candidates holds ", base[n_chunks], " True entries but backup, g0 and g1 ",
                    "hold k = ", k, "; they must be the (k,) values of exactly these candidates, in row-major order");

  at::Tensor mask = at::empty(weight.sizes(), weight.options().dtype(at::kBool));
  uint8_t* m = reinterpret_cast<uint8_t*>(mask.data_ptr<bool>());
  if (k == 0) {
    if (n) std::memset(m, 0, static_cast<size_t>(n));
    return mask;
  }
  at::Tensor w = weight.contiguous();
  const at::Tensor b = backup.contiguous();
  const at::Tensor f0 = g0.to(at::kFloat).contiguous(), f1 = g1.to(at::kFloat).contiguous();
  const float s = static_cast<float>(scale);  // round to nearest even, as torch.tensor(scale, dtype=float32)
  auto run = [&](auto* wp, const auto* bp) {
    at::parallel_for(0, n_chunks, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        apply_chunk(wp, c, bp, f0.const_data_ptr<float>(), f1.const_data_ptr<float>(), s, m, p * kChunk,
                    std::min(n, (p + 1) * kChunk), base[p]);
    });
  };
  if (w.element_size() == 4) run(static_cast<uint32_t*>(w.data_ptr()), static_cast<const uint32_t*>(b.const_data_ptr()));
  else run(static_cast<uint16_t*>(w.data_ptr()), static_cast<const uint16_t*>(b.const_data_ptr()));
  if (!w.is_same(weight)) weight.copy_(w);
  return mask;
}

}  // namespace
}  // namespace gradprobe

TORCH_LIBRARY_FRAGMENT(gradprobe_cpp, m) {
  m.def("probe_accumulate_(Tensor(a!) acc, Tensor grad) -> ()");
  m.def("probe_apply_(Tensor(a!) weight, Tensor candidates, Tensor backup, Tensor g0, Tensor g1, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(gradprobe_cpp, CPU, m) {
  m.impl("probe_accumulate_", &gradprobe::probe_accumulate_);
  m.impl("probe_apply_", &gradprobe::probe_apply_);
}
