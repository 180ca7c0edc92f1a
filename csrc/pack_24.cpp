// 2:4 packer, CPU (C++17 + OpenMP): the `cpp` backend of gradprobe::pack_24_cutlass, unpack_24_cutlass,
// pack_24_bitmask and unpack_24_bitmask (layouts: gradprobe/ops/_schemas.py).
//
// One pass over the weight in blocks of 16 elements (one int16 of CUTLASS metadata; 4 groups):
//   * nonzero pattern: 16 bits (bit i = element i nonzero), from an AVX2 compare + movemask, or, in the
//     portable path, per group of 4 from one uint64 load: ((x & 0x7fff..) + 0x7fff..) sets each lane's top
//     bit iff the lane is nonzero, and a multiply gathers the 4 top bits into a nibble;
//   * metadata, bitmask bytes, kept-value positions and "more than 2 nonzeros" flags: lookups in 256-entry
//     tables indexed by the pattern of 2 groups (built at compile time from pack_24.h's nibble tables);
//   * kept values: one pshufb per 16 elements (AVX2) or shifts of the uint64 (portable).
// With scores, the 2 smallest of each group are found from the 6 pairwise `<=` of its scores (a 64-entry
// table) and zeroed first; non-finite scores are noticed in the same pass (max of |bits|).
// Validation is fused: blocks only raise a flag; if any is set, the first bad group is then found exactly.
// Outputs are fresh tensors (asked for huge pages), so nothing the caller owns changes on error.
// AVX2 is picked at run time; GRADPROBE_CPP_DISABLE_AVX2=1 (read on every call) forces the portable path.
// Argument checks: pack_24_args.h (shared with the CUDA wrappers, pack_24_cuda.cpp, over pack_24.cu).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu_util.h"
#include "pack_24.h"
#include "pack_24_args.h"

namespace gradprobe {
namespace {

using namespace pack24;

constexpr uint32_t kFiniteLimit = 0x7F800000u;  // |bits| of fp32 Inf; NaN is above
constexpr uint16_t kValidNibbles16 = 0x7310;    // nibbles idx0 | idx1 << 2 with idx0 < idx1
constexpr uint16_t kTwoBits = 0x1668;           // 4-bit masks with exactly 2 bits set

// ---- tables -----------------------------------------------------------------------------------------

constexpr int ctz_c(uint32_t x) {
  int i = 0;
  while (i < 3 && !((x >> i) & 1u)) ++i;
  return i;
}
constexpr int top_c(uint32_t x) {
  int i = 3;
  while (i > 0 && !((x >> i) & 1u)) --i;
  return i;
}
constexpr uint32_t nib_of(uint64_t table, uint32_t i) { return static_cast<uint32_t>(table >> (4 * i)) & 0xFu; }
constexpr int bits4(uint32_t x) { return static_cast<int>((x & 1u) + ((x >> 1) & 1u) + ((x >> 2) & 1u) + ((x >> 3) & 1u)); }

struct Tables {
  uint8_t cut_meta[256];   // CUTLASS nibbles of the 2 groups whose nonzero patterns are the byte's nibbles
  uint8_t bm_keep[256];    // bitmask nibbles (kept positions; 0011 for a group with > 2 nonzeros)
  uint8_t bm_pair[256];    // the bitmask kept positions as nibbles idx0 | idx1 << 2
  uint8_t bad[256];        // 1 if either group has > 2 nonzeros
  uint8_t meta_bad[256];   // 1 if either CUTLASS nibble is not a valid (idx0 < idx1) pair
  uint8_t prune[64];       // pruned mask of a group from its 6 score comparisons (see prune_index)
  uint64_t cut_ctrl[256];  // pshufb bytes gathering the 2 groups' 4 kept 16-bit values (CUTLASS)
  uint64_t bm_ctrl[256];   // the same for the bitmask kept positions
  uint8_t unpack_ctrl[256][16];     // pshufb bytes scattering 4 packed values to 8 lanes (0x80: zero), CUTLASS
  uint8_t bm_unpack_ctrl[256][16];  // the same from a bitmask byte
  uint8_t bm_invalid[256];          // 1 if either bitmask nibble does not have exactly 2 bits
};

// pshufb bytes placing packed values 2g, 2g+1 at lanes 4g + idx0, 4g + idx1 of each valid group g
constexpr void scatter_ctrl(uint8_t* ctrl, uint32_t pair_lo, bool ok_lo, uint32_t pair_hi, bool ok_hi) {
  for (int i = 0; i < 16; ++i) ctrl[i] = 0x80;
  for (uint32_t g = 0; g < 2; ++g) {
    const uint32_t pair = g ? pair_hi : pair_lo;
    if (!(g ? ok_hi : ok_lo)) continue;
    for (uint32_t k = 0; k < 2; ++k) {
      const uint32_t dst = 4 * g + ((pair >> (2 * k)) & 3u), src = 2 * g + k;
      ctrl[2 * dst] = static_cast<uint8_t>(2 * src);
      ctrl[2 * dst + 1] = static_cast<uint8_t>(2 * src + 1);
    }
  }
}

constexpr uint64_t gather_ctrl(uint32_t pair_lo, uint32_t pair_hi) {
  uint64_t c = 0;
  for (uint32_t g = 0; g < 2; ++g) {
    const uint32_t pair = g ? pair_hi : pair_lo;
    for (uint32_t k = 0; k < 2; ++k) {
      const uint32_t src = 4 * g + ((pair >> (2 * k)) & 3u);
      c |= static_cast<uint64_t>(2 * src) << (8 * (4 * g + 2 * k));
      c |= static_cast<uint64_t>(2 * src + 1) << (8 * (4 * g + 2 * k + 1));
    }
  }
  return c;
}

constexpr uint32_t bm_pair_of(uint32_t code) {
  uint32_t keep = nib_of(kBitmaskKeep, code);
  if (keep == 0) keep = 3;
  return static_cast<uint32_t>(ctz_c(keep)) | static_cast<uint32_t>(top_c(keep)) << 2;
}

constexpr Tables make_tables() {
  Tables t{};
  for (uint32_t b = 0; b < 256; ++b) {
    const uint32_t lo = b & 0xFu, hi = b >> 4;
    t.cut_meta[b] = static_cast<uint8_t>(nib_of(kCutlassNibbles, lo) | nib_of(kCutlassNibbles, hi) << 4);
    const uint32_t klo = nib_of(kBitmaskKeep, lo), khi = nib_of(kBitmaskKeep, hi);
    t.bm_keep[b] = static_cast<uint8_t>((klo ? klo : 3u) | (khi ? khi : 3u) << 4);
    t.bm_pair[b] = static_cast<uint8_t>(bm_pair_of(lo) | bm_pair_of(hi) << 4);
    t.bad[b] = static_cast<uint8_t>(bits4(lo) > 2 || bits4(hi) > 2);
    t.meta_bad[b] = static_cast<uint8_t>(!((kValidNibbles16 >> lo) & 1u) || !((kValidNibbles16 >> hi) & 1u));
    t.cut_ctrl[b] = gather_ctrl(nib_of(kCutlassNibbles, lo), nib_of(kCutlassNibbles, hi));
    t.bm_ctrl[b] = gather_ctrl(bm_pair_of(lo), bm_pair_of(hi));
    const bool vlo = (kValidNibbles16 >> lo) & 1u, vhi = (kValidNibbles16 >> hi) & 1u;
    scatter_ctrl(t.unpack_ctrl[b], lo, vlo, hi, vhi);
    const bool two_lo = (kTwoBits >> lo) & 1u, two_hi = (kTwoBits >> hi) & 1u;
    scatter_ctrl(t.bm_unpack_ctrl[b], bm_pair_of(lo), two_lo, bm_pair_of(hi), two_hi);
    t.bm_invalid[b] = static_cast<uint8_t>(!two_lo || !two_hi);
  }
  // bit (j, i) for j < i, in the order (0,1) (0,2) (0,3) (1,2) (1,3) (2,3): s_j <= s_i, i.e. j ranks before
  // i (smaller score, ties: lower index). The 2 elements with fewer than 2 before them are pruned.
  constexpr int kJ[6] = {0, 0, 0, 1, 1, 2}, kI[6] = {1, 2, 3, 2, 3, 3};
  for (uint32_t idx = 0; idx < 64; ++idx) {
    int rank[4] = {0, 0, 0, 0};
    for (int p = 0; p < 6; ++p) ++rank[((idx >> p) & 1u) ? kI[p] : kJ[p]];
    uint32_t m = 0;
    for (int i = 0; i < 4; ++i) m |= static_cast<uint32_t>(rank[i] < 2) << i;
    t.prune[idx] = static_cast<uint8_t>(m);
  }
  return t;
}

constexpr Tables kT = make_tables();

// ---- portable group primitives ----------------------------------------------------------------------

constexpr uint64_t kMag16 = 0x7FFF7FFF7FFF7FFFull;

// bit i = 16-bit lane i of x nonzero (ignoring the sign bit)
GP_INLINE uint32_t nz4(uint64_t x) {
  const uint64_t t = ((x & kMag16) + kMag16) & 0x8000800080008000ull;
  return static_cast<uint32_t>(((t >> 15) * 0x0001000200040008ull) >> 48);
}
// 0xFFFF in 16-bit lane i iff bit i of k
GP_INLINE uint64_t lane_mask(uint32_t k) { return ((k * 0x0000200040008001ull) & 0x0001000100010001ull) * 0xFFFFull; }
GP_INLINE uint32_t lane(uint64_t x, uint32_t i) { return static_cast<uint32_t>(x >> (16 * i)) & 0xFFFFu; }

GP_INLINE uint32_t abs_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b & 0x7FFFFFFFu;
}

// Pruned mask (bit i = pruned) of the group's 2 smallest scores; folds |bits| into amax.
GP_INLINE uint32_t prune_group(const float* s, uint32_t& amax) {
  for (int i = 0; i < 4; ++i) amax = std::max(amax, abs_bits(s[i]));
  const uint32_t idx = static_cast<uint32_t>(s[0] <= s[1]) | static_cast<uint32_t>(s[0] <= s[2]) << 1 |
                       static_cast<uint32_t>(s[0] <= s[3]) << 2 | static_cast<uint32_t>(s[1] <= s[2]) << 3 |
                       static_cast<uint32_t>(s[1] <= s[3]) << 4 | static_cast<uint32_t>(s[2] <= s[3]) << 5;
  return kT.prune[idx];
}

// One group of any width: v = raw values (pruned ones zeroed); returns the nonzero pattern.
template <typename Raw, bool kScored>
GP_INLINE uint32_t group_code(const Raw* w, const float* s, Raw* v, uint32_t& amax) {
  constexpr Raw kMag = static_cast<Raw>(~(Raw(1) << (8 * sizeof(Raw) - 1)));
  const uint32_t pruned = kScored ? prune_group(s, amax) : 0u;
  uint32_t code = 0;
  for (int i = 0; i < 4; ++i) {
    v[i] = ((pruned >> i) & 1u) ? Raw(0) : w[i];
    code |= static_cast<uint32_t>((v[i] & kMag) != 0) << i;
  }
  return code;
}

// 16 16-bit elements -> x[4] (pruned lanes zeroed), returns the 16-bit nonzero pattern.
template <bool kScored>
GP_INLINE uint32_t block16(const uint16_t* w, const float* s, uint64_t* x, uint32_t& amax) {
  uint32_t code = 0;
  for (int q = 0; q < 4; ++q) {
    std::memcpy(&x[q], w + 4 * q, 8);
    if (kScored) x[q] &= ~lane_mask(prune_group(s + 4 * q, amax));
    code |= nz4(x[q]) << (4 * q);
  }
  return code;
}

// the 4 values of the pairs (nibbles idx0 | idx1 << 2) in `pairs16` -> dst[0..7]
GP_INLINE void gather16(const uint64_t* x, uint32_t pairs16, uint16_t* dst) {
  for (int q = 0; q < 4; ++q) {
    const uint32_t nib = (pairs16 >> (4 * q)) & 0xFu;
    const uint32_t v = lane(x[q], nib & 3u) | lane(x[q], nib >> 2) << 16;
    std::memcpy(dst + 2 * q, &v, 4);
  }
}

// packed[0..7] (2 per group) -> dst[0..15], group q's values at lanes idx0, idx1 of nibble q of pairs16
// (the caller flags invalid nibbles: the op then raises and the output is dropped)
GP_INLINE void scatter16(const uint16_t* packed, uint32_t pairs16, uint16_t* dst) {
  for (int q = 0; q < 4; ++q) {
    const uint32_t nib = (pairs16 >> (4 * q)) & 0xFu;
    uint32_t v;
    std::memcpy(&v, packed + 2 * q, 4);
    const uint64_t out = static_cast<uint64_t>(v & 0xFFFFu) << (16 * (nib & 3u)) |
                         static_cast<uint64_t>(v >> 16) << (16 * (nib >> 2));
    std::memcpy(dst + 4 * q, &out, 8);
  }
}

GP_INLINE uint32_t two(const uint8_t* table, uint32_t code16) { return table[code16 & 0xFFu] | table[code16 >> 8] << 8; }
GP_INLINE uint32_t either(const uint8_t* table, uint32_t code16) { return table[code16 & 0xFFu] | table[code16 >> 8]; }

#if GP_X86_AVX2
// ---- AVX2 primitives --------------------------------------------------------------------------------

GP_TARGET_AVX2 GP_INLINE uint32_t prune16_avx2(const float* s, __m256i& amax) {
  uint32_t out = 0;
  for (int h = 0; h < 2; ++h) {
    const __m256 v = _mm256_loadu_ps(s + 8 * h);
    amax = _mm256_max_epu32(amax, _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7FFFFFFF)));
    const __m256 a = _mm256_permute_ps(v, _MM_SHUFFLE(1, 0, 0, 0)), b = _mm256_permute_ps(v, _MM_SHUFFLE(2, 3, 2, 1));
    const __m256 c = _mm256_permute_ps(v, _MM_SHUFFLE(2, 1, 2, 1)), d = _mm256_permute_ps(v, _MM_SHUFFLE(3, 3, 3, 3));
    const uint32_t m1 = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_LE_OQ)));
    const uint32_t m2 = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(c, d, _CMP_LE_OQ)));
    const uint32_t p0 = kT.prune[(m1 & 0xFu) | (m2 & 3u) << 4], p1 = kT.prune[(m1 >> 4) | ((m2 >> 4) & 3u) << 4];
    out |= (p0 | p1 << 4) << (8 * h);
  }
  return out;
}

// 16 16-bit elements -> x (pruned lanes zeroed), returns the 16-bit nonzero pattern.
template <bool kScored>
GP_TARGET_AVX2 GP_INLINE uint32_t block16_avx2(const uint16_t* w, const float* s, __m256i& x, __m256i& amax) {
  x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  if (kScored) {
    const __m256i sel = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                          static_cast<int16_t>(0x8000));
    const __m256i p = _mm256_set1_epi16(static_cast<int16_t>(prune16_avx2(s, amax)));
    x = _mm256_andnot_si256(_mm256_cmpeq_epi16(_mm256_and_si256(p, sel), sel), x);
  }
  const __m256i z = _mm256_cmpeq_epi16(_mm256_and_si256(x, _mm256_set1_epi16(0x7FFF)), _mm256_setzero_si256());
  const uint32_t m = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_packs_epi16(z, z)));
  return ~((m & 0xFFu) | ((m >> 8) & 0xFF00u)) & 0xFFFFu;
}

// gathers 8 of x's 16 lanes with 2 8-byte pshufb controls (one per 128-bit half) into dst[0..7]
GP_TARGET_AVX2 GP_INLINE void gather16_avx2(__m256i x, uint64_t ctrl_lo, uint64_t ctrl_hi, uint16_t* dst) {
  const __m256i ctrl = _mm256_set_epi64x(0, static_cast<int64_t>(ctrl_hi), 0, static_cast<int64_t>(ctrl_lo));
  const __m256i y = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(x, ctrl), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(y));
}

// packed[0..7] -> dst[0..15] with one 16-byte pshufb control per 128-bit half
GP_TARGET_AVX2 GP_INLINE void scatter16_avx2(const uint16_t* packed, const uint8_t* ctrl_lo, const uint8_t* ctrl_hi,
                                             uint16_t* dst) {
  const __m256i hi_half = _mm256_set_m128i(_mm_set1_epi8(8), _mm_setzero_si128());
  const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed)));
  const __m256i ctrl = _mm256_or_si256(_mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ctrl_hi)),
                                                        _mm_loadu_si128(reinterpret_cast<const __m128i*>(ctrl_lo))),
                                       hi_half);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_shuffle_epi8(v, ctrl));
}

GP_TARGET_AVX2 GP_INLINE uint32_t over_limit(__m256i amax) {
  return static_cast<uint32_t>(
      _mm256_movemask_epi8(_mm256_cmpgt_epi32(amax, _mm256_set1_epi32(static_cast<int>(kFiniteLimit - 1)))));
}
#endif

// ---- driver ---------------------------------------------------------------------------------------

struct PassResult {
  uint32_t bad = 0;   // some group is bad (the first one is then found exactly)
  uint32_t amax = 0;  // max |bits| of the scores (>= kFiniteLimit: non-finite)
};

// f(r0, r1, bad, amax) over blocks of rows (multiples of 32, ~1 MiB of input each), dynamically
// scheduled on the OpenMP pool: a loaded machine stalls one block, not a whole half of the rows.
template <typename F>
PassResult for_row_blocks(int64_t rows, int64_t row_bytes, F&& f) {
  const int64_t block = std::max<int64_t>(1, ((int64_t{1} << 20) / std::max<int64_t>(1, row_bytes) + 31) / 32) * 32;
  const int64_t nb = (rows + block - 1) / block;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nb)));
  uint32_t bad = 0, amax = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) reduction(| : bad) reduction(max : amax)
  for (int64_t i = 0; i < nb; ++i) f(i * block, std::min(rows, i * block + block), bad, amax);
  return {bad, amax};
}

// Raises for the pass's outcome: non-finite scores, else the first group (row-major) with too many nonzeros.
void raise_pack_errors(const PassResult& res, const at::Tensor& w, int64_t per, const std::string& fmt) {
  if (res.amax >= kFiniteLimit) raise_nonfinite_scores();
  if (res.bad == 0) return;
  const at::Tensor over = (w.reshape({w.size(0), w.size(1) / per, per}) != 0).sum(-1).gt(per / 2).flatten();
  const at::Tensor idx = over.nonzero();
  TORCH_INTERNAL_ASSERT(idx.size(0) > 0, "pack_24: a group was flagged but none has too many nonzeros");
  raise_not_sparse(w, idx[0][0].item<int64_t>(), per, fmt);
}

// ---- CUTLASS --------------------------------------------------------------------------------------

// Metadata of one 32-row group, gathered in its final (interleaved) order in a small buffer and written
// out as 128-byte runs: each metadata cache line holds 32 rows' words, so 2-byte stores straight to the
// output would touch a new line per store. Blocks of rows start and end at multiples of 32.
class MetaBlock {
 public:
  MetaBlock(uint16_t* meta, int64_t rows, int64_t meta_cols)
      : meta_(meta), rows_(rows), pairs_(meta_cols / 2), buf_(static_cast<size_t>(32 * meta_cols)) {}
  // row r's positions in buf(), for MetaRow::at(c, 32)
  MetaRow row(int64_t r) const {
    const MetaRow m = meta_row(r, rows_);
    return {m.even - 2 * (r / 32 * 32), m.odd - 2 * (r / 32 * 32)};
  }
  uint16_t* buf() { return buf_.data(); }
  void end_row(int64_t r) {
    if (r % 32 != 31) return;
    for (int64_t p = 0; p < pairs_; ++p) std::memcpy(meta_ + p * 2 * rows_ + 2 * (r - 31), buf_.data() + 64 * p, 128);
  }

 private:
  uint16_t* meta_;
  int64_t rows_, pairs_;
  std::vector<uint16_t> buf_;
};

GP_INLINE void put_meta(uint16_t* mbuf, const MetaRow& mo, int64_t c, uint32_t code, uint32_t& bad) {
  mbuf[mo.at(c, 32)] = static_cast<uint16_t>(two(kT.cut_meta, code));
  bad |= either(kT.bad, code);
}

template <bool kScored>
void cutlass16_rows(const uint16_t* w, const float* s, uint16_t* packed, uint16_t* meta, int64_t rows, int64_t cols,
                    int64_t r0, int64_t r1, uint32_t& bad_io, uint32_t& amax_io) {
  uint32_t bad = 0, amax = 0;
  MetaBlock mb(meta, rows, cols / 16);
  uint16_t* const mbuf = mb.buf();
  for (int64_t r = r0; r < r1; ++r) {
    const MetaRow mo = mb.row(r);
    for (int64_t c = 0, e = r * cols; c < cols / 16; ++c, e += 16) {
      uint64_t x[4];
      const uint32_t code = block16<kScored>(w + e, kScored ? s + e : nullptr, x, amax);
      gather16(x, two(kT.cut_meta, code), packed + e / 2);
      put_meta(mbuf, mo, c, code, bad);
    }
    mb.end_row(r);
  }
  bad_io |= bad;
  amax_io = std::max(amax_io, amax);
}

#if GP_X86_AVX2
template <bool kScored>
GP_TARGET_AVX2 void cutlass16_rows_avx2(const uint16_t* w, const float* s, uint16_t* packed, uint16_t* meta,
                                        int64_t rows, int64_t cols, int64_t r0, int64_t r1, uint32_t& bad_io,
                                        uint32_t& amax_io) {
  uint32_t bad = 0, amax = 0;
  __m256i vmax = _mm256_setzero_si256();
  MetaBlock mb(meta, rows, cols / 16);
  uint16_t* const mbuf = mb.buf();
  for (int64_t r = r0; r < r1; ++r) {
    const MetaRow mo = mb.row(r);
    for (int64_t c = 0, e = r * cols; c < cols / 16; ++c, e += 16) {
      __m256i x;
      const uint32_t code = block16_avx2<kScored>(w + e, kScored ? s + e : nullptr, x, vmax);
      gather16_avx2(x, kT.cut_ctrl[code & 0xFFu], kT.cut_ctrl[code >> 8], packed + e / 2);
      put_meta(mbuf, mo, c, code, bad);
    }
    mb.end_row(r);
  }
  if (kScored && over_limit(vmax)) amax = std::max(amax, kFiniteLimit);
  bad_io |= bad;
  amax_io = std::max(amax_io, amax);
}
#endif

// fp32: pairs, at most one nonzero; the kept value is the nonzero (else the second, a zero).
void cutlass32_rows(const uint32_t* w, uint32_t* packed, uint16_t* meta, int64_t rows, int64_t cols, int64_t r0,
                    int64_t r1, uint32_t& bad_io) {
  uint32_t bad = 0;
  MetaBlock mb(meta, rows, cols / 8);
  uint16_t* const mbuf = mb.buf();
  for (int64_t r = r0; r < r1; ++r) {
    const MetaRow mo = mb.row(r);
    for (int64_t c = 0, e = r * cols; c < cols / 8; ++c, e += 8) {
      uint32_t m = 0;
      for (int q = 0; q < 4; ++q) {
        const uint32_t a = w[e + 2 * q], b = w[e + 2 * q + 1];
        const bool nza = (a & 0x7FFFFFFFu) != 0, nzb = (b & 0x7FFFFFFFu) != 0;
        bad |= static_cast<uint32_t>(nza && nzb);
        packed[e / 2 + q] = nza ? a : b;
        m |= (nza ? kNibbleFirst : kNibbleSecond) << (4 * q);
      }
      mbuf[mo.at(c, 32)] = static_cast<uint16_t>(m);
    }
    mb.end_row(r);
  }
  bad_io |= bad;
}

template <bool kScored>
PassResult run_cutlass16(const PackIn& in, uint16_t* packed, uint16_t* meta) {
  const uint16_t* w = reinterpret_cast<const uint16_t*>(in.w.const_data_ptr());
  const float* s = in.sp();
  auto fn = &cutlass16_rows<kScored>;
#if GP_X86_AVX2
  if (avx2_enabled()) fn = &cutlass16_rows_avx2<kScored>;
#endif
  return for_row_blocks(in.rows, in.cols * 2, [&](int64_t r0, int64_t r1, uint32_t& bad, uint32_t& amax) {
    fn(w, s, packed, meta, in.rows, in.cols, r0, r1, bad, amax);
  });
}

std::tuple<at::Tensor, at::Tensor> pack_24_cutlass(const at::Tensor& weight, const std::optional<at::Tensor>& scores) {
  GP_CHECK_CPU(weight);
  const PackIn in = prepare_pack(weight, scores, "cutlass", false);
  const bool f32 = in.w.scalar_type() == at::kFloat;
  at::Tensor packed = empty_huge({in.rows, in.cols / 2}, in.w.options());
  at::Tensor meta = empty_huge({in.rows, in.cols / (f32 ? 8 : 16)}, in.w.options().dtype(at::kShort));
  uint16_t* mp = reinterpret_cast<uint16_t*>(meta.data_ptr<int16_t>());
  PassResult res;
  if (f32) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(in.w.const_data_ptr());
    uint32_t* pp = reinterpret_cast<uint32_t*>(packed.data_ptr());
    res = for_row_blocks(in.rows, in.cols * 4, [&](int64_t r0, int64_t r1, uint32_t& bad, uint32_t&) {
      cutlass32_rows(w, pp, mp, in.rows, in.cols, r0, r1, bad);
    });
  } else {
    uint16_t* pp = reinterpret_cast<uint16_t*>(packed.data_ptr());
    res = in.s.defined() ? run_cutlass16<true>(in, pp, mp) : run_cutlass16<false>(in, pp, mp);
  }
  raise_pack_errors(res, in.w, f32 ? 2 : 4, "cutlass");
  return {packed, meta};
}

// The first group (row-major) whose metadata nibble is invalid; kNoBad if none.
int64_t first_bad_meta(const uint16_t* meta, int64_t rows, int64_t meta_cols, bool f32) {
  for (int64_t r = 0; r < rows; ++r) {
    const MetaRow mo = meta_row(r, rows);
    for (int64_t c = 0; c < meta_cols; ++c) {
      const uint32_t m = meta[mo.at(c, rows)];
      for (int q = 0; q < 4; ++q) {
        const uint32_t nib = (m >> (4 * q)) & 0xFu;
        if (!(f32 ? valid_nibble32(nib) : valid_nibble16(nib))) return r * 4 * meta_cols + 4 * c + q;
      }
    }
  }
  return kNoBad;
}

// fp32: the pair's value goes to its first element for nibble kNibbleFirst, else to the second.
GP_INLINE void unpack_pairs(const uint32_t* packed, uint32_t m, uint32_t* dense, uint32_t& bad) {
  for (int q = 0; q < 4; ++q) {
    const uint32_t nib = (m >> (4 * q)) & 0xFu;
    bad |= static_cast<uint32_t>(!valid_nibble32(nib));
    const bool first = nib == kNibbleFirst;
    const uint32_t v = valid_nibble32(nib) ? packed[q] : 0u;
    dense[2 * q] = first ? v : 0u;
    dense[2 * q + 1] = first ? 0u : v;
  }
}

template <typename Raw>
void unpack_cutlass_rows(const Raw* packed, const uint16_t* meta, Raw* dense, int64_t rows, int64_t cols, int64_t r0,
                         int64_t r1, uint32_t& bad_io) {
  constexpr int64_t kPer = sizeof(Raw) == 2 ? 16 : 8;  // dense elements per metadata word
  uint32_t bad = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const MetaRow mo = meta_row(r, rows);
    for (int64_t c = 0, e = r * cols; c < cols / kPer; ++c, e += kPer) {
      const uint32_t m = meta[mo.at(c, rows)];
      if constexpr (sizeof(Raw) == 2) {
        bad |= either(kT.meta_bad, m);
        scatter16(packed + e / 2, m, dense + e);
      } else {
        unpack_pairs(packed + e / 2, m, dense + e, bad);
      }
    }
  }
  bad_io |= bad;
}

#if GP_X86_AVX2
GP_TARGET_AVX2 void unpack16_rows_avx2(const uint16_t* packed, const uint16_t* meta, uint16_t* dense, int64_t rows,
                                       int64_t cols, int64_t r0, int64_t r1, uint32_t& bad_io) {
  uint32_t bad = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const MetaRow mo = meta_row(r, rows);
    for (int64_t c = 0, e = r * cols; c < cols / 16; ++c, e += 16) {
      const uint32_t m = meta[mo.at(c, rows)];
      bad |= either(kT.meta_bad, m);
      scatter16_avx2(packed + e / 2, kT.unpack_ctrl[m & 0xFFu], kT.unpack_ctrl[m >> 8], dense + e);
    }
  }
  bad_io |= bad;
}
#endif

at::Tensor unpack_24_cutlass(const at::Tensor& packed_in, const at::Tensor& meta_in) {
  GP_CHECK_CPU(packed_in);
  check_cutlass_meta(packed_in, meta_in);
  const at::Tensor packed = packed_in.contiguous(), meta = meta_in.contiguous();
  const int64_t rows = packed.size(0), cols = packed.size(1) * 2;
  const bool f32 = packed.scalar_type() == at::kFloat;
  at::Tensor dense = empty_huge({rows, cols}, packed.options());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(meta.const_data_ptr<int16_t>());
  const void* pp = packed.const_data_ptr();
  void* dp = dense.data_ptr();
  auto fn16 = &unpack_cutlass_rows<uint16_t>;
#if GP_X86_AVX2
  if (avx2_enabled()) fn16 = &unpack16_rows_avx2;
#endif
  const PassResult res = for_row_blocks(rows, cols * packed.element_size(), [&](int64_t r0, int64_t r1, uint32_t& bad, uint32_t&) {
    if (f32) {
      unpack_cutlass_rows<uint32_t>(static_cast<const uint32_t*>(pp), mp, static_cast<uint32_t*>(dp), rows, cols, r0, r1, bad);
    } else {
      fn16(static_cast<const uint16_t*>(pp), mp, static_cast<uint16_t*>(dp), rows, cols, r0, r1, bad);
    }
  });
  if (res.bad != 0) raise_bad_meta(first_bad_meta(mp, rows, meta.size(1), f32), f32 ? cols / 2 : cols / 4, f32 ? 2 : 4);
  return dense;
}

// ---- sparse-24-bitmask ----------------------------------------------------------------------------

// Groups g0..groups-1 of one row, one at a time (any element width); g0 is even.
template <typename Raw, bool kScored>
GP_INLINE void bitmask_groups(const Raw* wr, const float* sr, Raw* vr, uint8_t* br, int64_t g0, int64_t groups,
                              uint32_t& bad, uint32_t& amax) {
  uint32_t byte = 0;
  for (int64_t g = g0; g < groups; ++g) {
    Raw v[4];
    const uint32_t code = group_code<Raw, kScored>(wr + 4 * g, kScored ? sr + 4 * g : nullptr, v, amax);
    const uint32_t pair = kT.bm_pair[code] & 0xFu;
    bad |= kT.bad[code];
    vr[2 * g] = v[pair & 3u];
    vr[2 * g + 1] = v[pair >> 2];
    byte |= (kT.bm_keep[code] & 0xFu) << (4 * (g & 1));
    if ((g & 1) || g + 1 == groups) {
      br[g / 2] = static_cast<uint8_t>(byte);
      byte = 0;
    }
  }
}

GP_INLINE void put_keep(uint8_t* br, int64_t k, uint32_t code) {
  br[2 * k] = kT.bm_keep[code & 0xFFu];
  br[2 * k + 1] = kT.bm_keep[code >> 8];
}

template <typename Raw, bool kScored>
void bitmask_rows(const Raw* w, const float* s, Raw* values, uint8_t* bitmask, int64_t cols, int64_t r0, int64_t r1,
                  uint32_t& bad_io, uint32_t& amax_io) {
  uint32_t bad = 0, amax = 0;
  const int64_t nbytes = (cols + 7) / 8, blocks = sizeof(Raw) == 2 ? cols / 16 : 0;
  for (int64_t r = r0; r < r1; ++r) {
    const Raw* wr = w + r * cols;
    const float* sr = kScored ? s + r * cols : nullptr;
    Raw* vr = values + r * (cols / 2);
    uint8_t* br = bitmask + r * nbytes;
    if constexpr (sizeof(Raw) == 2) {
      for (int64_t k = 0; k < blocks; ++k) {
        uint64_t x[4];
        const uint32_t code = block16<kScored>(wr + 16 * k, kScored ? sr + 16 * k : nullptr, x, amax);
        gather16(x, two(kT.bm_pair, code), vr + 8 * k);
        put_keep(br, k, code);
        bad |= either(kT.bad, code);
      }
    }
    bitmask_groups<Raw, kScored>(wr, sr, vr, br, 4 * blocks, cols / 4, bad, amax);
  }
  bad_io |= bad;
  amax_io = std::max(amax_io, amax);
}

#if GP_X86_AVX2
template <bool kScored>
GP_TARGET_AVX2 void bitmask16_rows_avx2(const uint16_t* w, const float* s, uint16_t* values, uint8_t* bitmask,
                                        int64_t cols, int64_t r0, int64_t r1, uint32_t& bad_io, uint32_t& amax_io) {
  uint32_t bad = 0, amax = 0;
  const int64_t nbytes = (cols + 7) / 8;
  __m256i vmax = _mm256_setzero_si256();
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* wr = w + r * cols;
    const float* sr = kScored ? s + r * cols : nullptr;
    uint8_t* br = bitmask + r * nbytes;
    for (int64_t k = 0; k < cols / 16; ++k) {
      __m256i x;
      const uint32_t code = block16_avx2<kScored>(wr + 16 * k, kScored ? sr + 16 * k : nullptr, x, vmax);
      gather16_avx2(x, kT.bm_ctrl[code & 0xFFu], kT.bm_ctrl[code >> 8], values + r * (cols / 2) + 8 * k);
      put_keep(br, k, code);
      bad |= either(kT.bad, code);
    }
    bitmask_groups<uint16_t, kScored>(wr, sr, values + r * (cols / 2), br, 4 * (cols / 16), cols / 4, bad, amax);
  }
  if (kScored && over_limit(vmax)) amax = std::max(amax, kFiniteLimit);
  bad_io |= bad;
  amax_io = std::max(amax_io, amax);
}
#endif

template <typename Raw, bool kScored>
PassResult run_bitmask(const PackIn& in, Raw* values, uint8_t* bitmask) {
  const Raw* w = reinterpret_cast<const Raw*>(in.w.const_data_ptr());
  const float* s = in.sp();
  auto fn = &bitmask_rows<Raw, kScored>;
#if GP_X86_AVX2
  if constexpr (sizeof(Raw) == 2) {
    if (avx2_enabled()) fn = &bitmask16_rows_avx2<kScored>;
  }
#endif
  return for_row_blocks(in.rows, in.cols * static_cast<int64_t>(sizeof(Raw)),
                        [&](int64_t r0, int64_t r1, uint32_t& bad, uint32_t& amax) {
                          fn(w, s, values, bitmask, in.cols, r0, r1, bad, amax);
                        });
}

template <typename Raw>
PassResult run_bitmask_any(const PackIn& in, at::Tensor& values, at::Tensor& bitmask) {
  Raw* vp = reinterpret_cast<Raw*>(values.data_ptr());
  uint8_t* bp = bitmask.data_ptr<uint8_t>();
  return in.s.defined() ? run_bitmask<Raw, true>(in, vp, bp) : run_bitmask<Raw, false>(in, vp, bp);
}

std::tuple<at::Tensor, at::Tensor> pack_24_bitmask(const at::Tensor& weight, const std::optional<at::Tensor>& scores) {
  GP_CHECK_CPU(weight);
  const PackIn in = prepare_pack(weight, scores, "bitmask", false);
  at::Tensor values = empty_huge({in.rows, in.cols / 2}, in.w.options());
  at::Tensor bitmask = empty_huge({in.rows, (in.cols + 7) / 8}, in.w.options().dtype(at::kByte));
  const PassResult res = in.w.scalar_type() == at::kFloat ? run_bitmask_any<uint32_t>(in, values, bitmask)
                                                          : run_bitmask_any<uint16_t>(in, values, bitmask);
  raise_pack_errors(res, in.w, 4, "bitmask");
  return {values, bitmask};
}

GP_INLINE uint32_t keep_bits(const uint8_t* br, int64_t g) { return (static_cast<uint32_t>(br[g / 2]) >> (4 * (g % 2))) & 0xFu; }

// Groups g0..groups-1 of one row, one at a time (any element width).
template <typename Raw>
GP_INLINE void unpack_bitmask_groups(const Raw* vr, const uint8_t* br, Raw* dr, int64_t g0, int64_t groups,
                                     uint32_t& bad) {
  for (int64_t g = g0; g < groups; ++g) {
    const uint32_t bits = keep_bits(br, g), pair = kT.bm_pair[bits] & 0xFu;
    const Raw ok = static_cast<Raw>(0) - static_cast<Raw>((kTwoBits >> bits) & 1u);
    bad |= ((kTwoBits >> bits) & 1u) ^ 1u;
    Raw out[4] = {0, 0, 0, 0};
    out[pair & 3u] = vr[2 * g] & ok;
    out[pair >> 2] = vr[2 * g + 1] & ok;
    std::memcpy(dr + 4 * g, out, sizeof(out));
  }
}

template <typename Raw>
void unpack_bitmask_rows(const Raw* values, const uint8_t* bitmask, Raw* dense, int64_t cols, int64_t r0, int64_t r1,
                         uint32_t& bad_io) {
  uint32_t bad = 0;
  const int64_t nbytes = (cols + 7) / 8, blocks = sizeof(Raw) == 2 ? cols / 16 : 0;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* br = bitmask + r * nbytes;
    if constexpr (sizeof(Raw) == 2) {
      for (int64_t k = 0; k < blocks; ++k) {
        const uint32_t b16 = br[2 * k] | static_cast<uint32_t>(br[2 * k + 1]) << 8;
        bad |= either(kT.bm_invalid, b16);
        scatter16(values + r * (cols / 2) + 8 * k, two(kT.bm_pair, b16), dense + r * cols + 16 * k);
      }
    }
    unpack_bitmask_groups<Raw>(values + r * (cols / 2), br, dense + r * cols, 4 * blocks, cols / 4, bad);
  }
  bad_io |= bad;
}

#if GP_X86_AVX2
GP_TARGET_AVX2 void unpack_bitmask16_rows_avx2(const uint16_t* values, const uint8_t* bitmask, uint16_t* dense,
                                               int64_t cols, int64_t r0, int64_t r1, uint32_t& bad_io) {
  uint32_t bad = 0;
  const int64_t nbytes = (cols + 7) / 8;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* br = bitmask + r * nbytes;
    for (int64_t k = 0; k < cols / 16; ++k) {
      bad |= kT.bm_invalid[br[2 * k]] | kT.bm_invalid[br[2 * k + 1]];
      scatter16_avx2(values + r * (cols / 2) + 8 * k, kT.bm_unpack_ctrl[br[2 * k]], kT.bm_unpack_ctrl[br[2 * k + 1]],
                     dense + r * cols + 16 * k);
    }
    unpack_bitmask_groups<uint16_t>(values + r * (cols / 2), br, dense + r * cols, 4 * (cols / 16), cols / 4, bad);
  }
  bad_io |= bad;
}
#endif

// The first group (row-major) whose bitmask nibble does not have exactly 2 bits; kNoBad if none.
int64_t first_bad_bitmask(const uint8_t* bitmask, int64_t rows, int64_t cols) {
  const int64_t groups = cols / 4, nbytes = (cols + 7) / 8;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g)
      if (popcount4(keep_bits(bitmask + r * nbytes, g)) != 2) return r * groups + g;
  return kNoBad;
}

template <typename Raw>
PassResult run_unpack_bitmask(const at::Tensor& values, const at::Tensor& bitmask, at::Tensor& dense, int64_t cols) {
  const Raw* vp = reinterpret_cast<const Raw*>(values.const_data_ptr());
  Raw* dp = reinterpret_cast<Raw*>(dense.data_ptr());
  const uint8_t* bp = bitmask.const_data_ptr<uint8_t>();
  auto fn = &unpack_bitmask_rows<Raw>;
#if GP_X86_AVX2
  if constexpr (sizeof(Raw) == 2) {
    if (avx2_enabled()) fn = &unpack_bitmask16_rows_avx2;
  }
#endif
  return for_row_blocks(values.size(0), cols * static_cast<int64_t>(sizeof(Raw)),
                        [&](int64_t r0, int64_t r1, uint32_t& bad, uint32_t&) { fn(vp, bp, dp, cols, r0, r1, bad); });
}

at::Tensor unpack_24_bitmask(const at::Tensor& values_in, const at::Tensor& bitmask_in, int64_t cols) {
  GP_CHECK_CPU(values_in);
  check_bitmask_args(values_in, bitmask_in, cols);
  const at::Tensor values = values_in.contiguous(), bitmask = bitmask_in.contiguous();
  const int64_t rows = values.size(0);
  at::Tensor dense = empty_huge({rows, cols}, values.options());
  const PassResult res = values.scalar_type() == at::kFloat ? run_unpack_bitmask<uint32_t>(values, bitmask, dense, cols)
                                                            : run_unpack_bitmask<uint16_t>(values, bitmask, dense, cols);
  if (res.bad != 0) raise_bad_bitmask(bitmask, first_bad_bitmask(bitmask.const_data_ptr<uint8_t>(), rows, cols), cols / 4);
  return dense;
}

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

