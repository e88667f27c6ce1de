// Forward: one block per (64-query tile, batch row, query head). Keys are the P prefix positions of
// the row's bank entry (read in place, prefix dropout applied while loading) followed by the N tokens.
// S = Q K^T on tensor cores (wmma 16x16x16, fp32 accumulate) into shared memory; each warp owns 16
// query rows and runs the online softmax (exp2, scale folded in) on them; O += P V on tensor cores
// with the fp32 accumulator kept in shared memory so rows can be rescaled.
#include "common.cuh"

namespace ptv2 {
namespace wmma = nvcuda::wmma;

template <int KD> struct FwdSmem {
  using Tl = Tiles<KD>;
  static constexpr int BM = Tl::FWD_BM, BN = Tl::BN;
  static constexpr int q = 0;
  static constexpr int k = q + round128(BM * Tl::LDH * 2);
  static constexpr int v = k + round128(BN * Tl::LDH * 2);
  static constexpr int s = v + round128(BN * Tl::LDH * 2);
  static constexpr int p = s + round128(BM * Tl::LDS * 4);
  static constexpr int o = p + round128(BM * Tl::LDP * 2);
  static constexpr int kv = o + round128(BM * Tl::LDO * 4);
  static constexpr int bytes = kv + round128(BN);
};

template <typename T, int KD>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const AttnParams p) {
  using Tl = Tiles<KD>;
  using L = FwdSmem<KD>;
  constexpr int BM = L::BM, BN = L::BN, LDH = Tl::LDH, LDS = Tl::LDS, LDP = Tl::LDP, LDO = Tl::LDO;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + L::q);
  T* Ks = reinterpret_cast<T*>(smem + L::k);
  T* Vs = reinterpret_cast<T*>(smem + L::v);
  float* Ss = reinterpret_cast<float*>(smem + L::s);
  T* Ps = reinterpret_cast<T*>(smem + L::p);
  float* Os = reinterpret_cast<float*>(smem + L::o);
  unsigned char* kvalid = smem + L::kv;

  const auto [b, h, hk, m0] = query_block(p, BM);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const T* qg = static_cast<const T*>(p.q) + (int64_t)b * p.q_sb + (int64_t)h * p.q_sh + (int64_t)m0 * p.q_sn;
  load_tile<T, KD, LDH>(Qs, qg, p.q_sn, BM, min(BM, p.N - m0), p.D, p.vec);
  zero_f32(Os, BM * LDO);

  // Softmax state: lane owns half (32 or 16 columns) of local row r of its warp's 16 rows.
  const int r = warp * 16 + (lane >> 1);
  const int half = lane & 1;
  const int i = m0 + r;
  float m_run = -INFINITY, l_run = 0.f;
  const uint32_t rh_attn = p.dropout ? row_hash(p.key_attn, (uint32_t)((int64_t)(b * p.Hq + h) * p.N + i)) : 0u;
  const float scale2 = p.scale * kLog2e;

  const int t = p.pindex ? (int)p.pindex[b] : 0;
  const T* pkg = static_cast<const T*>(p.pk) + (int64_t)t * p.pk_st + (int64_t)hk * p.pk_sh;
  const T* pvg = static_cast<const T*>(p.pv) + (int64_t)t * p.pv_st + (int64_t)hk * p.pv_sh;
  const T* kg = static_cast<const T*>(p.k) + (int64_t)b * p.k_sb + (int64_t)hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + (int64_t)b * p.v_sb + (int64_t)hk * p.v_sh;
  const uint32_t prow0 = (uint32_t)((int64_t)(b * p.Hkv + hk) * p.P);

  const int n_tok_end = p.causal ? min(p.N, m0 + BM) : p.N;
  const int npb = (p.P + BN - 1) / BN;
  const int ntb = (n_tok_end + BN - 1) / BN;

  for (int blk = 0; blk < npb + ntb; ++blk) {
    const bool pre = blk < npb;
    const int n0 = (pre ? blk : blk - npb) * BN;
    __syncthreads();  // previous tile's K/V no longer in use
    if (pre) {
      const int rows = min(BN, p.P - n0);
      load_tile<T, KD, LDH>(Ks, pkg + (int64_t)n0 * p.pk_sp, p.pk_sp, BN, rows, p.D, p.vec, p.pdropout,
                            p.key_pk, prow0 + n0, p.thr_pref);
      load_tile<T, KD, LDH>(Vs, pvg + (int64_t)n0 * p.pv_sp, p.pv_sp, BN, rows, p.D, p.vec, p.pdropout,
                            p.key_pv, prow0 + n0, p.thr_pref);
      for (int c = threadIdx.x; c < BN; c += kThreads) kvalid[c] = (n0 + c) < p.P;
    } else {
      const int rows = min(BN, p.N - n0);
      load_tile<T, KD, LDH>(Ks, kg + (int64_t)n0 * p.k_sn, p.k_sn, BN, rows, p.D, p.vec);
      load_tile<T, KD, LDH>(Vs, vg + (int64_t)n0 * p.v_sn, p.v_sn, BN, rows, p.D, p.vec);
      for (int c = threadIdx.x; c < BN; c += kThreads) {
        const int j = n0 + c;
        kvalid[c] = j < p.N && (p.mask == nullptr || p.mask[(int64_t)b * p.m_sb + (int64_t)j * p.m_sn] != 0);
      }
    }
    __syncthreads();

    // S_w = Q_w K^T for this warp's 16 rows.
#pragma unroll
    for (int j = 0; j < BN / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < KD / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
        wmma::load_matrix_sync(a, Qs + warp * 16 * LDH + kk * 16, LDH);
        wmma::load_matrix_sync(bf, Ks + j * 16 * LDH + kk * 16, LDH);
        wmma::mma_sync(acc, a, bf, acc);
      }
      wmma::store_matrix_sync(Ss + warp * 16 * LDS + j * 16, acc, LDS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax over this tile (log2 domain).
    const float sl2 = pre ? scale2 * p.pdrop_scale : scale2;
    const float vfac = pre ? p.pdrop_scale : 1.f;
    const int c0 = half * (BN / 2);
    float mx = -INFINITY;
    for (int c = c0; c < c0 + BN / 2; ++c) {
      const bool ok = kvalid[c] && (pre || !p.causal || n0 + c <= i);
      if (ok) mx = fmaxf(mx, Ss[r * LDS + c] * sl2);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m_run, mx);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = exp2f(m_run - m_use);
    float sum = 0.f;
    for (int c = c0; c < c0 + BN / 2; ++c) {
      const bool ok = kvalid[c] && (pre || !p.causal || n0 + c <= i);
      float pr = ok ? exp2f(Ss[r * LDS + c] * sl2 - m_use) : 0.f;
      sum += pr;
      if (p.dropout) {
        const uint32_t col = (uint32_t)(pre ? n0 + c : p.P + n0 + c);
        pr *= is_dropped(rh_attn, col, p.thr_attn) ? 0.f : p.drop_scale;
      }
      Ps[r * LDP + c] = from_f<T>(pr * vfac);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_run = l_run * alpha + sum;
    m_run = m_new;
    for (int d = half * (KD / 2); d < (half + 1) * (KD / 2); ++d) Os[r * LDO + d] *= alpha;
    __syncwarp();

    // O_w += P_w V.
#pragma unroll
    for (int j = 0; j < KD / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, Os + warp * 16 * LDO + j * 16, LDO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
        wmma::load_matrix_sync(a, Ps + warp * 16 * LDP + kk * 16, LDP);
        wmma::load_matrix_sync(bf, Vs + kk * 16 * LDH + j * 16, LDH);
        wmma::mma_sync(acc, a, bf, acc);
      }
      wmma::store_matrix_sync(Os + warp * 16 * LDO + j * 16, acc, LDO, wmma::mem_row_major);
    }
    __syncwarp();
  }

  if (i < p.N) {
    const float inv = l_run > 0.f ? 1.f / l_run : 0.f;
    T* og = static_cast<T*>(p.out) + (int64_t)b * p.o_sb + (int64_t)h * p.o_sh + (int64_t)i * p.o_sn;
    for (int d = half * (KD / 2); d < (half + 1) * (KD / 2); ++d)
      if (d < p.D) og[d] = from_f<T>(Os[r * LDO + d] * inv);
    if (half == 0)
      p.lse[((int64_t)b * p.Hq + h) * p.N + i] = l_run > 0.f ? (m_run + log2f(l_run)) * kLn2 : -INFINITY;
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
  if (!supported_head_dim(p.D)) return "forward: unsupported head dim " + std::to_string(p.D);
  const int kd = kernel_head_dim(p.D);
  if (dtype == kFloat16) {
    if (kd == 32) return launch_fwd<__half, 32>(p, stream);
    if (kd == 64) return launch_fwd<__half, 64>(p, stream);
    return launch_fwd<__half, 128>(p, stream);
  }
  if (dtype == kBFloat16) {
    if (kd == 32) return launch_fwd<__nv_bfloat16, 32>(p, stream);
    if (kd == 64) return launch_fwd<__nv_bfloat16, 64>(p, stream);
    return launch_fwd<__nv_bfloat16, 128>(p, stream);
  }
  return "forward: unsupported dtype code " + std::to_string(dtype);
}

}  // namespace ptv2
