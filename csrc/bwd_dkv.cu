// Backward dK/dV. Both kernels hold one key tile (BN keys) and walk query tiles of 32 rows,
// accumulating dV += (P*z)^T dO and dK += dS^T Q in fp32 shared memory.
//  - tokens: one block per (key tile, batch row, kv head); query rows of the GQA group's heads.
//  - prefix: one block per (prefix tile, kv head, chunk); the B*G*ceil(N/32) query tiles of the kv
//    head form one long sequence split into `chunks` contiguous pieces. A block flushes its fp32
//    partial sums with atomicAdd into the (T, Hkv, P, D) fp32 gradient at each change of bank entry
//    (and of batch row when prefix dropout is on, since the mask differs per row), so the extra
//    memory is the fp32 buffer, independent of B.
#include "bwd_common.cuh"

namespace ptv2 {

template <int KD> struct DkvSmem {
  using Tl = Tiles<KD>;
  static constexpr int BM = Tl::BWD_BM, BN = Tl::BN;
  static constexpr int k = 0;
  static constexpr int v = k + round128(BN * Tl::LDH * 2);
  static constexpr int q = v + round128(BN * Tl::LDH * 2);
  static constexpr int dout = q + round128(BM * Tl::LDH * 2);
  static constexpr int s = dout + round128(BM * Tl::LDH * 2);
  static constexpr int dp = s + round128(BM * Tl::LDS * 4);
  static constexpr int pm = dp + round128(BM * Tl::LDS * 4);
  static constexpr int ds = pm + round128(BM * Tl::LDP * 2);
  static constexpr int dk = ds + round128(BM * Tl::LDP * 2);
  static constexpr int dv = dk + round128(BN * Tl::LDO * 4);
  static constexpr int lse = dv + round128(BN * Tl::LDO * 4);
  static constexpr int dlt = lse + round128(BM * 4);
  static constexpr int rh = dlt + round128(BM * 4);
  static constexpr int kv = rh + round128(BM * 4);
  static constexpr int bytes = kv + round128(BN);
};

template <typename T, int KD> struct DkvShared {
  T *Ks, *Vs, *Qs, *dOs, *Ps, *dSs;
  float *Ss, *dPs, *dKs, *dVs, *lse2, *dlt;
  uint32_t* rh;
  unsigned char* kvalid;
  __device__ explicit DkvShared(unsigned char* smem) {
    using L = DkvSmem<KD>;
    Ks = reinterpret_cast<T*>(smem + L::k);
    Vs = reinterpret_cast<T*>(smem + L::v);
    Qs = reinterpret_cast<T*>(smem + L::q);
    dOs = reinterpret_cast<T*>(smem + L::dout);
    Ss = reinterpret_cast<float*>(smem + L::s);
    dPs = reinterpret_cast<float*>(smem + L::dp);
    Ps = reinterpret_cast<T*>(smem + L::pm);
    dSs = reinterpret_cast<T*>(smem + L::ds);
    dKs = reinterpret_cast<float*>(smem + L::dk);
    dVs = reinterpret_cast<float*>(smem + L::dv);
    lse2 = reinterpret_cast<float*>(smem + L::lse);
    dlt = reinterpret_cast<float*>(smem + L::dlt);
    rh = reinterpret_cast<uint32_t*>(smem + L::rh);
    kvalid = smem + L::kv;
  }
};

// One query tile (b, h, rows m0..m0+BM) against the key tile held in smem.
template <typename T, int KD>
__device__ __forceinline__ void dkv_step(const AttnParams& p, const DkvShared<T, KD>& s, int b, int h, int m0,
                                         int n0, bool pre, bool want_k, bool want_v) {
  using Tl = Tiles<KD>;
  constexpr int BM = Tl::BWD_BM, BN = Tl::BN, LDH = Tl::LDH, LDP = Tl::LDP;
  __syncthreads();  // previous step done with Q/dO/P/dS
  load_query_tile<T, KD, BM>(p, b, h, m0, s.Qs, s.dOs, s.lse2, s.dlt, s.rh);
  __syncthreads();
  s_dp_tiles<T, KD, BM, BN>(s.Qs, s.dOs, s.Ks, s.Vs, s.Ss, s.dPs);
  __syncthreads();
  ds_tile<T, KD, BM, BN>(p, m0, n0, pre, s.Ss, s.dPs, s.lse2, s.dlt, s.rh, s.kvalid, s.dSs, s.Ps, 1.f);
  __syncthreads();
  if (want_v) acc_gemm<T, KD, BN, BM, true>(s.dVs, s.Ps, LDP, s.dOs, LDH);
  if (want_k) acc_gemm<T, KD, BN, BM, true>(s.dKs, s.dSs, LDP, s.Qs, LDH);
}

template <typename T, int KD>
__global__ void __launch_bounds__(kThreads) dkv_kernel(const AttnParams p) {
  using Tl = Tiles<KD>;
  constexpr int BM = Tl::BWD_BM, BN = Tl::BN, LDH = Tl::LDH, LDO = Tl::LDO;
  extern __shared__ __align__(128) unsigned char smem[];
  const DkvShared<T, KD> s(smem);

  const int nkb = (p.N + BN - 1) / BN;
  const int64_t lin = blockIdx.x;
  const int kb = (int)(lin % nkb);
  const int bhk = (int)(lin / nkb);
  const int b = bhk / p.Hkv, hk = bhk % p.Hkv;
  const int G = p.Hq / p.Hkv;
  const int n0 = kb * BN;
  const bool want_k = p.dk != nullptr, want_v = p.dv != nullptr;

  const T* kg = static_cast<const T*>(p.k) + (int64_t)b * p.k_sb + (int64_t)hk * p.k_sh + (int64_t)n0 * p.k_sn;
  const T* vg = static_cast<const T*>(p.v) + (int64_t)b * p.v_sb + (int64_t)hk * p.v_sh + (int64_t)n0 * p.v_sn;
  const int rows = min(BN, p.N - n0);
  load_tile<T, KD, LDH>(s.Ks, kg, p.k_sn, BN, rows, p.D, p.vec);
  load_tile<T, KD, LDH>(s.Vs, vg, p.v_sn, BN, rows, p.D, p.vec);
  key_valid(p, b, n0, BN, false, s.kvalid);
  zero_f32(s.dKs, BN * LDO);
  zero_f32(s.dVs, BN * LDO);

  const int nqb = (p.N + BM - 1) / BM;
  const int qstart = p.causal ? n0 / BM : 0;  // earlier query rows cannot see these keys
  for (int g = 0; g < G; ++g)
    for (int qb = qstart; qb < nqb; ++qb) dkv_step<T, KD>(p, s, b, hk * G + g, qb * BM, n0, false, want_k, want_v);
  __syncthreads();

  for (int e = threadIdx.x; e < BN * KD; e += kThreads) {
    const int r = e / KD, d = e % KD;
    if (r < rows && d < p.D) {
      const int j = n0 + r;
      if (want_k)
        static_cast<T*>(p.dk)[(int64_t)b * p.dk_sb + (int64_t)hk * p.dk_sh + (int64_t)j * p.dk_sn + d] =
            from_f<T>(s.dKs[r * LDO + d] * p.scale);
      if (want_v)
        static_cast<T*>(p.dv)[(int64_t)b * p.dv_sb + (int64_t)hk * p.dv_sh + (int64_t)j * p.dv_sn + d] =
            from_f<T>(s.dVs[r * LDO + d]);
    }
  }
}

// Adds the block's partial prefix gradient (for batch row b, bank entry t) into the fp32 buffers
// and zeroes the accumulators. d kd = scale * dS^T Q, d vd = (P z)^T dO for the dropped copies
// kd = m_k * k / (1 - pp), vd = m_v * v / (1 - pp), so dk = m_k / (1 - pp) * d kd, likewise v.
template <typename T, int KD>
__device__ __forceinline__ void dprefix_flush(const AttnParams& p, const DkvShared<T, KD>& s, int b, int t,
                                              int hk, int n0, bool want_k, bool want_v) {
  using Tl = Tiles<KD>;
  constexpr int BN = Tl::BN, LDO = Tl::LDO;
  __syncthreads();
  const float fk = p.scale * p.pdrop_scale, fv = p.pdrop_scale;
  for (int e = threadIdx.x; e < BN * KD; e += kThreads) {
    const int r = e / KD, d = e % KD;
    const int pp = n0 + r;
    if (pp < p.P && d < p.D) {
      const int64_t off = (((int64_t)t * p.Hkv + hk) * p.P + pp) * p.D + d;
      const uint32_t prow = (uint32_t)(((int64_t)b * p.Hkv + hk) * p.P + pp);
      if (want_k) {
        const bool drop = p.pdropout && is_dropped(row_hash(p.key_pk, prow), (uint32_t)d, p.thr_pref);
        if (!drop) atomicAdd(p.dpk + off, s.dKs[r * LDO + d] * fk);
      }
      if (want_v) {
        const bool drop = p.pdropout && is_dropped(row_hash(p.key_pv, prow), (uint32_t)d, p.thr_pref);
        if (!drop) atomicAdd(p.dpv + off, s.dVs[r * LDO + d] * fv);
      }
    }
    s.dKs[r * LDO + d] = 0.f;
    s.dVs[r * LDO + d] = 0.f;
  }
  __syncthreads();
}

template <typename T, int KD>
__global__ void __launch_bounds__(kThreads) dprefix_kernel(const AttnParams p) {
  using Tl = Tiles<KD>;
  constexpr int BM = Tl::BWD_BM, BN = Tl::BN, LDH = Tl::LDH, LDO = Tl::LDO;
  extern __shared__ __align__(128) unsigned char smem[];
  const DkvShared<T, KD> s(smem);

  const int npb = (p.P + BN - 1) / BN;
  const int64_t lin = blockIdx.x;
  const int c = (int)(lin % p.chunks);
  const int64_t rest = lin / p.chunks;
  const int pb = (int)(rest % npb);
  const int hk = (int)(rest / npb);
  const int G = p.Hq / p.Hkv;
  const int n0 = pb * BN;
  const int nqb = (p.N + BM - 1) / BM;
  const bool want_k = p.dpk != nullptr, want_v = p.dpv != nullptr;

  const int64_t W = (int64_t)p.B * G * nqb;
  const int64_t w0 = W * c / p.chunks, w1 = W * (c + 1) / p.chunks;
  zero_f32(s.dKs, BN * LDO);
  zero_f32(s.dVs, BN * LDO);
  key_valid(p, 0, n0, BN, true, s.kvalid);
  const int rows = min(BN, p.P - n0);

  int cur_b = -1, cur_t = -1;
  for (int64_t w = w0; w < w1; ++w) {
    const int b = (int)(w / ((int64_t)G * nqb));
    const int g = (int)((w / nqb) % G);
    const int qb = (int)(w % nqb);
    if (b != cur_b) {
      const int t = p.pindex ? (int)p.pindex[b] : 0;
      if (cur_b >= 0 && (p.pdropout || t != cur_t)) dprefix_flush<T, KD>(p, s, cur_b, cur_t, hk, n0, want_k, want_v);
      if (cur_b < 0 || p.pdropout || t != cur_t) {
        __syncthreads();  // the last step may still read K/V
        const uint32_t prow0 = (uint32_t)(((int64_t)b * p.Hkv + hk) * p.P + n0);
        const T* pkg = static_cast<const T*>(p.pk) + (int64_t)t * p.pk_st + (int64_t)hk * p.pk_sh + (int64_t)n0 * p.pk_sp;
        const T* pvg = static_cast<const T*>(p.pv) + (int64_t)t * p.pv_st + (int64_t)hk * p.pv_sh + (int64_t)n0 * p.pv_sp;
        load_tile<T, KD, LDH>(s.Ks, pkg, p.pk_sp, BN, rows, p.D, p.vec, p.pdropout, p.key_pk, prow0, p.thr_pref);
        load_tile<T, KD, LDH>(s.Vs, pvg, p.pv_sp, BN, rows, p.D, p.vec, p.pdropout, p.key_pv, prow0, p.thr_pref);
      }
      cur_b = b;
      cur_t = t;
    }
    dkv_step<T, KD>(p, s, b, hk * G + g, qb * BM, n0, true, want_k, want_v);
  }
  if (cur_b >= 0) dprefix_flush<T, KD>(p, s, cur_b, cur_t, hk, n0, want_k, want_v);
}

template <typename T, int KD>
static std::string launch_dkv(const AttnParams& p, cudaStream_t stream) {
  constexpr int BN = Tiles<KD>::BN;
  const int64_t blocks = (int64_t)((p.N + BN - 1) / BN) * p.B * p.Hkv;
  if (blocks == 0) return std::string();
  if (blocks > 0x7fffffffLL) return "backward dkv: grid too large";
  const int bytes = DkvSmem<KD>::bytes;
  PTV2_CHECK_CUDA(cudaFuncSetAttribute(dkv_kernel<T, KD>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
                  "backward dkv: cudaFuncSetAttribute");
  dkv_kernel<T, KD><<<(unsigned)blocks, kThreads, bytes, stream>>>(p);
  return launch_status("backward dkv kernel launch");
}

template <typename T, int KD>
static std::string launch_dprefix(const AttnParams& p, cudaStream_t stream) {
  constexpr int BN = Tiles<KD>::BN;
  if (p.chunks < 1) return "backward dprefix: chunks must be >= 1";
  const int64_t blocks = (int64_t)((p.P + BN - 1) / BN) * p.Hkv * p.chunks;
  if (blocks == 0 || p.N == 0 || p.B == 0) return std::string();
  if (blocks > 0x7fffffffLL) return "backward dprefix: grid too large";
  const int bytes = DkvSmem<KD>::bytes;
  PTV2_CHECK_CUDA(
      cudaFuncSetAttribute(dprefix_kernel<T, KD>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
      "backward dprefix: cudaFuncSetAttribute");
  dprefix_kernel<T, KD><<<(unsigned)blocks, kThreads, bytes, stream>>>(p);
  return launch_status("backward dprefix kernel launch");
}

std::string backward_dkv(const AttnParams& p, int dtype, cudaStream_t stream) {
  PTV2_DISPATCH(launch_dkv, "backward dkv")
}

std::string backward_dprefix(const AttnParams& p, int dtype, cudaStream_t stream) {
  PTV2_DISPATCH(launch_dprefix, "backward dprefix")
}

int dprefix_block_m() { return 32; }
int dprefix_block_n(int d) { return d <= 64 ? 64 : 32; }

}  // namespace ptv2
