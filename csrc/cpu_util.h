// Host-only helpers shared by the C++ CPU ops: SIMD target macros, run-time AVX2 dispatch, the
// huge-page hint for fresh outputs, and zeroing weights under a mask. Never included by CUDA sources.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#ifdef __linux__
#include <sys/mman.h>
#endif

// Hot loops are compiled twice, for the baseline ISA and for GP_TARGET_AVX2, and picked at run time.
// Helpers they call must be GP_INLINE so that each copy inlines them with its own ISA.
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define GP_X86_AVX2 1
#define GP_TARGET_AVX2 __attribute__((target("avx2,popcnt")))
#else
#define GP_X86_AVX2 0
#endif
#define GP_INLINE inline __attribute__((always_inline))

namespace gradprobe {

// AVX2 loops are picked at run time; GRADPROBE_CPP_DISABLE_AVX2=1 (read on every call) forces the portable ones.
// Threads worth waking for `elems` elements of streaming work: one per 256 Ki elements, at most the
// pool. Small tensors stay on the calling thread: on a loaded machine, waking an idle or descheduled
// pool thread costs milliseconds, more than the whole op.
inline int threads_for(int64_t elems) {
  const int64_t want = (elems + (int64_t{1} << 18) - 1) >> 18;
  return static_cast<int>(std::clamp<int64_t>(want, 1, std::max(1, at::get_num_threads())));
}

inline bool avx2_enabled() {
#if GP_X86_AVX2
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
  return cpu && std::getenv("GRADPROBE_CPP_DISABLE_AVX2") == nullptr;
#else
  return false;
#endif
}

// Asks for transparent huge pages over the 2 MiB-aligned interior of [p, p + n): a fresh 45 MB output
// otherwise costs ~11k first-touch page faults, about as long as a whole pass over it (a hint only).
inline void advise_huge_pages(void* p, size_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t b = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (b + kHuge - 1) & ~(kHuge - 1), hi = (b + n) & ~(kHuge - 1);
  if (p != nullptr && hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)n;
#endif
}

// Fresh (uninitialised) output of `sizes`, asked for huge pages.
inline at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  advise_huge_pages(t.data_ptr(), static_cast<size_t>(t.nbytes()));
  return t;
}

// w[i] = mask[i] ? +0 : w[i] on the raw storage (U = uint32_t for fp32, uint16_t for bf16/fp16).
template <typename U>
void zero_masked_raw(void* w, const bool* mask, int64_t n) {
  constexpr int64_t kChunk = 1 << 16;
  U* __restrict p = static_cast<U*>(w);
  const uint8_t* __restrict m = reinterpret_cast<const uint8_t*>(mask);
#pragma omp parallel for num_threads(std::max(1, at::get_num_threads())) schedule(static)
  for (int64_t b = 0; b < n; b += kChunk) {
    const int64_t e = std::min(n, b + kChunk);
    for (int64_t i = b; i < e; ++i) p[i] &= static_cast<U>(static_cast<U>(m[i] != 0) - 1);  // all-ones unless masked
  }
}

// Zeroes the weights under a bool mask of the same shape (both contiguous CPU, weight fp32/bf16/fp16).
inline void zero_masked(at::Tensor& w, const at::Tensor& mask) {
  if (w.element_size() == 4) {
    zero_masked_raw<uint32_t>(w.data_ptr(), mask.const_data_ptr<bool>(), w.numel());
  } else {
    zero_masked_raw<uint16_t>(w.data_ptr(), mask.const_data_ptr<bool>(), w.numel());
  }
}

}  // namespace gradprobe
