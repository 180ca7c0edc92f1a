// Score loads, the order-preserving key, and the radix digit layout shared by the CPU selection ops.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "cpu_util.h"

namespace gradprobe {

// Scores are fp32(|w|) * |norm| >= 0, so the IEEE bit pattern of a score, read as uint32, is already
// order-preserving (the general transform bits ^ (sign ? 0xFFFFFFFF : 0x80000000) only flips the
// always-0 sign bit here). Keys are therefore 31-bit; the mask & 0x7FFFFFFF keeps even the negative
// default NaN (0 * inf) in range, and non-finite weights are rejected before any result is used.
constexpr uint32_t kKeyMask = 0x7FFFFFFFu;
constexpr uint32_t kInfBits = 0x7F800000u;  // |w| bits >= this  <=>  w is +-inf or NaN

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Bits of fp32(|w|) from the raw storage (bit-exact with `weight.abs().to(torch.float32)`); plain
// integer loads so the key loops vectorise.
template <typename T>
struct AbsBits;
template <>
struct AbsBits<float> {
  using Raw = uint32_t;
  static inline uint32_t get(Raw r) { return r & kKeyMask; }
};
template <>
struct AbsBits<c10::BFloat16> {
  using Raw = uint16_t;
  static inline uint32_t get(Raw r) { return (static_cast<uint32_t>(r) << 16) & kKeyMask; }
};
template <>
struct AbsBits<c10::Half> {
  using Raw = uint16_t;
  static inline uint32_t get(Raw r) {
    return f32_bits(c10::detail::fp16_ieee_to_fp32_value(static_cast<uint16_t>(r & 0x7FFF)));
  }
};

// 1 iff |w| bits encode Inf or NaN (a >= 0x7F800000 for a <= 0x7FFFFFFF), branch-free.
inline uint32_t nonfinite(uint32_t abs_bits) { return (abs_bits + 0x00800000u) >> 31; }

// keys[j] = key(score(w[j], nrm[j])) for j < n (nrm null: magnitude); returns nonzero iff some w[j] is
// NaN/Inf. GP_INLINE: each ISA copy of a hot loop gets its own vectorisation of it.
template <typename T>
GP_INLINE uint32_t fill_keys(const T* w, const float* __restrict nrm, int64_t n, uint32_t* __restrict keys) {
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

// Digit layout of the 31-bit key. Per row: 11 + 11 + 9 bits (2048-bucket histograms stay in L1).
// Global (streaming, each pass re-reads the tensors): 15 + 16 bits, two passes.
constexpr int kRowShift1 = 20, kRowShift2 = 9;
constexpr uint32_t kRowBuckets1 = 1u << 11, kRowBuckets2 = 1u << 11, kRowBuckets3 = 1u << 9;
constexpr int kGlobShift = 16;
constexpr uint32_t kGlobBuckets1 = 1u << 15, kGlobBuckets2 = 1u << 16;

// Given a histogram of `nb` buckets and a 0-based rank r (< sum), return the bucket holding rank r
// and subtract from r the count of everything in lower buckets.
template <typename C>
inline uint32_t find_bucket(const C* hist, uint32_t nb, int64_t& r) {
  uint32_t b = 0;
  for (; b + 16 <= nb; b += 16) {  // skip whole blocks of 16 buckets (a vectorised sum each)
    int64_t s = 0;
    for (uint32_t i = 0; i < 16; ++i) s += static_cast<int64_t>(hist[b + i]);
    if (r < s) break;
    r -= s;
  }
  for (; b < nb; ++b) {
    const int64_t c = static_cast<int64_t>(hist[b]);
    if (r < c) return b;
    r -= c;
  }
  return nb - 1;  // unreachable when r < sum(hist)
}

}  // namespace gradprobe
