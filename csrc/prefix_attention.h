// Host-facing interface of the prefix-attention CUDA kernels: plain structs of pointers, shapes and
// strides, no torch. Every launcher returns an empty string on success, else the CUDA error message.
#pragma once

#include <cstdint>
#include <string>

#include <cuda_runtime.h>

namespace ptv2 {

enum DType : int { kFloat16 = 0, kBFloat16 = 1 };

// One call's inputs, outputs and settings. Strides are in elements; the last (head) dim of every
// 4-d tensor is contiguous. q/out/dout/dq: (B, Hq, N, D); k/v/dk/dv: (B, Hkv, N, D);
// prefix_k/prefix_v: (T, Hkv, P, D); mask: (B, N) bytes (bool); lse/delta/grad_lse: (B, Hq, N)
// float32 contiguous; dpk/dpv: (T, Hkv, P, D) float32 contiguous, zero-filled by the caller.
struct AttnParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* pk = nullptr;
  const void* pv = nullptr;
  const uint8_t* mask = nullptr;       // may be null
  const int64_t* pindex = nullptr;     // (B,) bank entry per row; null: entry 0
  void* out = nullptr;
  float* lse = nullptr;
  // backward
  const void* dout = nullptr;
  const float* grad_lse = nullptr;     // may be null
  float* delta = nullptr;
  void* dq = nullptr;                  // any of the gradients may be null: not computed / not stored
  void* dk = nullptr;
  void* dv = nullptr;
  float* dpk = nullptr;
  float* dpv = nullptr;

  int B = 0, Hq = 0, Hkv = 0, N = 0, P = 0, D = 0, T = 1;
  int64_t q_sb = 0, q_sh = 0, q_sn = 0;
  int64_t k_sb = 0, k_sh = 0, k_sn = 0;
  int64_t v_sb = 0, v_sh = 0, v_sn = 0;
  int64_t o_sb = 0, o_sh = 0, o_sn = 0;
  int64_t do_sb = 0, do_sh = 0, do_sn = 0;
  int64_t dq_sb = 0, dq_sh = 0, dq_sn = 0;
  int64_t dk_sb = 0, dk_sh = 0, dk_sn = 0;
  int64_t dv_sb = 0, dv_sh = 0, dv_sn = 0;
  int64_t pk_st = 0, pk_sh = 0, pk_sp = 0;
  int64_t pv_st = 0, pv_sh = 0, pv_sp = 0;
  int64_t m_sb = 0, m_sn = 0;

  float scale = 1.f;        // softmax scale
  bool causal = false;
  bool dropout = false;     // attention dropout on
  float drop_scale = 1.f;   // 1 / (1 - dropout_p)
  uint32_t key_attn = 0, thr_attn = 0;
  bool pdropout = false;    // prefix element dropout on
  float pdrop_scale = 1.f;  // 1 / (1 - prefix_dropout_p)
  uint32_t key_pk = 0, key_pv = 0, thr_pref = 0;
  bool vec = false;         // 16-byte vector loads are legal (pointers and strides aligned, D % 8 == 0)
  int chunks = 1;           // prefix-gradient kernel: chunks of the B*G*ceil(N/BM) query tiles
};

bool supported_head_dim(int d);
int kernel_head_dim(int d);  // the compiled tile width a head dim runs with (32, 64 or 128)

std::string forward(const AttnParams& p, int dtype, cudaStream_t stream);
// delta = rowsum(dout * out) - grad_lse
std::string backward_preprocess(const AttnParams& p, int dtype, cudaStream_t stream);
std::string backward_dq(const AttnParams& p, int dtype, cudaStream_t stream);
std::string backward_dkv(const AttnParams& p, int dtype, cudaStream_t stream);
std::string backward_dprefix(const AttnParams& p, int dtype, cudaStream_t stream);
// Query-tile rows of the prefix-gradient kernel (the unit the chunks are made of).
int dprefix_block_m();
int dprefix_block_n(int d);

}  // namespace ptv2
