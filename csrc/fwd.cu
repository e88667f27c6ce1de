// Forward: one block per (64-query tile, batch row, query head). Keys are the P prefix positions of
// the row's bank entry (read in place, prefix dropout applied while loading) followed by the N tokens.
// FlashAttention-2 style: each warp owns 16 query rows and keeps their Q fragments, the score tile S,
// the probabilities P and the fp32 output accumulator O in registers (mma.sync m16n8k16, fragment
// layouts in mma.cuh), so the online softmax and the rescaling of O never touch shared memory; only
// the K/V tiles, which all four warps read, go through it.
#include <cstring>

#include "common.cuh"
#include "mma.cuh"

namespace ptv2 {

template <int KD> struct FwdSmem {
  using Tl = Tiles<KD>;
  static constexpr int BM = Tl::FWD_BM, BN = Tl::BN, LDH = Tl::LDH;
  static constexpr int k = 0;
  static constexpr int v = k + round128(BN * LDH * 2);
  // Q (read into registers once) and the finished output tile (staged so global stores are 16-byte
  // vectors along D) borrow the K/V area: shared memory holds little more than one K and one V tile.
  static constexpr int stage = 0;
  static constexpr int kv_end = v + round128(BN * LDH * 2);
  static constexpr int stage_end = round128(BM * LDH * 2);
  static constexpr int kv = kv_end > stage_end ? kv_end : stage_end;
  static constexpr int bytes = kv + round128(BN);
};

// A fragment register from two 16-bit elements adjacent in shared memory (lower index in the low half,
// as mma expects); the row pitch LDH is even, so every such pair is 4-byte aligned.
template <typename T> __device__ __forceinline__ uint32_t ld_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}
template <typename T> __device__ __forceinline__ uint32_t pack_f2(float lo, float hi) {
  uint32_t u;
  if constexpr (std::is_same<T, __half>::value) {
    const __half2 x = __floats2half2_rn(lo, hi);
    memcpy(&u, &x, 4);
  } else {
    const __nv_bfloat162 x = __floats2bfloat162_rn(lo, hi);
    memcpy(&u, &x, 4);
  }
  return u;
}

template <typename T, int KD>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const AttnParams p) {
  using L = FwdSmem<KD>;
  constexpr int BM = L::BM, BN = L::BN, LDH = L::LDH;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Ks = reinterpret_cast<T*>(smem + L::k);
  T* Vs = reinterpret_cast<T*>(smem + L::v);
  T* stage = reinterpret_cast<T*>(smem + L::stage);
  unsigned char* kvalid = smem + L::kv;

  const auto [b, h, hk, m0] = query_block(p, BM);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;  // fragment coordinates (mma.cuh)

  const T* qg = static_cast<const T*>(p.q) + (int64_t)b * p.q_sb + (int64_t)h * p.q_sh + (int64_t)m0 * p.q_sn;
  load_tile<T, KD, LDH>(stage, qg, p.q_sn, BM, min(BM, p.N - m0), p.D, p.vec);
  __syncthreads();
  uint32_t qf[KD / 16][4];  // A fragments of this warp's 16 Q rows, one per k16 slice of D
  {
    const T* q0 = stage + (warp * 16 + g) * LDH + 2 * t;
#pragma unroll
    for (int kk = 0; kk < KD / 16; ++kk) {
      qf[kk][0] = ld_pair(q0 + kk * 16);
      qf[kk][1] = ld_pair(q0 + 8 * LDH + kk * 16);
      qf[kk][2] = ld_pair(q0 + kk * 16 + 8);
      qf[kk][3] = ld_pair(q0 + 8 * LDH + kk * 16 + 8);
    }
  }

  float o[KD / 8][4];  // C fragments of O, one per n8 slice of D
#pragma unroll
  for (int jd = 0; jd < KD / 8; ++jd) o[jd][0] = o[jd][1] = o[jd][2] = o[jd][3] = 0.f;

  // Softmax state of the lane's two rows, g and g + 8 of the warp's 16 (fragment entries 0-1 and 2-3);
  // the 4 lanes of a group hold the rest of those rows, so row max and sum are reduced across them.
  const int i0 = m0 + warp * 16 + g;
  const int qi[2] = {i0, i0 + 8};
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  uint32_t rh_attn[2] = {0u, 0u};
  if (p.dropout)
#pragma unroll
    for (int r = 0; r < 2; ++r) rh_attn[r] = row_hash(p.key_attn, (uint32_t)((int64_t)(b * p.Hq + h) * p.N + qi[r]));
  const float scale2 = p.scale * kLog2e;

  const KeyTiles<T, KD, LDH, BN> keys(p, b, hk, m0, BM);
  for (int blk = 0; blk < keys.count; ++blk) {
    int n0;
    __syncthreads();  // previous tile's K/V (the first time: the staged Q) no longer in use
    const bool pre = keys.load(p, blk, Ks, Vs, kvalid, n0);
    __syncthreads();

    // S = Q K^T: score tile j holds keys 8j..8j+7; key n is column n of the B operand, so its pairs run
    // along D, as stored: one ldmatrix gives the B fragments of two k16 slices (matrix m = lane / 8
    // covers D columns 8m..8m+7 of the 32-wide slice pair).
    float s[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      const T* k0 = Ks + (j * 8 + (lane & 7)) * LDH + (lane >> 3) * 8;
#pragma unroll
      for (int kk = 0; kk < KD / 16; kk += 2) {
        uint32_t bk[4];
        ldsm_x4<false>(bk, k0 + kk * 16);
        mma_16816<T>(s[j], qf[kk], bk, s[j]);
        mma_16816<T>(s[j], qf[kk + 1], bk + 2, s[j]);
      }
    }

    // Online softmax in the log2 domain (scale folded into one multiply; prefix K was dropped but not
    // rescaled on load, so its 1/(1-p) joins the scale here and V's joins P below).
    const float sl2 = pre ? scale2 * p.pdrop_scale : scale2;
    const float vfac = pre ? p.pdrop_scale : 1.f;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = j * 8 + 2 * t + (e & 1);
        const bool ok = kvalid[c] && (pre || !p.causal || n0 + c <= qi[e >> 1]);
        s[j][e] = ok ? s[j][e] * sl2 : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
      }
    float m_use[2], alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m_run[r], mx[r]);
      m_use[r] = m_new == -INFINITY ? 0.f : m_new;  // a row that has seen nothing yet stays at 0
      alpha[r] = exp2f(m_run[r] - m_use[r]);
      m_run[r] = m_new;
    }
    float sum[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float pr = exp2f(s[j][e] - m_use[e >> 1]);  // masked: exp2(-inf) = 0
        sum[e >> 1] += pr;                          // the normalizer counts dropped entries too
        if (p.dropout) {
          const int c = j * 8 + 2 * t + (e & 1);
          const uint32_t col = (uint32_t)(pre ? n0 + c : p.P + n0 + c);
          pr *= is_dropped(rh_attn[e >> 1], col, p.thr_attn) ? 0.f : p.drop_scale;
        }
        s[j][e] = pr * vfac;
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
      sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
      l_run[r] = l_run[r] * alpha[r] + sum[r];
    }
#pragma unroll
    for (int jd = 0; jd < KD / 8; ++jd) {
      o[jd][0] *= alpha[0];
      o[jd][1] *= alpha[0];
      o[jd][2] *= alpha[1];
      o[jd][3] *= alpha[1];
    }

    // O += P V. The C fragments of score tiles 2kk and 2kk+1 are exactly the A fragment of the k16
    // slice kk of P (rows g, g+8; keys 2t.. and 8+2t..), so P never leaves registers. V is the B
    // operand with its pairs along the key axis, across stored rows: a transposing ldmatrix gives the
    // B fragments of two n8 slices of D (matrix m: keys 8(m&1).., D columns 8(m>>1).. of the pair).
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t pa[4] = {pack_f2<T>(s[2 * kk][0], s[2 * kk][1]), pack_f2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack_f2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack_f2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const T* v0 = Vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDH + (lane >> 4) * 8;
#pragma unroll
      for (int jd = 0; jd < KD / 8; jd += 2) {
        uint32_t bv[4];
        ldsm_x4<true>(bv, v0 + jd * 8);
        mma_16816<T>(o[jd], pa, bv, o[jd]);
        mma_16816<T>(o[jd + 1], pa, bv + 2, o[jd + 1]);
      }
    }
  }

  // Epilogue: normalize, stage the 64 x KD tile in shared memory, store whole rows.
  __syncthreads();  // every warp is done with the last K/V tile, which the staged output overwrites
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) inv[r] = l_run[r] > 0.f ? 1.f / l_run[r] : 0.f;  // nothing seen: zeros
  {
    T* s0 = stage + (warp * 16 + g) * LDH + 2 * t;
#pragma unroll
    for (int jd = 0; jd < KD / 8; ++jd) {
      *reinterpret_cast<uint32_t*>(s0 + jd * 8) = pack_f2<T>(o[jd][0] * inv[0], o[jd][1] * inv[0]);
      *reinterpret_cast<uint32_t*>(s0 + 8 * LDH + jd * 8) = pack_f2<T>(o[jd][2] * inv[1], o[jd][3] * inv[1]);
    }
  }
  if (t == 0)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (qi[r] < p.N)
        p.lse[((int64_t)b * p.Hq + h) * p.N + qi[r]] =
            l_run[r] > 0.f ? (m_run[r] + log2f(l_run[r])) * kLn2 : -INFINITY;
  __syncthreads();

  T* og = static_cast<T*>(p.out) + (int64_t)b * p.o_sb + (int64_t)h * p.o_sh + (int64_t)m0 * p.o_sn;
  // The launcher checks only the inputs' alignment (p.vec); the output's is checked here.
  const bool vec_out = p.D % 8 == 0 && (reinterpret_cast<uintptr_t>(p.out) & 15) == 0 && p.o_sb % 8 == 0 &&
                       p.o_sh % 8 == 0 && p.o_sn % 8 == 0;
  constexpr int C8 = KD / 8;
  const int rows = min(BM, p.N - m0);
  for (int idx = threadIdx.x; idx < rows * C8; idx += kThreads) {
    const int r = idx / C8;
    const int c = (idx % C8) * 8;
    if (c >= p.D) continue;
    const T* src = stage + r * LDH + c;
    T* dst = og + (int64_t)r * p.o_sn + c;
    if (vec_out) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < 8 && c + e < p.D; ++e) dst[e] = src[e];
    }
  }
}

template <typename T, int KD>
static std::string launch_fwd(const AttnParams& p, cudaStream_t stream) {
  constexpr int BM = Tiles<KD>::FWD_BM;
  const int64_t blocks = (int64_t)((p.N + BM - 1) / BM) * p.B * p.Hq;
  if (blocks == 0) return std::string();
  if (blocks > 0x7fffffffLL) return "forward: grid too large";
  const int bytes = FwdSmem<KD>::bytes;
  PTV2_CHECK_CUDA(cudaFuncSetAttribute(fwd_kernel<T, KD>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
                  "forward: cudaFuncSetAttribute");
  fwd_kernel<T, KD><<<(unsigned)blocks, kThreads, bytes, stream>>>(p);
  return launch_status("forward kernel launch");
}

bool supported_head_dim(int d) { return d >= 8 && d <= 128 && d % 8 == 0; }
int kernel_head_dim(int d) { return d <= 32 ? 32 : (d <= 64 ? 64 : 128); }

std::string forward(const AttnParams& p, int dtype, cudaStream_t stream) {
  PTV2_DISPATCH(launch_fwd, "forward")
}

}  // namespace ptv2
