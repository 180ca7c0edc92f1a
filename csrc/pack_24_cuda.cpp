// 2:4 packer, CUDA tensors: host wrappers registering gradprobe_cpp::pack_24_cutlass, unpack_24_cutlass,
// pack_24_bitmask and unpack_24_bitmask for CUDA, over the kernels of pack_24.cu (launchers declared in
// pack_24.h). Arguments are checked as on CPU (pack_24_args.h). Compiled only with GRADPROBE_WITH_CUDA
// (setup.py defines it when it builds the CUDA sources); the schemas are defined by pack_24.cpp.
#ifdef GRADPROBE_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "pack_24.h"
#include "pack_24_args.h"

namespace gradprobe {
namespace {

using namespace pack24;

int64_t read_bad(const at::Tensor& flag) { return flag.item<int64_t>(); }

void check_launch(int err) { TORCH_CHECK(err == 0, "gradprobe 2:4 CUDA kernel launch failed (cudaError ", err, ")"); }

std::tuple<at::Tensor, at::Tensor> pack_24_cutlass_cuda(const at::Tensor& weight, const std::optional<at::Tensor>& scores) {
  c10::cuda::CUDAGuard guard(weight.device());
  const PackIn in = prepare_pack(weight, scores, "cutlass", true);
  const at::Tensor& w = in.w;
  const int64_t rows = in.rows, cols = in.cols;
  const bool f32 = w.scalar_type() == at::kFloat;
  at::Tensor packed = at::empty({rows, cols / 2}, w.options());
  at::Tensor meta = at::empty({rows, cols / (f32 ? 8 : 16)}, w.options().dtype(at::kShort));
  at::Tensor flag = at::full({1}, kNoBad, w.options().dtype(at::kLong));
  check_launch(cuda::pack_24_cutlass(w.const_data_ptr(), in.sp(), packed.data_ptr(),
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
  c10::cuda::CUDAGuard guard(weight.device());
  const PackIn in = prepare_pack(weight, scores, "bitmask", true);
  const at::Tensor& w = in.w;
  const int64_t rows = in.rows, cols = in.cols;
  at::Tensor values = at::empty({rows, cols / 2}, w.options());
  at::Tensor bitmask = at::empty({rows, (cols + 7) / 8}, w.options().dtype(at::kByte));
  at::Tensor flag = at::full({1}, kNoBad, w.options().dtype(at::kLong));
  check_launch(cuda::pack_24_bitmask(w.const_data_ptr(), in.sp(), values.data_ptr(),
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

}  // namespace
}  // namespace gradprobe

TORCH_LIBRARY_IMPL(gradprobe_cpp, CUDA, m) {
  m.impl("pack_24_cutlass", &gradprobe::pack_24_cutlass_cuda);
  m.impl("unpack_24_cutlass", &gradprobe::unpack_24_cutlass_cuda);
  m.impl("pack_24_bitmask", &gradprobe::pack_24_bitmask_cuda);
  m.impl("unpack_24_bitmask", &gradprobe::unpack_24_bitmask_cuda);
}
#endif  // GRADPROBE_WITH_CUDA
