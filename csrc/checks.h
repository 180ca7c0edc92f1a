// Argument checks with messages a user can act on. Every op validates before it writes anything.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#define GP_CHECK_CPU(x) TORCH_CHECK_VALUE((x).device().is_cpu(), #x " must be a CPU tensor (got ", (x).device(), "); the C++ backend implements CPU only")
#define GP_CHECK_CONTIGUOUS(x) TORCH_CHECK_VALUE((x).is_contiguous(), #x " must be contiguous; call .contiguous() first")
#define GP_CHECK_WEIGHT_DTYPE(x)                                                                          \
  TORCH_CHECK_TYPE((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kBFloat16 ||              \
                       (x).scalar_type() == at::kHalf,                                                    \
                   #x " must be float32, bfloat16 or float16, got ", (x).scalar_type())
#define GP_CHECK_DIM(x, d) TORCH_CHECK_VALUE((x).dim() == (d), #x " must be ", d, "-D, got shape ", (x).sizes())
