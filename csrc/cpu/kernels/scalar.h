// The element types of the kernels' tensors, named without torch: the glue maps at::ScalarType to one
// (scalar_of in csrc/cpu/common.h) and each kernel switches on it into its template instantiations.
#pragma once

namespace fusedformer {
namespace cpu {

enum class Scalar : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

}  // namespace cpu
}  // namespace fusedformer
