// Backward preprocess (delta) and dQ. dQ: one block per (32-query tile, batch row, query head) walking
// the same key tiles as the forward (prefix first, then tokens), dQ += dS K accumulated in fp32 smem.
#include "bwd_common.cuh"

namespace ptv2 {

// delta[row] = sum_d dO * O - grad_lse[row]; one warp per (b, h, i) row.
template <typename T>
__global__ void __launch_bounds__(kThreads) preprocess_kernel(const AttnParams p) {
  const int64_t rows = (int64_t)p.B * p.Hq * p.N;
  const int64_t row = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int i = (int)(row % p.N);
  const int64_t bh = row / p.N;
  const int h = (int)(bh % p.Hq), b = (int)(bh / p.Hq);
  const T* o = static_cast<const T*>(p.out) + (int64_t)b * p.o_sb + (int64_t)h * p.o_sh + (int64_t)i * p.o_sn;
  const T* g = static_cast<const T*>(p.dout) + (int64_t)b * p.do_sb + (int64_t)h * p.do_sh + (int64_t)i * p.do_sn;
  float acc = 0.f;
  for (int d = lane; d < p.D; d += 32) acc += to_f<T>(o[d]) * to_f<T>(g[d]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) p.delta[row] = acc - (p.grad_lse ? p.grad_lse[row] : 0.f);
}

template <int KD> struct DqSmem {
  using Tl = Tiles<KD>;
  static constexpr int BM = Tl::BWD_BM, BN = Tl::BN;
  static constexpr int q = 0;
  static constexpr int dout = q + round128(BM * Tl::LDH * 2);
  static constexpr int k = dout + round128(BM * Tl::LDH * 2);
  static constexpr int v = k + round128(BN * Tl::LDH * 2);
  static constexpr int s = v + round128(BN * Tl::LDH * 2);
  static constexpr int dp = s + round128(BM * Tl::LDS * 4);
  static constexpr int ds = dp + round128(BM * Tl::LDS * 4);
  static constexpr int acc = ds + round128(BM * Tl::LDP * 2);
  static constexpr int lse = acc + round128(BM * Tl::LDO * 4);
  static constexpr int dlt = lse + round128(BM * 4);
  static constexpr int rh = dlt + round128(BM * 4);
  static constexpr int kv = rh + round128(BM * 4);
  static constexpr int bytes = kv + round128(BN);
};

template <typename T, int KD>
__global__ void __launch_bounds__(kThreads) dq_kernel(const AttnParams p) {
  using Tl = Tiles<KD>;
  using L = DqSmem<KD>;
  constexpr int BM = L::BM, BN = L::BN, LDH = Tl::LDH, LDP = Tl::LDP, LDO = Tl::LDO;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + L::q);
  T* dOs = reinterpret_cast<T*>(smem + L::dout);
  T* Ks = reinterpret_cast<T*>(smem + L::k);
  T* Vs = reinterpret_cast<T*>(smem + L::v);
  float* Ss = reinterpret_cast<float*>(smem + L::s);
  float* dPs = reinterpret_cast<float*>(smem + L::dp);
  T* dSs = reinterpret_cast<T*>(smem + L::ds);
  float* dQs = reinterpret_cast<float*>(smem + L::acc);
  float* lse2 = reinterpret_cast<float*>(smem + L::lse);
  float* dlt = reinterpret_cast<float*>(smem + L::dlt);
  uint32_t* rh = reinterpret_cast<uint32_t*>(smem + L::rh);
  unsigned char* kvalid = smem + L::kv;

  const auto [b, h, hk, m0] = query_block(p, BM);

  load_query_tile<T, KD, BM>(p, b, h, m0, Qs, dOs, lse2, dlt, rh);
  zero_f32(dQs, BM * LDO);

  const KeyTiles<T, KD, LDH, BN> keys(p, b, hk, m0, BM);
  for (int blk = 0; blk < keys.count; ++blk) {
    int n0;
    __syncthreads();
    const bool pre = keys.load(p, blk, Ks, Vs, kvalid, n0);
    __syncthreads();
    s_dp_tiles<T, KD, BM, BN>(Qs, dOs, Ks, Vs, Ss, dPs);
    __syncthreads();
    // dq = scale * sum_j dS_ij * kd_j with kd = K_tile * pdrop_scale for prefix keys.
    ds_tile<T, KD, BM, BN>(p, m0, n0, pre, Ss, dPs, lse2, dlt, rh, kvalid, dSs, nullptr,
                           pre ? p.pdrop_scale : 1.f);
    __syncthreads();
    acc_gemm<T, KD, BM, BN, false>(dQs, dSs, LDP, Ks, LDH);
  }
  __syncthreads();

  T* dqg = static_cast<T*>(p.dq) + (int64_t)b * p.dq_sb + (int64_t)h * p.dq_sh + (int64_t)m0 * p.dq_sn;
  for (int e = threadIdx.x; e < BM * KD; e += kThreads) {
    const int r = e / KD, d = e % KD;
    if (m0 + r < p.N && d < p.D) dqg[(int64_t)r * p.dq_sn + d] = from_f<T>(dQs[r * LDO + d] * p.scale);
  }
}

template <typename T>
static std::string launch_pre(const AttnParams& p, cudaStream_t stream) {
  const int64_t rows = (int64_t)p.B * p.Hq * p.N;
  if (rows == 0) return std::string();
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  if (blocks > 0x7fffffffLL) return "backward preprocess: grid too large";
  preprocess_kernel<T><<<(unsigned)blocks, kThreads, 0, stream>>>(p);
  return launch_status("backward preprocess kernel launch");
}

template <typename T, int KD>
static std::string launch_dq(const AttnParams& p, cudaStream_t stream) {
  constexpr int BM = Tiles<KD>::BWD_BM;
  const int64_t blocks = (int64_t)((p.N + BM - 1) / BM) * p.B * p.Hq;
  if (blocks == 0) return std::string();
  if (blocks > 0x7fffffffLL) return "backward dq: grid too large";
  const int bytes = DqSmem<KD>::bytes;
  PTV2_CHECK_CUDA(cudaFuncSetAttribute(dq_kernel<T, KD>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
                  "backward dq: cudaFuncSetAttribute");
  dq_kernel<T, KD><<<(unsigned)blocks, kThreads, bytes, stream>>>(p);
  return launch_status("backward dq kernel launch");
}

std::string backward_preprocess(const AttnParams& p, int dtype, cudaStream_t stream) {
  if (dtype == kFloat16) return launch_pre<__half>(p, stream);
  if (dtype == kBFloat16) return launch_pre<__nv_bfloat16>(p, stream);
  return "backward preprocess: unsupported dtype code " + std::to_string(dtype);
}

std::string backward_dq(const AttnParams& p, int dtype, cudaStream_t stream) {
  PTV2_DISPATCH(launch_dq, "backward dq")
}

}  // namespace ptv2
