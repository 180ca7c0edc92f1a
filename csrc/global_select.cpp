// Exact k-smallest selection over a group of whole tensors on CPU (C++17 + OpenMP): the `cpp` backend of
// gradprobe::global_threshold, global_mask, global_prune_ and the fused global_masks.
//
// Contract (gradprobe/ops/_schemas.py): score s = fp32(|w|) * |norm[j]| (one fp32 multiply) or fp32(|w|);
// the pruned set of a group is its k smallest scores, ties to the earlier (tensor, flat index).
// Method: radix select on an order-preserving uint32 key of s (radix_select.h), streaming over the
// tensors in 64Ki-element chunks; no sort, no concatenation. A strided sample brackets the k-th key;
// one pass counts the keys below the bracket, keeps the few inside it (key + offset) in a bounded
// buffer and, for global_masks, writes the masks; the k-th key is selected from the buffer and only
// the pruned candidates' mask bytes are set afterwards. A missed bracket or a full buffer falls back
// to two exact histogram passes (per-thread histograms, reduced; radix_passes.h) and the mask pass,
// which writes key <= T and counts ties per chunk, then rewrites only the chunks after the take-th tie
// in group order. Hot loops are compiled twice (baseline and AVX2) and picked at run time.
// Non-finite weights are detected during the selection and raise ValueError before anything is written.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <optional>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_util.h"
#include "radix_passes.h"
#include "radix_select.h"
#include "score_cpu.h"

namespace gradprobe {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kBlock = 4096;         // keys computed per block (16 KiB buffer, stays in L1)
constexpr int64_t kChunk = 1 << 16;      // elements per parallel task

// Runs f(th) for th in [0, nt) on nt threads (the caller is thread 0) and joins them; a thread's
// exception is rethrown after the join. Plain threads rather than the OpenMP pool: an idle OpenMP
// worker spins (GOMP_SPINCOUNT) in every barrier and after every region, and on a loaded machine that
// spinning takes CPU time from the threads doing the pass (2 Llama-2-7B layers / 2, fp32 with norms,
// 2 vCPUs at load 12: global_masks 270-290 ms under OpenMP, 190-210 ms with OMP_WAIT_POLICY=passive).
// A waiting std::thread sleeps in join. Starting a thread costs tens of microseconds; callers ask for
// threads only for work of >= 256 Ki elements per thread (threads_for).
template <typename F>
void run_threads(int nt, F&& f) {
  if (nt <= 1) {
    f(0);
    return;
  }
  std::vector<std::exception_ptr> err(static_cast<size_t>(nt));
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(nt - 1));
  for (int t = 1; t < nt; ++t) {
    pool.emplace_back([&f, &err, t] {
      try {
        f(t);
      } catch (...) {
        err[t] = std::current_exception();
      }
    });
  }
  try {
    f(0);
  } catch (...) {
    err[0] = std::current_exception();
  }
  for (std::thread& th : pool) th.join();
  for (const std::exception_ptr& e : err)
    if (e) std::rethrow_exception(e);
}

// Dynamic schedule over [0, n): each call of body(i) takes the next of `grain` consecutive indices
// from the shared counter (each thread sees its indices in increasing order).
template <typename B>
GP_INLINE void for_dynamic(std::atomic<int64_t>& next, int64_t n, int64_t grain, B&& body) {
  for (int64_t i0 = next.fetch_add(grain, std::memory_order_relaxed); i0 < n;
       i0 = next.fetch_add(grain, std::memory_order_relaxed)) {
    const int64_t i1 = std::min(n, i0 + grain);
    for (int64_t i = i0; i < i1; ++i) body(i);
  }
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
  const int nt = threads_for(g.total);
  std::vector<std::vector<int64_t>> sums(static_cast<size_t>(nt));
  const int64_t nc = static_cast<int64_t>(g.chunks.size());
  std::atomic<int64_t> next{0};
  run_threads(nt, [&](int th) {
    std::vector<int64_t>& sum = sums[th];
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
    for_dynamic(next, nc, 1, [&](int64_t c) {
      if (since_flush > (int64_t{1} << 31)) flush();
      bad[c] |= run_chunk(g, g.chunks[c], buf, a) != 0;
      since_flush += g.chunks[c].f1 - g.chunks[c].f0;
    });
    flush();
  });
  std::vector<int64_t> out(nb, 0);
  for (const auto& sum : sums)
    for (size_t b = 0; b < sum.size(); ++b) out[b] += sum[b];
  return out;
}

struct Sel {
  uint32_t key;  // the k-th smallest key (unused when k == 0)
  int64_t take, equal;
};

// The k-th smallest key of the group by two exact histogram passes (15 + 16 bits), every key read
// twice; also the NaN/Inf check (pass 1 reads every key, also when k == 0).
Sel threshold_by_histograms(const Group& g, int64_t k) {
  std::vector<uint8_t> bad(g.chunks.size(), 0);
  PassArgs p1{Pass::kHist1};
  const std::vector<int64_t> h1 = group_histogram(g, p1, kGlobBuckets1, bad);
  throw_bad_chunk(g, bad);
  if (k == 0) return {0, 0, 0};
  int64_t r = k - 1;
  PassArgs p2{Pass::kHist2};
  p2.b1 = find_bucket(h1.data(), kGlobBuckets1, r);
  const std::vector<int64_t> h2 = group_histogram(g, p2, kGlobBuckets2, bad);
  const uint32_t b2 = find_bucket(h2.data(), kGlobBuckets2, r);
  return {(p2.b1 << kGlobShift) | b2, r + 1, h2[b2]};
}

// ---- global, sampled bracket: one pass over the group instead of three ---------------------------
//
// A deterministic sample (short runs of elements at a fixed stride, 1/251 of each tensor) gives the sample ranks of rank
// k-1 +- 4 standard deviations, i.e. a narrow key range [lo, hi] that very likely holds the k-th key.
// One streaming pass then counts the keys below lo, appends the keys inside [lo, hi] with their
// offsets (the "candidates", ~0.1-0.5 % of the group) to a per-thread buffer, and, for masks, writes
// mask = key < lo. If rank k-1 lies among the candidates (count(< lo) <= k-1 < count(<= hi)), the
// k-th key, take and equal are selected from the buffer alone (every key equal to it is a candidate)
// and only the candidates' mask bytes are rewritten. Otherwise (a sample that missed, adversarial
// data) or when the buffer would exceed its cap (heavy ties inside the bracket) the exact histogram
// passes decide. Exact either way; every count is an integer (reducible across ranks / streamed
// tensors in any order).

// The sample: runs of kSampleRun consecutive elements (whole cache lines: a strided gather of single
// elements is bound by memory latency, not bandwidth) every kSampleStride elements of each tensor.
// 251 is prime, so the runs' starting columns in a row-major matrix cycle through many residues.
constexpr int64_t kSampleRun = 64, kSampleStride = 251 * kSampleRun;

// Path counters (read by tests through gradprobe_cpp::global_select_path_counts).
enum PathCounter { kPathBracket = 0, kPathOverflow = 1, kPathMiss = 2, kPathHistograms = 3, kNumPaths = 4 };
std::atomic<int64_t> g_path_counts[kNumPaths];

// Cap on the candidates of one call: GRADPROBE_CPP_GLOBAL_MAX_CANDIDATES (read on every call; 0 forces
// the histogram passes), else max(2^16, total / 128) (6 bytes each: <= 1.2 % of the scores' fp32 size).
int64_t max_candidates(int64_t total) {
  if (const char* env = std::getenv("GRADPROBE_CPP_GLOBAL_MAX_CANDIDATES")) {
    char* end = nullptr;
    const long long v = std::strtoll(env, &end, 10);
    TORCH_CHECK_VALUE(end != env && *end == '\0' && v >= 0,
                      "GRADPROBE_CPP_GLOBAL_MAX_CANDIDATES must be an integer >= 0, got '", env, "'");
    return static_cast<int64_t>(v);
  }
  return std::max<int64_t>(int64_t{1} << 16, total >> 7);
}

template <typename T>
inline uint32_t key_at(const T* w, const float* nrm, int64_t cols, int64_t f) {
  using Raw = typename AbsBits<T>::Raw;
  const uint32_t a = AbsBits<T>::get(reinterpret_cast<const Raw*>(w)[f]);
  return nrm == nullptr ? a : f32_bits(bits_f32(a) * nrm[f % cols]) & kKeyMask;  // as fill_keys
}

struct SampleRun {
  int64_t t, f, len, at;  // tensor, first flat index, length, position in the sample
};

// The sampled keys of every tensor, in group order. The runs sit on distinct pages (a TLB miss each,
// costly in a VM): the next runs are prefetched while one is read.
std::vector<uint32_t> sample_keys(const Group& g) {
  std::vector<SampleRun> runs;
  int64_t n = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(g.w.size()); ++t) {
    const int64_t numel = g.w[t].numel();
    for (int64_t f = 0; f < numel; f += kSampleStride) {
      const int64_t len = std::min(kSampleRun, numel - f);
      runs.push_back({t, f, len, n});
      n += len;
    }
  }
  std::vector<uint32_t> out(static_cast<size_t>(n));
  const int64_t nr = static_cast<int64_t>(runs.size());
  constexpr int64_t kAhead = 8;
  const int nt = threads_for(g.total / 16);
  run_threads(nt, [&](int th) {  // static schedule: thread th reads runs [nr * th / nt, nr * (th + 1) / nt)
    const int64_t i1 = nr * (th + 1) / nt;
    for (int64_t i = nr * th / nt; i < i1; ++i) {
      if (i + kAhead < i1) {
        const SampleRun& p = runs[i + kAhead];
        const char* base = static_cast<const char*>(g.w[p.t].const_data_ptr()) + p.f * g.w[p.t].element_size();
        for (int64_t b = 0; b < p.len * g.w[p.t].element_size(); b += 64) __builtin_prefetch(base + b);
      }
      const SampleRun& r = runs[i];
      const at::Tensor& w = g.w[r.t];
      const float* nrm = g.nrm[r.t].empty() ? nullptr : g.nrm[r.t].data();
      const int64_t cols = w.size(1);
      dispatch_weight(w.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        const T* wp = w.const_data_ptr<T>();
        for (int64_t j = 0; j < r.len; ++j) out[r.at + j] = key_at(wp, nrm, cols, r.f + j);
        return 0;
      });
    }
  });
  return out;
}

// The key of 0-based rank r of keys (r < size): a 16-bit histogram finds its bucket, nth_element the
// key among the few keys of that bucket.
uint32_t sample_rank(const std::vector<uint32_t>& keys, int64_t r) {
  std::vector<uint32_t> hist(size_t{1} << 16, 0);
  for (uint32_t key : keys) ++hist[key >> 15];
  const uint32_t b = find_bucket(hist.data(), 1u << 16, r);
  std::vector<uint32_t> in;
  for (uint32_t key : keys)
    if ((key >> 15) == b) in.push_back(key);
  std::nth_element(in.begin(), in.begin() + r, in.end());
  return in[static_cast<size_t>(r)];
}

struct Bracket {
  uint32_t lo, hi;  // candidates: lo <= key <= hi
};

Bracket bracket_from_sample(const Group& g, int64_t k) {
  const std::vector<uint32_t> s = sample_keys(g);
  const int64_t ns = static_cast<int64_t>(s.size());
  const double p = static_cast<double>(k - 1) / static_cast<double>(g.total);
  const int64_t ks = static_cast<int64_t>(p * static_cast<double>(ns));
  // +-4 standard deviations of the sample rank (binomial; a strided sample of smooth data varies less)
  const int64_t delta = static_cast<int64_t>(4.0 * std::sqrt(static_cast<double>(ns) * p * (1.0 - p))) + 8;
  const int64_t rlo = ks - delta, rhi = ks + delta;
  const uint32_t lo = rlo <= 0 ? 0u : sample_rank(s, rlo);
  const uint32_t hi = rhi >= ns - 1 ? kKeyMask : sample_rank(s, rhi);
  return {lo, hi};
}

// One thread's candidates, appended chunk by chunk. Storage is reserved once and never initialised
// (only the pages written become resident).
struct CandBuf {
  std::unique_ptr<uint32_t[]> key;
  std::unique_ptr<uint16_t[]> off;  // offset inside its chunk (chunks are 2^16 elements)
  int64_t size = 0, cap = 0;
};

struct ChunkCands {
  int th = 0;  // the buffer holding this chunk's candidates
  int64_t begin = 0, count = 0, less = 0;
};

// Appends the keys of in[0:len] inside [lo, lo + width] (and base + their index) to ckey/coff.
inline int64_t collect_scalar(const uint32_t* in, int64_t len, uint32_t lo, uint32_t width, uint32_t base,
                              uint32_t* ckey, uint16_t* coff) {
  int64_t m = 0;
  for (int64_t j = 0; j < len; ++j) {
    const uint32_t key = in[j];
    if (key - lo <= width) {
      ckey[m] = key;
      coff[m] = static_cast<uint16_t>(base + j);
      ++m;
    }
  }
  return m;
}

#if GP_X86_AVX2
// Candidates are rare (~0.3 %): a vector range test per 8 keys, a scalar append per hit.
GP_TARGET_AVX2 int64_t collect_avx2(const uint32_t* in, int64_t len, uint32_t lo, uint32_t width, uint32_t base,
                                    uint32_t* ckey, uint16_t* coff) {
  const __m256i vlo = _mm256_set1_epi32(static_cast<int>(lo)), vw = _mm256_set1_epi32(static_cast<int>(width));
  int64_t m = 0, j = 0;
  for (; j + 16 <= len; j += 16) {
    const __m256i d0 = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + j)), vlo);
    const __m256i d1 = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + j + 8)), vlo);
    const __m256i i0 = _mm256_cmpeq_epi32(_mm256_min_epu32(d0, vw), d0);
    const __m256i i1 = _mm256_cmpeq_epi32(_mm256_min_epu32(d1, vw), d1);
    unsigned msk = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(i0))) |
                   static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(i1))) << 8;
    while (msk != 0) {
      const int b = __builtin_ctz(msk);
      ckey[m] = in[j + b];
      coff[m] = static_cast<uint16_t>(base + j + b);
      ++m;
      msk &= msk - 1;
    }
  }
  return m + collect_scalar(in + j, len - j, lo, width, static_cast<uint32_t>(base + j), ckey + m, coff + m);
}
#endif

#if GP_X86_AVX2
#define GP_AVX2_INLINE __attribute__((target("avx2,popcnt"), always_inline)) inline

// |w| bits of 8 fp32 / bf16 weights (as AbsBits).
template <typename T>
GP_AVX2_INLINE __m256i abs_bits8(const T* w) {
  const __m256i sign_off = _mm256_set1_epi32(static_cast<int>(kKeyMask));
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), sign_off);
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    return _mm256_and_si256(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16), sign_off);
  }
}

// Appends the lanes of keys (8 keys of elements base..base+7) flagged in `hit` to the candidates.
GP_AVX2_INLINE int64_t append_hits(__m256i keys, unsigned hit, uint32_t base, uint32_t* ckey, uint16_t* coff) {
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), keys);
  int64_t m = 0;
  while (hit != 0) {
    const int b = __builtin_ctz(hit);
    ckey[m] = lanes[b];
    coff[m] = static_cast<uint16_t>(base + b);
    ++m;
    hit &= hit - 1;
  }
  return m;
}

// Key of 8 elements (nrm unused without kNorm); ORs (|w| bits + 2^23) into *vbad (sign set iff NaN/Inf).
template <typename T, bool kNorm>
GP_AVX2_INLINE __m256i key8(const T* w, const float* nrm, __m256i vinf, __m256i sign_off, __m256i* vbad) {
  const __m256i a = abs_bits8(w);
  *vbad = _mm256_or_si256(*vbad, _mm256_add_epi32(a, vinf));
  if constexpr (kNorm) {
    const __m256 s = _mm256_mul_ps(_mm256_castsi256_ps(a), _mm256_loadu_ps(nrm));
    return _mm256_and_si256(_mm256_castps_si256(s), sign_off);
  } else {
    return a;
  }
}

// Counts the keys below lo into *vless, appends those in [lo, lo + width]; returns the below lanes.
GP_AVX2_INLINE __m256i bracket_step8(__m256i key, __m256i vlo, __m256i vw, uint32_t base, uint32_t* ckey,
                                     uint16_t* coff, int64_t* m, __m256i* vless) {
  const __m256i below = _mm256_cmpgt_epi32(vlo, key);  // keys < 2^31: the signed compare orders them
  *vless = _mm256_sub_epi32(*vless, below);
  const __m256i d = _mm256_sub_epi32(key, vlo);
  const unsigned hit = static_cast<unsigned>(
      _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_min_epu32(d, vw), d))));
  if (__builtin_expect(hit != 0, 0)) *m += append_hits(key, hit, base, ckey + *m, coff + *m);
  return below;
}

// The bracket pass over one row segment w[0:len] (norms nrm[0:len] when kNorm) in a single loop for
// fp32 / bf16: load, key, count below lo, mask byte, range test; the weights stream through without a
// staging buffer, so the loads of the next cache lines overlap the arithmetic. Returns the count of
// candidates appended; adds to *less; ORs the sign of (|w| bits + 2^23) into *bad (set iff NaN/Inf).
template <typename T, bool kNorm>
GP_AVX2_INLINE int64_t bracket_segment_avx2(const T* w, const float* nrm, int64_t len, uint32_t lo, uint32_t width,
                                            bool* mm, uint32_t base, uint32_t* ckey, uint16_t* coff,
                                            int64_t* less, __m256i* bad) {
  const __m256i vlo = _mm256_set1_epi32(static_cast<int>(lo)), vw = _mm256_set1_epi32(static_cast<int>(width));
  const __m256i vinf = _mm256_set1_epi32(0x00800000), sign_off = _mm256_set1_epi32(static_cast<int>(kKeyMask));
  const __m256i one = _mm256_set1_epi8(1), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i vless = _mm256_setzero_si256(), vbad = *bad;
  int64_t m = 0, j = 0;
#define STEP(at) bracket_step8(key8<T, kNorm>(w + (at), nrm + (at), vinf, sign_off, &vbad), vlo, vw, \
                               base + static_cast<uint32_t>(at), ckey, coff, &m, &vless)
  // software prefetch ~4 KiB ahead: the loop body is long enough that the out-of-order window alone
  // keeps too few cache-line loads in flight to reach the bandwidth of a plain read pass
  constexpr int64_t kAhead = 4096 / sizeof(T);
  for (; j + 32 <= len; j += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + j + kAhead), _MM_HINT_T0);
    if constexpr (sizeof(T) == 4) _mm_prefetch(reinterpret_cast<const char*>(w + j + kAhead + 16), _MM_HINT_T0);
    const __m256i b0 = STEP(j), b1 = STEP(j + 8), b2 = STEP(j + 16), b3 = STEP(j + 24);
    if (mm != nullptr) {  // 32 lanes of 0 / -1 -> 32 bytes of 0 / 1, in order
      const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(b0, b1), _mm256_packs_epi32(b2, b3));
      const __m256i bytes = _mm256_and_si256(_mm256_permutevar8x32_epi32(p, order), one);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(mm + j), bytes);
    }
  }
  for (; j + 8 <= len; j += 8) {
    const __m256i b = STEP(j);
    if (mm != nullptr) {
      alignas(32) int32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), b);
      for (int i = 0; i < 8; ++i) mm[j + i] = lanes[i] != 0;
    }
  }
#undef STEP
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), vless);
  int64_t lt = 0;
  for (uint32_t c : lanes) lt += c;
  for (; j < len; ++j) {  // tail, scalar (as fill_keys)
    const uint32_t a = AbsBits<T>::get(reinterpret_cast<const typename AbsBits<T>::Raw*>(w)[j]);
    const uint32_t key = kNorm ? f32_bits(bits_f32(a) * nrm[j]) & kKeyMask : a;
    if (a >= kInfBits) vbad = _mm256_or_si256(vbad, _mm256_set1_epi32(static_cast<int>(0x80000000u)));
    lt += key < lo;
    if (mm != nullptr) mm[j] = key < lo;
    if (key - lo <= width) {
      ckey[m] = key;
      coff[m] = static_cast<uint16_t>(base + j);
      ++m;
    }
  }
  *less += lt;
  *bad = vbad;
  return m;
}

template <typename T>
GP_TARGET_AVX2 uint32_t bracket_chunk_fused_avx2(const T* wp, const float* nrm, int64_t cols, int64_t f0, int64_t f1,
                                                 Bracket br, bool* mask, uint32_t* ckey, uint16_t* coff,
                                                 int64_t* count, int64_t* less) {
  __m256i bad = _mm256_setzero_si256();
  int64_t m = 0, lt = 0;
  const uint32_t width = br.hi - br.lo;
  for (int64_t f = f0; f < f1;) {  // row segments: the norms of a segment are contiguous
    const int64_t c0 = f % cols;
    const int64_t len = std::min(cols - c0, f1 - f);
    bool* mm = mask == nullptr ? nullptr : mask + f;
    const uint32_t base = static_cast<uint32_t>(f - f0);
    if (nrm != nullptr) {
      m += bracket_segment_avx2<T, true>(wp + f, nrm + c0, len, br.lo, width, mm, base, ckey + m, coff + m, &lt, &bad);
    } else {
      m += bracket_segment_avx2<T, false>(wp + f, nullptr, len, br.lo, width, mm, base, ckey + m, coff + m, &lt,
                                          &bad);
    }
    f += len;
  }
  *count = m;
  *less = lt;
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(bad)));
}
#endif

// One chunk of the bracket pass: counts keys < lo into *less, appends candidates, and writes
// mask[f] = key < lo when mask is set. Returns the non-finite flag.
template <typename W, bool kAvx2>
GP_INLINE uint32_t bracket_chunk(const W* wp, const float* nrm, int64_t cols, int64_t f0, int64_t f1,
                                 uint32_t* buf, Bracket br, bool* mask, uint32_t* ckey, uint16_t* coff,
                                 int64_t* count, int64_t* less) {
  uint32_t bad = 0;
  int64_t m = 0, lt_all = 0;
  const uint32_t lo = br.lo, width = br.hi - br.lo;
  for (int64_t f = f0; f < f1;) {
    const int64_t c0 = f % cols;
    const int64_t len = std::min({cols - c0, f1 - f, kBlock});
    bad |= fill_keys(wp + f, nrm == nullptr ? nullptr : nrm + c0, len, buf);
    uint32_t lt = 0;
    if (mask != nullptr) {
      bool* __restrict mm = mask + f;
      for (int64_t j = 0; j < len; ++j) {
        const bool below = buf[j] < lo;
        mm[j] = below;
        lt += below;
      }
    } else {
      for (int64_t j = 0; j < len; ++j) lt += buf[j] < lo;
    }
    lt_all += lt;
    const uint32_t base = static_cast<uint32_t>(f - f0);
#if GP_X86_AVX2
    if constexpr (kAvx2) {
      m += collect_avx2(buf, len, lo, width, base, ckey + m, coff + m);
    } else {
      m += collect_scalar(buf, len, lo, width, base, ckey + m, coff + m);
    }
#else
    m += collect_scalar(buf, len, lo, width, base, ckey + m, coff + m);
#endif
    f += len;
  }
  *count = m;
  *less = lt_all;
  return bad;
}

template <typename T>
uint32_t bracket_chunk_default(const T* wp, const float* nrm, int64_t cols, int64_t f0, int64_t f1, uint32_t* buf,
                               Bracket br, bool* mask, uint32_t* ckey, uint16_t* coff, int64_t* count,
                               int64_t* less) {
  return bracket_chunk<T, false>(wp, nrm, cols, f0, f1, buf, br, mask, ckey, coff, count, less);
}

#if GP_X86_AVX2
template <typename T>
GP_TARGET_AVX2 uint32_t bracket_chunk_avx2(const T* wp, const float* nrm, int64_t cols, int64_t f0, int64_t f1,
                                           uint32_t* buf, Bracket br, bool* mask, uint32_t* ckey, uint16_t* coff,
                                           int64_t* count, int64_t* less) {
  return bracket_chunk<T, true>(wp, nrm, cols, f0, f1, buf, br, mask, ckey, coff, count, less);
}
#endif

// counts of (key - base) >> shift over the candidates with base <= key <= base + span, nb buckets.
std::vector<int64_t> candidate_histogram(const std::vector<CandBuf>& bufs, uint32_t base, uint32_t span, int shift,
                                         uint32_t nb) {
  // one thread: ~1e6 candidates take milliseconds, less than waking a descheduled pool thread on a
  // loaded machine
  const int nt = static_cast<int>(bufs.size());
  std::vector<std::vector<uint32_t>> hs(static_cast<size_t>(nt));
  for (int t = 0; t < nt; ++t) {
    std::vector<uint32_t>& h = hs[t];
    h.assign(nb, 0);
    const uint32_t* key = bufs[t].key.get();
    for (int64_t i = 0; i < bufs[t].size; ++i) {
      const uint32_t d = key[i] - base;
      if (d <= span) ++h[d >> shift];
    }
  }
  std::vector<int64_t> out(nb, 0);
  for (const auto& h : hs)
    for (uint32_t b = 0; b < nb; ++b) out[b] += h[b];
  return out;
}

// The candidate of 0-based rank r among all candidates (keys in [lo, hi]), with take and equal.
Sel select_candidates(const std::vector<CandBuf>& bufs, Bracket br, int64_t r) {
  const uint32_t width = br.hi - br.lo;
  const int bits = width == 0 ? 0 : 32 - __builtin_clz(width);
  const int shift = std::max(0, bits - 16);
  const uint32_t nb1 = (width >> shift) + 1;
  const std::vector<int64_t> h1 = candidate_histogram(bufs, br.lo, width, shift, nb1);
  const uint32_t b1 = find_bucket(h1.data(), nb1, r);
  if (shift == 0) return {br.lo + b1, r + 1, h1[b1]};
  const uint32_t base = br.lo + (b1 << shift);
  const uint32_t nb2 = 1u << shift;
  const std::vector<int64_t> h2 = candidate_histogram(bufs, base, nb2 - 1, 0, nb2);
  const uint32_t b2 = find_bucket(h2.data(), nb2, r);
  return {base + b2, r + 1, h2[b2]};
}

// Sets the mask bytes of the pruned candidates: key < T, or key == T among the first `take` in group
// order (about half of the candidates: the others keep the false the pass wrote).
void fix_candidates(const Group& g, const std::vector<ChunkCands>& cc, const std::vector<CandBuf>& bufs, Sel t,
                    std::vector<at::Tensor>& masks) {
  const int64_t nc = static_cast<int64_t>(cc.size());
  const int nt = static_cast<int>(bufs.size());
  std::vector<int64_t> left(static_cast<size_t>(nc), std::numeric_limits<int64_t>::max());
  if (t.take < t.equal) {  // the tie cut falls inside the group: prefix of the ties per chunk
    std::vector<int64_t> eq(static_cast<size_t>(nc), 0);
    std::atomic<int64_t> next{0};
    run_threads(nt, [&](int) {
      for_dynamic(next, nc, 64, [&](int64_t c) {
        const uint32_t* key = bufs[cc[c].th].key.get() + cc[c].begin;
        int64_t e = 0;
        for (int64_t i = 0; i < cc[c].count; ++i) e += key[i] == t.key;
        eq[c] = e;
      });
    });
    int64_t before = 0;
    for (int64_t c = 0; c < nc; ++c) {
      left[c] = std::clamp<int64_t>(t.take - before, 0, eq[c]);
      before += eq[c];
    }
  }
  const uint32_t T = t.key;
  std::atomic<int64_t> next{0};
  run_threads(nt, [&](int) {
    for_dynamic(next, nc, 64, [&](int64_t c) {
      const uint32_t* key = bufs[cc[c].th].key.get() + cc[c].begin;
      const uint16_t* off = bufs[cc[c].th].off.get() + cc[c].begin;
      bool* mm = masks[g.chunks[c].t].data_ptr<bool>() + g.chunks[c].f0;
      int64_t l = left[c];
      for (int64_t i = 0; i < cc[c].count; ++i) {  // the pass wrote false for every candidate (key >= lo)
        const bool tie = key[i] == T && l > 0;
        l -= tie;
        if (key[i] < T || tie) mm[off[i]] = true;
      }
    });
  });
}

// The bracket path for k >= 1: true and *out set (and, with masks, every mask byte written) when the
// bracket decided; false when the histogram passes must (masks then hold partial garbage). Throws on
// NaN/Inf (weights are never written here).
bool bracket_select(const Group& g, int64_t k, std::vector<at::Tensor>* masks, Sel* out) {
  const int64_t cap = max_candidates(g.total);
  if (cap == 0) return false;
  const Bracket br = bracket_from_sample(g, k);
  const int nt = threads_for(g.total);
  const int64_t nc = static_cast<int64_t>(g.chunks.size());
  std::vector<CandBuf> bufs(static_cast<size_t>(nt));
  for (CandBuf& b : bufs) {  // each thread may hold up to the whole cap (plus one chunk)
    b.cap = cap + kChunk;
    b.key.reset(new uint32_t[static_cast<size_t>(b.cap)]);
    b.off.reset(new uint16_t[static_cast<size_t>(b.cap)]);
    advise_huge_pages(b.key.get(), static_cast<size_t>(b.cap) * sizeof(uint32_t));
  }
  std::vector<ChunkCands> cc(static_cast<size_t>(nc));
  std::vector<uint8_t> bad(static_cast<size_t>(nc), 0);
  std::atomic<int64_t> used{0};
  std::atomic<bool> full{false};
  std::atomic<int64_t> next{0};
  run_threads(nt, [&](int th) {
    CandBuf& cb = bufs[th];
    alignas(64) uint32_t buf[kBlock];
    for_dynamic(next, nc, 1, [&](int64_t c) {
      if (full.load(std::memory_order_relaxed)) return;  // the histogram passes will decide
      const Chunk& ch = g.chunks[c];
      const at::Tensor& w = g.w[ch.t];
      const float* nrm = g.nrm[ch.t].empty() ? nullptr : g.nrm[ch.t].data();
      bool* mask = masks == nullptr ? nullptr : (*masks)[ch.t].data_ptr<bool>();
      int64_t count = 0, less = 0;
      bad[c] = dispatch_weight(w.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        const T* wp = w.data_ptr<T>();
        uint32_t* ckey = cb.key.get() + cb.size;
        uint16_t* coff = cb.off.get() + cb.size;
#if GP_X86_AVX2
        if constexpr (!std::is_same_v<T, c10::Half>) {
          if (g.avx2)
            return bracket_chunk_fused_avx2<T>(wp, nrm, w.size(1), ch.f0, ch.f1, br, mask, ckey, coff, &count, &less);
        }
        if (g.avx2)
          return bracket_chunk_avx2<T>(wp, nrm, w.size(1), ch.f0, ch.f1, buf, br, mask, ckey, coff, &count, &less);
#endif
        return bracket_chunk_default<T>(wp, nrm, w.size(1), ch.f0, ch.f1, buf, br, mask, ckey, coff, &count, &less);
      }) != 0;
      cc[c] = {th, cb.size, count, less};
      cb.size += count;
      if (used.fetch_add(count, std::memory_order_relaxed) + count > cap || cb.size + kChunk > cb.cap)
        full.store(true, std::memory_order_relaxed);
    });
  });
  if (full.load()) {
    ++g_path_counts[kPathOverflow];
    return false;
  }
  throw_bad_chunk(g, bad);
  int64_t less = 0, m = 0;
  for (const ChunkCands& c : cc) {
    less += c.less;
    m += c.count;
  }
  if (!(less <= k - 1 && k - 1 < less + m)) {
    ++g_path_counts[kPathMiss];
    return false;
  }
  *out = select_candidates(bufs, br, k - 1 - less);
  if (masks != nullptr) fix_candidates(g, cc, bufs, *out, *masks);
  ++g_path_counts[kPathBracket];
  return true;
}

Sel group_select(const Group& g, int64_t k, std::vector<at::Tensor>* masks, bool* masks_done) {
  *masks_done = false;
  Sel s{0, 0, 0};
  if (k > 0 && bracket_select(g, k, masks, &s)) {
    *masks_done = masks != nullptr;
    return s;
  }
  ++g_path_counts[kPathHistograms];
  return threshold_by_histograms(g, k);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> triple_tensors(const Sel& s, int64_t k, const at::TensorOptions& opt) {
  const float thr = k > 0 ? bits_f32(s.key) : kNegInf;
  return {at::scalar_tensor(thr, opt.dtype(at::kFloat)), at::scalar_tensor(s.take, opt.dtype(at::kLong)),
          at::scalar_tensor(s.equal, opt.dtype(at::kLong))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> global_threshold(at::TensorList weights, at::TensorList norms,
                                                                int64_t k) {
  const Group g = make_group(weights, norms);
  TORCH_CHECK_VALUE(0 <= k && k <= g.total, "k must be in [0, total elements=", g.total, "], got ", k);
  bool unused = false;
  return triple_tensors(group_select(g, k, nullptr, &unused), k, weights[0].options());
}

std::vector<int64_t> global_select_path_counts() {
  std::vector<int64_t> out;
  for (const auto& c : g_path_counts) out.push_back(c.load());
  return out;
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
  std::atomic<int64_t> next{0};
  run_threads(threads_for(g.total), [&](int) {
    alignas(64) uint32_t buf[kBlock];
    for_dynamic(next, nc, 1, [&](int64_t c) {
      PassArgs a{Pass::kMask};
      a.T = T;
      a.mask = masks[g.chunks[c].t].data_ptr<bool>();
      a.mode = first;
      bad[c] |= run_chunk(g, g.chunks[c], buf, a) != 0;
      eq[c] = a.count;
    });
  });
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
  std::atomic<int64_t> next_redo{0};
  run_threads(threads_for(nr * kChunk), [&](int) {
    alignas(64) uint32_t buf[kBlock];
    for_dynamic(next_redo, nr, 1, [&](int64_t i) {
      const int64_t c = redo[i];
      PassArgs a{Pass::kMask};
      a.T = T;
      a.mask = masks[g.chunks[c].t].data_ptr<bool>();
      a.mode = prune_eq[c] == 0 ? MaskMode::kLess : MaskMode::kCut;
      a.left = prune_eq[c];
      run_chunk(g, g.chunks[c], buf, a);
    });
  });
}

// Free 2 MiB blocks the kernel could hand out as huge pages without compacting memory: the free
// blocks of order >= 9 in /proc/buddyinfo (an order-o block holds 2^(o-9) of them); 0 when unknown.
// The fresh masks are written once, so their first touch (page faults that zero each page) is a
// large part of global_masks: with 2 MiB pages a fresh 101 MiB bool tensor took 47-50 ms to fill
// against 96-101 ms with 4 KiB pages (a refill of touched memory: 33 ms). But when no free 2 MiB
// blocks are left, each huge-page fault waits for compaction (on a machine with 2 of 24 GiB free the
// masks then took 2.0-2.9 s instead of 1.3-1.8 s), so huge pages are asked for only when the free
// blocks cover twice the masks.
int64_t free_huge_blocks() {
#ifdef __linux__
  FILE* f = std::fopen("/proc/buddyinfo", "r");
  if (f == nullptr) return 0;
  int64_t blocks = 0;
  char line[512];
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    // "Node 0, zone   Normal   n0 n1 ... n10": free blocks of order 0..10 after the zone name
    const char* p = std::strstr(line, "zone");
    if (p == nullptr) continue;
    p += 4;
    while (*p == ' ') ++p;
    while (*p != ' ' && *p != '\0') ++p;  // the zone name
    for (int order = 0;; ++order) {
      char* end = nullptr;
      const long long n = std::strtoll(p, &end, 10);
      if (end == p) break;
      if (order >= 9) blocks += static_cast<int64_t>(n) << (order - 9);
      p = end;
    }
  }
  std::fclose(f);
  return blocks;
#else
  return 0;
#endif
}

// Uninitialised bool masks, one per weight of the group (huge pages when free_huge_blocks allows).
std::vector<at::Tensor> fresh_masks(const Group& g) {
  const bool huge = free_huge_blocks() * (int64_t{2} << 20) >= 2 * g.total;
  std::vector<at::Tensor> masks;
  for (const auto& w : g.w) {
    const at::TensorOptions opt = w.options().dtype(at::kBool);
    masks.push_back(huge ? empty_huge(w.sizes(), opt) : at::empty(w.sizes(), opt));
  }
  return masks;
}

std::vector<at::Tensor> global_mask(at::TensorList weights, at::TensorList norms, const at::Tensor& threshold,
                                    const at::Tensor& take) {
  const Group g = make_group(weights, norms);
  std::vector<at::Tensor> masks = fresh_masks(g);
  global_mask_into(g, threshold, take, masks);
  return masks;
}

// Fused select + masks of one group: the bracket pass writes the masks as it selects (one read of the
// weights); the histogram passes and a mask pass when the bracket cannot decide.
std::vector<at::Tensor> global_masks(at::TensorList weights, at::TensorList norms, int64_t k) {
  const Group g = make_group(weights, norms);
  TORCH_CHECK_VALUE(0 <= k && k <= g.total, "k must be in [0, total elements=", g.total, "], got ", k);
  std::vector<at::Tensor> masks = fresh_masks(g);
  bool done = false;
  const Sel s = group_select(g, k, &masks, &done);
  if (!done) {
    const auto [thr, take, equal] = triple_tensors(s, k, weights[0].options());
    global_mask_into(g, thr, take, masks);
  }
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

// Schemas: the global_* entries of SCHEMAS in gradprobe/ops/_schemas.py (+ a test hook).
TORCH_LIBRARY_FRAGMENT(gradprobe_cpp, m) {
  m.def("global_threshold(Tensor[] weights, Tensor[] norms, int k) -> (Tensor threshold, Tensor take, Tensor equal)");
  m.def("global_mask(Tensor[] weights, Tensor[] norms, Tensor threshold, Tensor take) -> Tensor[]");
  m.def(
      "global_prune_(Tensor(a!)[] weights, Tensor(b!)[] masks, Tensor[] norms, Tensor threshold, Tensor take) -> ()");
  m.def("global_masks(Tensor[] weights, Tensor[] norms, int k) -> Tensor[]");
  // test hook: how often each global path ran (bracket, overflow, miss, histograms), process-wide
  m.def("global_select_path_counts() -> int[]", &gradprobe::global_select_path_counts);
}

TORCH_LIBRARY_IMPL(gradprobe_cpp, CPU, m) {
  m.impl("global_threshold", &gradprobe::global_threshold);
  m.impl("global_mask", &gradprobe::global_mask);
  m.impl("global_prune_", &gradprobe::global_prune_);
  m.impl("global_masks", &gradprobe::global_masks);
}
