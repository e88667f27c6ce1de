// CPU definitions of ptv2::mma_16816 and ptv2::ldsm_x4 (csrc/mma.cuh) for the kernel emulator. They
// share that file's include guard and emu_launch.h includes this file first, so the kernels' own
// `#include "mma.cuh"` adds nothing. For mma the 32 lanes scatter their fragments into the warp's full
// A (16x16), B (16x8) and C (16x8) by the PTX ISA's layout formulas, meet at a barrier, and each lane
// computes its own D entries from the full matrices (fp32 accumulate from the 16-bit inputs), so a
// kernel that builds or reads a fragment against the documented layout gets a wrong product here too.
#ifndef PTV2_MMA_CUH_
#define PTV2_MMA_CUH_

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "emu_shim.h"

namespace ptv2 {

template <typename T> inline float emu_mma_elem(uint32_t reg, int high) {
  const uint16_t bits = (uint16_t)(high ? reg >> 16 : reg & 0xFFFFu);  // lower-indexed element: low half
  T x;
  std::memcpy(&x, &bits, 2);
  return emu_to_float(x);
}

template <typename T> inline void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane >> 2, tig = lane % 4;  // groupID, threadID_in_group
  auto& A = emu_ctx_->mma_a[w];
  auto& B = emu_ctx_->mma_b[w];
  auto& C = emu_ctx_->mma_c[w];
  // a0..a7, two per register, low half first: row groupID for a0, a1, a4, a5, else groupID + 8;
  // col threadID_in_group * 2 + (i & 1), plus 8 for i >= 4.
  for (int i = 0; i < 8; ++i) {
    const int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
    const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
    A[row][col] = emu_mma_elem<T>(a[i / 2], i & 1);
  }
  // b0..b3: row threadID_in_group * 2 + (i & 1), plus 8 for i >= 2; col groupID.
  for (int i = 0; i < 4; ++i) B[tig * 2 + (i & 1) + (i >= 2 ? 8 : 0)][group] = emu_mma_elem<T>(b[i / 2], i & 1);
  // c0..c3 (and d0..d3): row groupID for i < 2, else groupID + 8; col threadID_in_group * 2 + (i & 1).
  for (int i = 0; i < 4; ++i) C[i < 2 ? group : group + 8][tig * 2 + (i & 1)] = c[i];
  __syncwarp();
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = i < 2 ? group : group + 8, col = tig * 2 + (i & 1);
    float s = C[row][col];
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    out[i] = s;
  }
  __syncwarp();  // no lane scatters the next product before every lane has read this one
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// ldmatrix .x4: the lanes publish their row addresses, then each lane gathers its two elements of
// each of the four 8x8 matrices by the documented layout (transposed or not). A row address that
// is not 16-byte aligned or not in shared memory is an error on hardware, so it aborts here.
template <bool Trans> inline void ldsm_x4(uint32_t r[4], const void* row) {
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane >> 2, tig = lane % 4;
  const auto* at = static_cast<const unsigned char*>(row);
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0 || at < smem || at + 16 > smem + sizeof(smem)) {
    std::fprintf(stderr, "emulator: ldmatrix row address %p is misaligned or outside shared memory\n", row);
    std::abort();
  }
  auto& rows = emu_ctx_->ldsm_rows[w];
  rows[lane] = row;
  __syncwarp();
  for (int m = 0; m < 4; ++m) {
    uint16_t e[2];
    for (int i = 0; i < 2; ++i) {
      // not transposed: element (groupID, 2 threadID_in_group + i); transposed: (2 threadID_in_group + i, groupID)
      const int rr = Trans ? tig * 2 + i : group, cc = Trans ? group : tig * 2 + i;
      std::memcpy(&e[i], static_cast<const unsigned char*>(rows[8 * m + rr]) + 2 * cc, 2);
    }
    r[m] = (uint32_t)e[0] | ((uint32_t)e[1] << 16);
  }
  __syncwarp();  // no lane publishes the next addresses before every lane has read these
}

}  // namespace ptv2

#endif  // PTV2_MMA_CUH_
