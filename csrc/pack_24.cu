// 2:4 packer, CUDA kernels behind the plain launchers declared in pack_24.h (no torch headers: the
// host side lives in pack_24_cuda.cpp under GRADPROBE_WITH_CUDA). Same layouts and tables as the CPU ops;
// one thread per int16 of CUTLASS metadata (16 or 8 dense columns) or per bitmask byte / group.
#include <cuda_runtime.h>

#include <cstdint>

#include "pack_24.h"

namespace gradprobe {
namespace {

using namespace pack24;

constexpr int kThreads = 256;

__device__ __forceinline__ void record_bad(int64_t* first_bad, int64_t g) {
  atomicMin(reinterpret_cast<unsigned long long*>(first_bad), static_cast<unsigned long long>(g));
}

// Thread's cell (r, c) of the rows x per_row grid of work items; false past the end.
__device__ __forceinline__ bool cell(int64_t rows, int64_t per_row, int64_t& r, int64_t& c) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= rows * per_row) return false;
  r = t / per_row;
  c = t % per_row;
  return true;
}

// fp16/bf16: groups of 4 (scores optional); fp32: pairs, at most one nonzero (no scores).
template <typename Raw>
__global__ void pack_cutlass_kernel(const Raw* __restrict__ w, const float* __restrict__ s, Raw* __restrict__ packed,
                                    uint16_t* __restrict__ meta, int64_t rows, int64_t cols, int64_t* first_bad) {
  constexpr int64_t kPer = sizeof(Raw) == 2 ? 16 : 8;  // dense elements per metadata word
  constexpr int64_t kGroup = kPer / 4;                 // elements per group: 4, or a pair for fp32
  int64_t r, c;
  if (!cell(rows, cols / kPer, r, c)) return;
  uint32_t m = 0;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int64_t e = r * cols + kPer * c + kGroup * q;
    uint32_t nib;
    if constexpr (sizeof(Raw) == 2) {
      Raw v[4];
      const uint32_t code = load_group(w + e, s != nullptr ? s + e : nullptr, v);
      if (popcount4(code) > 2) record_bad(first_bad, e / kGroup);
      nib = cutlass_nibble(code);
      packed[e / 2] = v[nib & 3u];
      packed[e / 2 + 1] = v[nib >> 2];
    } else {
      const uint32_t a = w[e], b = w[e + 1];
      const bool nza = (a & 0x7FFFFFFFu) != 0, nzb = (b & 0x7FFFFFFFu) != 0;
      if (nza && nzb) record_bad(first_bad, e / kGroup);
      packed[e / 2] = nza ? a : b;
      nib = nza ? kNibbleFirst : kNibbleSecond;
    }
    m |= nib << (4 * q);
  }
  meta[meta_offset(r, c, rows)] = static_cast<uint16_t>(m);
}

template <typename Raw>
__global__ void unpack_cutlass_kernel(const Raw* __restrict__ packed, const uint16_t* __restrict__ meta,
                                      Raw* __restrict__ dense, int64_t rows, int64_t cols, int64_t* first_bad) {
  constexpr int64_t kPer = sizeof(Raw) == 2 ? 16 : 8;  // dense elements per metadata word
  constexpr int64_t kGroup = kPer / 4;                 // elements per group: 4, or a pair for fp32
  int64_t r, c;
  if (!cell(rows, cols / kPer, r, c)) return;
  const uint32_t m = meta[meta_offset(r, c, rows)];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int64_t e = r * cols + kPer * c + kGroup * q;
    const uint32_t nib = (m >> (4 * q)) & 0xFu;
    const Raw* p = packed + e / 2;
    if constexpr (sizeof(Raw) == 2) {
      uint16_t out[4] = {0, 0, 0, 0};
      if (!valid_nibble16(nib)) {
        record_bad(first_bad, e / kGroup);
      } else {
        out[nib & 3u] = p[0];
        out[nib >> 2] = p[1];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) dense[e + i] = out[i];
    } else {
      if (!valid_nibble32(nib)) record_bad(first_bad, e / kGroup);
      const bool first = nib == kNibbleFirst;
      dense[e] = first ? p[0] : 0u;
      dense[e + 1] = first ? 0u : p[0];
    }
  }
}

template <typename Raw>
__global__ void pack_bitmask_kernel(const Raw* __restrict__ w, const float* __restrict__ s, Raw* __restrict__ values,
                                    uint8_t* __restrict__ bitmask, int64_t rows, int64_t cols, int64_t* first_bad) {
  const int64_t groups = cols / 4, nbytes = (cols + 7) / 8;
  int64_t r, b;
  if (!cell(rows, nbytes, r, b)) return;
  uint32_t byte = 0;
  for (int64_t g = 2 * b; g < 2 * b + 2 && g < groups; ++g) {
    Raw v[4];
    const uint32_t code = load_group(w + r * cols + 4 * g, s != nullptr ? s + r * cols + 4 * g : nullptr, v);
    uint32_t keep = bitmask_keep(code);
    if (keep == 0) {
      record_bad(first_bad, r * groups + g);
      keep = 3;
    }
    values[r * (cols / 2) + 2 * g] = v[__ffs(keep) - 1];
    values[r * (cols / 2) + 2 * g + 1] = v[31 - __clz(keep)];
    byte |= keep << (4 * (g - 2 * b));
  }
  bitmask[r * nbytes + b] = static_cast<uint8_t>(byte);
}

template <typename Raw>
__global__ void unpack_bitmask_kernel(const Raw* __restrict__ values, const uint8_t* __restrict__ bitmask,
                                      Raw* __restrict__ dense, int64_t rows, int64_t cols, int64_t* first_bad) {
  const int64_t groups = cols / 4, nbytes = (cols + 7) / 8;
  int64_t r, g;
  if (!cell(rows, groups, r, g)) return;
  const uint32_t bits = (static_cast<uint32_t>(bitmask[r * nbytes + g / 2]) >> (4 * (g % 2))) & 0xFu;
  Raw out[4] = {0, 0, 0, 0};
  if (popcount4(bits) != 2) {
    record_bad(first_bad, r * groups + g);
  } else {
    out[__ffs(bits) - 1] = values[r * (cols / 2) + 2 * g];
    out[31 - __clz(bits)] = values[r * (cols / 2) + 2 * g + 1];
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) dense[r * cols + 4 * g + i] = out[i];
}

inline unsigned blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

namespace cuda {

int pack_24_cutlass(const void* weight, const float* scores, void* packed, int16_t* meta, int64_t rows, int64_t cols,
                    int elem_bytes, int64_t* first_bad, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  uint16_t* mp = reinterpret_cast<uint16_t*>(meta);
  if (rows * cols == 0) return 0;
  if (elem_bytes == 4) {
    pack_cutlass_kernel<uint32_t><<<blocks(rows * (cols / 8)), kThreads, 0, st>>>(
        static_cast<const uint32_t*>(weight), nullptr, static_cast<uint32_t*>(packed), mp, rows, cols, first_bad);
  } else {
    pack_cutlass_kernel<uint16_t><<<blocks(rows * (cols / 16)), kThreads, 0, st>>>(
        static_cast<const uint16_t*>(weight), scores, static_cast<uint16_t*>(packed), mp, rows, cols, first_bad);
  }
  return static_cast<int>(cudaGetLastError());
}

int unpack_24_cutlass(const void* packed, const int16_t* meta, void* dense, int64_t rows, int64_t cols, int elem_bytes,
                      int64_t* first_bad, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(meta);
  if (rows * cols == 0) return 0;
  if (elem_bytes == 4) {
    unpack_cutlass_kernel<uint32_t><<<blocks(rows * (cols / 8)), kThreads, 0, st>>>(
        static_cast<const uint32_t*>(packed), mp, static_cast<uint32_t*>(dense), rows, cols, first_bad);
  } else {
    unpack_cutlass_kernel<uint16_t><<<blocks(rows * (cols / 16)), kThreads, 0, st>>>(
        static_cast<const uint16_t*>(packed), mp, static_cast<uint16_t*>(dense), rows, cols, first_bad);
  }
  return static_cast<int>(cudaGetLastError());
}

int pack_24_bitmask(const void* weight, const float* scores, void* values, uint8_t* bitmask, int64_t rows, int64_t cols,
                    int elem_bytes, int64_t* first_bad, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t n = rows * ((cols + 7) / 8);
  if (n == 0) return 0;
  if (elem_bytes == 4) {
    pack_bitmask_kernel<uint32_t><<<blocks(n), kThreads, 0, st>>>(static_cast<const uint32_t*>(weight), scores,
                                                                 static_cast<uint32_t*>(values), bitmask, rows, cols,
                                                                 first_bad);
  } else {
    pack_bitmask_kernel<uint16_t><<<blocks(n), kThreads, 0, st>>>(static_cast<const uint16_t*>(weight), scores,
                                                                 static_cast<uint16_t*>(values), bitmask, rows, cols,
                                                                 first_bad);
  }
  return static_cast<int>(cudaGetLastError());
}

int unpack_24_bitmask(const void* values, const uint8_t* bitmask, void* dense, int64_t rows, int64_t cols,
                      int elem_bytes, int64_t* first_bad, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t n = rows * (cols / 4);
  if (n == 0) return 0;
  if (elem_bytes == 4) {
    unpack_bitmask_kernel<uint32_t><<<blocks(n), kThreads, 0, st>>>(static_cast<const uint32_t*>(values), bitmask,
                                                                   static_cast<uint32_t*>(dense), rows, cols, first_bad);
  } else {
    unpack_bitmask_kernel<uint16_t><<<blocks(n), kThreads, 0, st>>>(static_cast<const uint16_t*>(values), bitmask,
                                                                   static_cast<uint16_t*>(dense), rows, cols, first_bad);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace gradprobe
