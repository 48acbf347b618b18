// The attention kernels' product engines (kernels/matmul.h) as the glue provides them: oneDNN's
// batch-reduce GEMM through torch's at::native::cpublas, or the kernels' own micro-kernel.
#pragma once

#include <string>

#include "cpu/kernels/matmul.h"

namespace fusedformer {
namespace cpu {

enum class EngineKind : int {
  kNative = 0,     // the kernels' micro-kernel, in float32 (half types converted tile by tile) or float64
  kBrgemmF32 = 1,  // oneDNN brgemm in float32 (half types converted tile by tile)
  kBrgemm = 2,     // oneDNN brgemm in the tensors' own dtype: bf16/fp16 on VNNI-packed tiles (AMX, AVX512-BF16/FP16)
};

// The engine of that kind for tensors of `dtype`, or nullptr where there is none here (float64 has
// only the native one; kBrgemm needs bf16/fp16 and a CPU where oneDNN's brgemm takes them: AMX, or
// AVX512-BF16/AVX512-FP16 with the pairs packed by us). Engines
// are static: the pointers stay valid.
const MatmulEngine* matmul_engine(Scalar dtype, EngineKind kind);

const char* engine_kind_name(EngineKind kind);

}  // namespace cpu
}  // namespace fusedformer
