// Pieces shared by the backward kernels (dQ, token dK/dV, prefix dK/dV).
//
// Notation for one (query tile, key tile) pair, with z the attention-dropout keep factor
// (0 or 1/(1-p)), and for prefix keys K/V tiles holding m*k, m*v (m the prefix keep mask, the
// 1/(1-pp) factor applied as `ps` below):
//   P  = exp2(S * scale*log2e * ps_k - lse*log2e)          probabilities (0 where not visible)
//   dP = (dO V^T) * ps_v * z                               gradient w.r.t. the softmax output
//   dS = P * (dP - delta),  delta = rowsum(dO * O) - grad_lse
#pragma once

#include <type_traits>

#include "common.cuh"

namespace ptv2 {
namespace wmma = nvcuda::wmma;

// S = Q K^T and dP = dO V^T for a BM x BN tile pair, 16x16 output tiles spread over the warps.
template <typename T, int KD, int BM, int BN>
__device__ __forceinline__ void s_dp_tiles(const T* Qs, const T* dOs, const T* Ks, const T* Vs, float* Ss,
                                           float* dPs) {
  using Tl = Tiles<KD>;
  constexpr int LDH = Tl::LDH, LDS = Tl::LDS;
  const int warp = threadIdx.x / 32;
  for (int tile = warp; tile < (BM / 16) * (BN / 16); tile += kWarps) {
    const int ti = tile / (BN / 16), tj = tile % (BN / 16);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_acc, dp_acc;
    wmma::fill_fragment(s_acc, 0.f);
    wmma::fill_fragment(dp_acc, 0.f);
#pragma unroll
    for (int kk = 0; kk < KD / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
      wmma::load_matrix_sync(a, Qs + ti * 16 * LDH + kk * 16, LDH);
      wmma::load_matrix_sync(bf, Ks + tj * 16 * LDH + kk * 16, LDH);
      wmma::mma_sync(s_acc, a, bf, s_acc);
      wmma::load_matrix_sync(a, dOs + ti * 16 * LDH + kk * 16, LDH);
      wmma::load_matrix_sync(bf, Vs + tj * 16 * LDH + kk * 16, LDH);
      wmma::mma_sync(dp_acc, a, bf, dp_acc);
    }
    wmma::store_matrix_sync(Ss + ti * 16 * LDS + tj * 16, s_acc, LDS, wmma::mem_row_major);
    wmma::store_matrix_sync(dPs + ti * 16 * LDS + tj * 16, dp_acc, LDS, wmma::mem_row_major);
  }
}

// Acc (R x KD, fp32, row stride LDO) += A^T B or A B over KCOLS, where A is a 16-bit tile in smem.
// TRANS_A: A is stored K x R (row stride lda) and used transposed (P^T dO, dS^T Q).
template <typename T, int KD, int R, int KDIM, bool TRANS_A>
__device__ __forceinline__ void acc_gemm(float* Acc, const T* A, int lda, const T* Bm, int ldb) {
  constexpr int LDO = Tiles<KD>::LDO;
  const int warp = threadIdx.x / 32;
  using ALayout = typename std::conditional<TRANS_A, wmma::col_major, wmma::row_major>::type;
  for (int tile = warp; tile < (R / 16) * (KD / 16); tile += kWarps) {
    const int ti = tile / (KD / 16), tj = tile % (KD / 16);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, Acc + ti * 16 * LDO + tj * 16, LDO, wmma::mem_row_major);
#pragma unroll
    for (int kk = 0; kk < KDIM / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
      if (TRANS_A)
        wmma::load_matrix_sync(a, A + kk * 16 * lda + ti * 16, lda);
      else
        wmma::load_matrix_sync(a, A + ti * 16 * lda + kk * 16, lda);
      wmma::load_matrix_sync(bf, Bm + kk * 16 * ldb + tj * 16, ldb);
      wmma::mma_sync(acc, a, bf, acc);
    }
    wmma::store_matrix_sync(Acc + ti * 16 * LDO + tj * 16, acc, LDO, wmma::mem_row_major);
  }
}

// Loads a query tile's Q, dO, lse (as log2), delta and attention-dropout row hashes.
template <typename T, int KD, int BM>
__device__ __forceinline__ void load_query_tile(const AttnParams& p, int b, int h, int m0, T* Qs, T* dOs,
                                                float* lse2, float* dlt, uint32_t* rh) {
  constexpr int LDH = Tiles<KD>::LDH;
  const int valid = min(BM, p.N - m0);
  const T* qg = static_cast<const T*>(p.q) + (int64_t)b * p.q_sb + (int64_t)h * p.q_sh + (int64_t)m0 * p.q_sn;
  const T* dog =
      static_cast<const T*>(p.dout) + (int64_t)b * p.do_sb + (int64_t)h * p.do_sh + (int64_t)m0 * p.do_sn;
  load_tile<T, KD, LDH>(Qs, qg, p.q_sn, BM, valid, p.D, p.vec);
  load_tile<T, KD, LDH>(dOs, dog, p.do_sn, BM, valid, p.D, p.vec);
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    const int i = m0 + r;
    const int64_t row = ((int64_t)b * p.Hq + h) * p.N + i;
    if (i < p.N) {
      const float l = p.lse[row];
      lse2[r] = l * kLog2e;
      dlt[r] = p.delta[row];
    } else {
      lse2[r] = -INFINITY;
      dlt[r] = 0.f;
    }
    rh[r] = p.dropout ? row_hash(p.key_attn, (uint32_t)row) : 0u;
  }
}

// Elementwise step over a BM x BN tile pair: writes dS (times ds_fac) and, when Pd is not null, the
// dropped probabilities P * z. Rows whose lse is -inf (nothing visible) and invisible keys give 0.
template <typename T, int KD, int BM, int BN>
__device__ __forceinline__ void ds_tile(const AttnParams& p, int m0, int n0, bool pre, const float* Ss,
                                        const float* dPs, const float* lse2, const float* dlt,
                                        const uint32_t* rh, const unsigned char* kvalid, T* dSs, T* Pd,
                                        float ds_fac) {
  using Tl = Tiles<KD>;
  constexpr int LDS = Tl::LDS, LDP = Tl::LDP;
  const float sl2 = p.scale * kLog2e * (pre ? p.pdrop_scale : 1.f);
  const float vfac = pre ? p.pdrop_scale : 1.f;
  for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
    const int r = e / BN, c = e % BN;
    const int i = m0 + r, j = n0 + c;
    const bool ok = i < p.N && kvalid[c] && lse2[r] != -INFINITY && (pre || !p.causal || j <= i);
    float pr = 0.f, ds = 0.f;
    if (ok) {
      pr = exp2f(Ss[r * LDS + c] * sl2 - lse2[r]);
      float z = 1.f;
      if (p.dropout) z = is_dropped(rh[r], (uint32_t)(pre ? j : p.P + j), p.thr_attn) ? 0.f : p.drop_scale;
      const float dp = dPs[r * LDS + c] * vfac * z;
      ds = pr * (dp - dlt[r]);
      pr *= z;
    }
    dSs[r * LDP + c] = from_f<T>(ds * ds_fac);
    if (Pd) Pd[r * LDP + c] = from_f<T>(pr);
  }
}

}  // namespace ptv2
