// 2:4 packing: layout arithmetic shared by the CPU ops (pack_24.cpp, pack_24_args.h) and the CUDA kernels
// (pack_24.cu, host wrappers in pack_24_cuda.cpp), and the plain launcher functions pack_24.cu exports.
// No torch headers: pack_24.cu compiles standalone.
//
// Layouts (see gradprobe/ops/_schemas.py): a group is 4 consecutive elements of a row (a pair for the
// fp32 CUTLASS layout). Elements are handled as raw bits (uint16 for fp16/bf16, uint32 for fp32):
// "nonzero" = any bit but the sign set, i.e. exactly `w != 0` (-0.0 is zero, NaN is nonzero).
#pragma once
#include <cstddef>
#include <cstdint>
#ifdef __CUDACC__
#define GP_HD __host__ __device__ __forceinline__
#else
#define GP_HD inline
#endif

namespace gradprobe {
namespace pack24 {

constexpr int64_t kNoBad = INT64_MAX;  // "no bad group" sentinel of the first-bad-group index

// CUTLASS metadata nibble (idx0 | idx1 << 2) of a group of 4 with nonzero pattern `code` (bit i =
// element i nonzero), nibble `code` of this word. Taken from the boolean expressions of torch's
// sparse_semi_structured_from_dense_cutlass (only codes with <= 2 bits set are ever used).
constexpr uint64_t kCutlassNibbles = 0x4dce4dce498e498eull;
// fp32 CUTLASS pairs are encoded as 4 half-words: first element kept -> (0, 1), else -> (2, 3).
constexpr uint32_t kNibbleFirst = 4, kNibbleSecond = 14;
// sparse-24-bitmask kept positions of a group with nonzero pattern `code`: the nonzeros padded with
// the lowest-index zeros (nibble `code`; 0 for codes with 3-4 bits set, which are rejected).
constexpr uint64_t kBitmaskKeep = 0x000c0a9906553333ull;

GP_HD uint32_t cutlass_nibble(uint32_t code) { return static_cast<uint32_t>(kCutlassNibbles >> (4 * code)) & 0xFu; }
GP_HD uint32_t bitmask_keep(uint32_t code) { return static_cast<uint32_t>(kBitmaskKeep >> (4 * code)) & 0xFu; }
GP_HD int popcount4(uint32_t x) { return static_cast<int>((x & 1u) + ((x >> 1) & 1u) + ((x >> 2) & 1u) + ((x >> 3) & 1u)); }
// a valid 16-bit metadata nibble has idx0 < idx1
GP_HD bool valid_nibble16(uint32_t nib) { return (nib & 3u) < (nib >> 2); }
GP_HD bool valid_nibble32(uint32_t nib) { return nib == kNibbleFirst || nib == kNibbleSecond; }

// Flat position, in the reordered (rows, meta_cols) int16 metadata, of meta[r][c]: CUTLASS
// ColumnMajorInterleaved<2> with the 2x2 swizzle (torch's _calculate_meta_reordering_scatter_offsets
// for 16-bit metadata). Requires rows % 32 == 0 and meta_cols even.
GP_HD int64_t meta_offset(int64_t r, int64_t c, int64_t rows) {
  int64_t dr = r / 32 * 32 + (r % 8) * 4 + (r % 32) / 8;
  int64_t dc = c;
  const int64_t swap = ((dr % 2 == 0) && (dc % 2 == 1)) ? 1 : (((dr % 2 == 1) && (dc % 2 == 0)) ? -1 : 0);
  dr += swap;
  dc -= swap;
  return (dc / 2) * rows * 2 + dr * 2 + dc % 2;
}

// meta_offset(r, c, rows) == (c / 2) * 2 * rows + (c % 2 ? odd : even) for the row's (even, odd) pair.
struct MetaRow {
  int64_t even, odd;
  GP_HD int64_t at(int64_t c, int64_t rows) const { return (c >> 1) * 2 * rows + ((c & 1) ? odd : even); }
};
GP_HD MetaRow meta_row(int64_t r, int64_t rows) { return {meta_offset(r, 0, rows), meta_offset(r, 1, rows)}; }

// Prune mask (bit i = pruned) of the 2 smallest of 4 fp32 scores; ties: lower index pruned first.
GP_HD uint32_t prune2of4(const float* s) {
  uint32_t mask = 0;
  for (int i = 0; i < 4; ++i) {
    int rank = 0;
    for (int j = 0; j < 4; ++j) rank += (s[j] < s[i]) || (s[j] == s[i] && j < i);
    mask |= static_cast<uint32_t>(rank < 2) << i;
  }
  return mask;
}

// Loads group w[0..3] as raw bits into v, zeroing the 2 smallest-score elements if scored; returns the
// nonzero pattern (bit i = v[i] nonzero).
template <typename Raw>
GP_HD uint32_t load_group(const Raw* w, const float* s, Raw* v) {
  constexpr Raw kMag = static_cast<Raw>(~(Raw(1) << (8 * sizeof(Raw) - 1)));
  for (int i = 0; i < 4; ++i) v[i] = w[i];
  if (s != nullptr) {
    float sc[4];
    for (int i = 0; i < 4; ++i) sc[i] = s[i];
    const uint32_t pruned = prune2of4(sc);
    for (int i = 0; i < 4; ++i)
      if ((pruned >> i) & 1u) v[i] = 0;
  }
  uint32_t code = 0;
  for (int i = 0; i < 4; ++i) code |= static_cast<uint32_t>((v[i] & kMag) != 0) << i;
  return code;
}

}  // namespace pack24

// ---- CUDA launchers (pack_24.cu), callable from host code without CUDA headers ---------------------
// All pointers are device pointers to contiguous row-major data; `stream` is a cudaStream_t. elem_bytes
// is 2 (fp16/bf16) or 4 (fp32). `first_bad` (device, one int64 initialised to kNoBad) receives the
// minimum flat index (row * groups_per_row + group) of a group that violates the layout: too many
// nonzeros (pack) or an invalid metadata/bitmask entry (unpack). `scores` may be null (no pruning).
// Each returns 0 or a cudaError_t code.
namespace cuda {
int pack_24_cutlass(const void* weight, const float* scores, void* packed, int16_t* meta, int64_t rows, int64_t cols,
                    int elem_bytes, int64_t* first_bad, void* stream);
int unpack_24_cutlass(const void* packed, const int16_t* meta, void* dense, int64_t rows, int64_t cols, int elem_bytes,
                      int64_t* first_bad, void* stream);
int pack_24_bitmask(const void* weight, const float* scores, void* values, uint8_t* bitmask, int64_t rows, int64_t cols,
                    int elem_bytes, int64_t* first_bad, void* stream);
int unpack_24_bitmask(const void* values, const uint8_t* bitmask, void* dense, int64_t rows, int64_t cols,
                      int elem_bytes, int64_t* first_bad, void* stream);
}  // namespace cuda
}  // namespace gradprobe
