// Host emulation of the CUDA execution model for csrc/emu/build.py: one block at a time, 128
// std::threads per block, std::barrier for __syncthreads/__syncwarp, shuffles through a per-warp slot
// (and the operands of mma_16816 and ldsm_x4 through per-warp slots, emu/mma.cuh).
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
struct EmuCtx {
  std::barrier<>* block;
  std::barrier<>* warp[4];
  float xch[4][32];
  float mma_a[4][16][16], mma_b[4][16][8], mma_c[4][16][8];  // per warp: one mma_16816's operands
  const void* ldsm_rows[4][32];                               // per warp: one ldsm_x4's row addresses
};
extern thread_local uint3 emu_tid_;
extern thread_local uint3 emu_bid_;
extern EmuCtx* emu_ctx_;
#undef __global__
#define __global__
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__
#define threadIdx emu_tid_
#define blockIdx emu_bid_
inline int emu_lane() { return threadIdx.x % 32; }
inline void __syncthreads() { emu_ctx_->block->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_ctx_->warp[threadIdx.x / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int m) {
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  emu_ctx_->xch[w][l] = v;
  __syncwarp();
  float r = emu_ctx_->xch[w][l ^ m];
  __syncwarp();
  return r;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline float emu_to_float(__half x) { return __half2float(x); }
inline float emu_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
using std::min;
using std::max;
