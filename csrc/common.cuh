// Device helpers shared by the forward and backward kernels: the dropout hash, dtype conversions,
// tile loads from strided global memory into padded shared memory, and launch error checks.
#pragma once

#include <cstdint>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "prefix_attention.h"

namespace ptv2 {

constexpr int kThreads = 128;  // 4 warps per block in every kernel
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- counter-based dropout (ptv2_kernels/dropout.py, bit-exact, uint32 wrap-around arithmetic) ----
__device__ __forceinline__ uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}
__device__ __forceinline__ uint32_t row_hash(uint32_t key, uint32_t row) {
  return fmix32((row * 0x2545F491u) ^ key);
}
__device__ __forceinline__ bool is_dropped(uint32_t rh, uint32_t col, uint32_t thr) {
  return (fmix32(rh ^ (col * 0x9E3779B9u)) >> 8) < thr;
}

// ---- dtype conversions ----
template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T> union Vec8 {
  uint4 u;
  T h[8];
};

// Loads `rows` x KD elements (row r at g + r * row_stride, columns 0..D-1) into smem rows of LD
// elements, zero-filling rows >= valid_rows and columns >= D. With `drop`, element (r, d) is zeroed
// when the prefix dropout stream `key` drops (row0 + r, d). All threads of the block take part.
template <typename T, int KD, int LD>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t row_stride, int rows, int valid_rows,
                                          int D, bool vec, bool drop = false, uint32_t key = 0,
                                          uint32_t row0 = 0, uint32_t thr = 0) {
  constexpr int C8 = KD / 8;
  for (int idx = threadIdx.x; idx < rows * C8; idx += kThreads) {
    const int r = idx / C8;
    const int c = (idx % C8) * 8;
    Vec8<T> val;
    val.u = make_uint4(0u, 0u, 0u, 0u);
    if (r < valid_rows && c < D) {
      const T* src = g + (int64_t)r * row_stride + c;
      if (vec) {
        val.u = *reinterpret_cast<const uint4*>(src);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) val.h[e] = (c + e < D) ? src[e] : from_f<T>(0.f);
      }
      if (drop) {
        const uint32_t rh = row_hash(key, row0 + (uint32_t)r);
#pragma unroll
        for (int e = 0; e < 8; ++e)
          if (is_dropped(rh, (uint32_t)(c + e), thr)) val.h[e] = from_f<T>(0.f);
      }
    }
    *reinterpret_cast<uint4*>(s + r * LD + c) = val.u;
  }
}

__device__ __forceinline__ void zero_f32(float* s, int n) {
  for (int i = threadIdx.x; i < n; i += kThreads) s[i] = 0.f;
}

constexpr int round128(int bytes) { return (bytes + 127) / 128 * 128; }

// Tile sizes: 128-wide heads use 32-key tiles so everything fits the 99 KB of sm_86/sm_89.
template <int KD> struct Tiles {
  static constexpr int BN = KD == 128 ? 32 : 64;  // key tile
  static constexpr int FWD_BM = 64;                // forward query tile (16 rows per warp)
  static constexpr int BWD_BM = 32;                // backward query tile
  static constexpr int LDH = KD + 8;               // padded 16-bit row (keeps 32-byte wmma alignment)
  static constexpr int LDO = KD + 4;               // padded fp32 row of a D-wide accumulator
  static constexpr int LDS = BN + 4;               // padded fp32 row of a score tile
  static constexpr int LDP = BN + 8;               // padded 16-bit row of a probability tile
};

// The work of one forward or dQ block: blockIdx.x enumerates query blocks fastest, then query heads,
// then batch rows (a 1-D grid, so B * Hq is never capped at 65535).
struct QueryBlock {
  int b, h, hk, m0;  // batch row, query head, its kv head, first query row
};

__device__ __forceinline__ QueryBlock query_block(const AttnParams& p, int BM) {
  const int nqb = (p.N + BM - 1) / BM;
  const int64_t lin = blockIdx.x;
  const int bh = (int)(lin / nqb);
  const int h = bh % p.Hq;
  return QueryBlock{bh / p.Hq, h, h / (p.Hq / p.Hkv), (int)(lin % nqb) * BM};
}

// Which of a tile's BN keys a row may see, causality aside: prefix keys below P; tokens below N and
// not padding.
__device__ __forceinline__ void key_valid(const AttnParams& p, int b, int n0, int BN, bool pre,
                                          unsigned char* kvalid) {
  for (int c = threadIdx.x; c < BN; c += kThreads) {
    const int j = n0 + c;
    if (pre)
      kvalid[c] = j < p.P;
    else
      kvalid[c] = j < p.N && (p.mask == nullptr || p.mask[(int64_t)b * p.m_sb + (int64_t)j * p.m_sn] != 0);
  }
}

// The key tiles a query block walks (forward and dQ): the row's prefix (its bank entry, read in place)
// in BN-key tiles, then its tokens up to the block's causal end.
template <typename T, int KD, int LDH, int BN> struct KeyTiles {
  const T *pk, *pv, *k, *v;
  uint32_t prow0;  // first row id of the prefix dropout streams for (b, hk)
  int b, npb, count;

  __device__ __forceinline__ KeyTiles(const AttnParams& p, int b_, int hk, int m0, int BM) : b(b_) {
    const int t = p.pindex ? (int)p.pindex[b] : 0;
    pk = static_cast<const T*>(p.pk) + (int64_t)t * p.pk_st + (int64_t)hk * p.pk_sh;
    pv = static_cast<const T*>(p.pv) + (int64_t)t * p.pv_st + (int64_t)hk * p.pv_sh;
    k = static_cast<const T*>(p.k) + (int64_t)b * p.k_sb + (int64_t)hk * p.k_sh;
    v = static_cast<const T*>(p.v) + (int64_t)b * p.v_sb + (int64_t)hk * p.v_sh;
    prow0 = (uint32_t)((int64_t)(b * p.Hkv + hk) * p.P);
    const int n_tok_end = p.causal ? min(p.N, m0 + BM) : p.N;
    npb = (p.P + BN - 1) / BN;
    count = npb + (n_tok_end + BN - 1) / BN;
  }

  // Loads tile blk (prefix dropout applied to prefix tiles) into Ks/Vs and its key visibility into
  // kvalid; returns whether it is a prefix tile and sets n0, its first key within its group. All
  // threads of the block take part; the caller synchronizes before and after.
  __device__ __forceinline__ bool load(const AttnParams& p, int blk, T* Ks, T* Vs, unsigned char* kvalid,
                                       int& n0) const {
    const bool pre = blk < npb;
    n0 = (pre ? blk : blk - npb) * BN;
    if (pre) {
      const int rows = min(BN, p.P - n0);
      load_tile<T, KD, LDH>(Ks, pk + (int64_t)n0 * p.pk_sp, p.pk_sp, BN, rows, p.D, p.vec, p.pdropout, p.key_pk,
                            prow0 + n0, p.thr_pref);
      load_tile<T, KD, LDH>(Vs, pv + (int64_t)n0 * p.pv_sp, p.pv_sp, BN, rows, p.D, p.vec, p.pdropout, p.key_pv,
                            prow0 + n0, p.thr_pref);
    } else {
      const int rows = min(BN, p.N - n0);
      load_tile<T, KD, LDH>(Ks, k + (int64_t)n0 * p.k_sn, p.k_sn, BN, rows, p.D, p.vec);
      load_tile<T, KD, LDH>(Vs, v + (int64_t)n0 * p.v_sn, p.v_sn, BN, rows, p.D, p.vec);
    }
    key_valid(p, b, n0, BN, pre, kvalid);
    return pre;
  }
};

inline std::string launch_status(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return std::string(what) + ": " + cudaGetErrorString(e);
  return std::string();
}

// The body of an entry point: runs LAUNCH<T, KD>(p, stream) for the dtype code and the compiled tile width of
// p.D, or returns an error naming NAME (expects `p`, `dtype` and `stream` in scope).
#define PTV2_DISPATCH(LAUNCH, NAME)                                                     \
  if (!supported_head_dim(p.D)) return NAME ": unsupported head dim " + std::to_string(p.D); \
  {                                                                                     \
    const int kd = kernel_head_dim(p.D);                                                \
    if (dtype == kFloat16) {                                                            \
      if (kd == 32) return LAUNCH<__half, 32>(p, stream);                               \
      if (kd == 64) return LAUNCH<__half, 64>(p, stream);                               \
      return LAUNCH<__half, 128>(p, stream);                                            \
    }                                                                                   \
    if (dtype == kBFloat16) {                                                           \
      if (kd == 32) return LAUNCH<__nv_bfloat16, 32>(p, stream);                        \
      if (kd == 64) return LAUNCH<__nv_bfloat16, 64>(p, stream);                        \
      return LAUNCH<__nv_bfloat16, 128>(p, stream);                                     \
    }                                                                                   \
  }                                                                                     \
  return NAME ": unsupported dtype code " + std::to_string(dtype);

#define PTV2_CHECK_CUDA(call, what)                                          \
  do {                                                                       \
    cudaError_t e_ = (call);                                                 \
    if (e_ != cudaSuccess) return std::string(what) + ": " + cudaGetErrorString(e_); \
  } while (0)

}  // namespace ptv2
