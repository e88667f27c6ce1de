// Warp-level tensor-core product D = A B + C of shape m16n8k16 (16-bit inputs, fp32 accumulate) and the
// shared-memory loads that fill its operands, on registers laid out as the PTX ISA documents for mma.sync.aligned.m16n8k16.row.col (section "Matrix
// Fragments for mma.m16n8k16"), with g = lane >> 2 and t = lane % 4:
//   a[4] (A 16x16, row-major): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..2t+1],
//                              a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..2t+9]
//   b[2] (B 16x8, "col"):      b[0] = B[2t..2t+1][g],  b[1] = B[2t+8..2t+9][g]
//   c[4], d[4] (16x8 fp32):    c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]
// Each 32-bit register holds two 16-bit elements, the lower-indexed one in the low half.
//
// The kernel emulator (csrc/emu/build.py) defines the same functions in csrc/emu/mma.cuh, which it
// includes first; the shared include guard then turns this file into a no-op there, so the emulator
// gathers the fragments of the 32 lanes and checks these layouts for real instead of assuming them.
#ifndef PTV2_MMA_CUH_
#define PTV2_MMA_CUH_

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ptv2 {

// Every lane of the warp must call it together (mma.sync), with d and c allowed to be the same array.
template <typename T>
__device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "fp16 or bf16");
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 (PTX ISA "ldmatrix"): lanes 8m..8m+7 pass the
// addresses of rows 0..7 of 8x8 matrix m (8 contiguous 16-bit elements, 16-byte aligned); r[m] gets,
// in lane (g, t), elements (g, 2t) and (g, 2t+1) of matrix m, or with Trans (2t, g) and (2t+1, g),
// the first in the low half. One instruction fills four fragment registers, and Trans reads a B
// operand whose pairs run across rows (V in O += P V) without 16-bit loads.
template <bool Trans> __device__ __forceinline__ void ldsm_x4(uint32_t r[4], const void* row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
}

}  // namespace ptv2

#endif  // PTV2_MMA_CUH_
