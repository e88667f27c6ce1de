// pybind11 module ptv2_kernels._C: no libtorch. Every launcher takes a dict of plain values (data
// pointers as Python ints, shapes, strides in elements, scalars), a dtype code (0 float16, 1 bfloat16)
// and a cudaStream_t as a Python int; errors come back as RuntimeError with the CUDA message.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "prefix_attention.h"

#ifndef PTV2_CUDA_ARCHS_STR
#define PTV2_CUDA_ARCHS_STR ""
#endif
#ifndef PTV2_PTX_ARCH
#define PTV2_PTX_ARCH 0
#endif

namespace py = pybind11;
using ptv2::AttnParams;

namespace {

bool has(const py::dict& d, const char* k) { return d.contains(k) && !d[k].is_none(); }
int64_t i64(const py::dict& d, const char* k, int64_t def = 0) { return has(d, k) ? d[k].cast<int64_t>() : def; }
double f64(const py::dict& d, const char* k, double def = 0.0) { return has(d, k) ? d[k].cast<double>() : def; }
bool flag(const py::dict& d, const char* k) { return has(d, k) && d[k].cast<bool>(); }
const void* ptr(const py::dict& d, const char* k) {
  return has(d, k) ? reinterpret_cast<const void*>(static_cast<uintptr_t>(d[k].cast<uint64_t>())) : nullptr;
}
void* mptr(const py::dict& d, const char* k) { return const_cast<void*>(ptr(d, k)); }

int to_int(const py::dict& d, const char* k) {
  const int64_t v = i64(d, k);
  if (v < 0 || v > INT32_MAX) throw std::invalid_argument(std::string("ptv2_kernels._C: ") + k + " out of range");
  return static_cast<int>(v);
}

#define STRIDES3(prefix, name)            \
  p.prefix##_sb = i64(d, name "_sb");     \
  p.prefix##_sh = i64(d, name "_sh");     \
  p.prefix##_sn = i64(d, name "_sn");

AttnParams params_from(const py::dict& d) {
  AttnParams p;
  p.q = ptr(d, "q");
  p.k = ptr(d, "k");
  p.v = ptr(d, "v");
  p.pk = ptr(d, "pk");
  p.pv = ptr(d, "pv");
  p.mask = static_cast<const uint8_t*>(ptr(d, "mask"));
  p.pindex = static_cast<const int64_t*>(ptr(d, "pindex"));
  p.out = mptr(d, "out");
  p.lse = static_cast<float*>(mptr(d, "lse"));
  p.dout = ptr(d, "dout");
  p.grad_lse = static_cast<const float*>(ptr(d, "grad_lse"));
  p.delta = static_cast<float*>(mptr(d, "delta"));
  p.dq = mptr(d, "dq");
  p.dk = mptr(d, "dk");
  p.dv = mptr(d, "dv");
  p.dpk = static_cast<float*>(mptr(d, "dpk"));
  p.dpv = static_cast<float*>(mptr(d, "dpv"));
  p.B = to_int(d, "B");
  p.Hq = to_int(d, "Hq");
  p.Hkv = to_int(d, "Hkv");
  p.N = to_int(d, "N");
  p.P = to_int(d, "P");
  p.D = to_int(d, "D");
  p.T = to_int(d, "T");
  if (p.Hkv <= 0 || p.Hq % p.Hkv != 0) throw std::invalid_argument("ptv2_kernels._C: Hq must be a multiple of Hkv");
  STRIDES3(q, "q")
  STRIDES3(k, "k")
  STRIDES3(v, "v")
  STRIDES3(o, "o")
  STRIDES3(do, "do")
  STRIDES3(dq, "dq")
  STRIDES3(dk, "dk")
  STRIDES3(dv, "dv")
  p.pk_st = i64(d, "pk_st");
  p.pk_sh = i64(d, "pk_sh");
  p.pk_sp = i64(d, "pk_sp");
  p.pv_st = i64(d, "pv_st");
  p.pv_sh = i64(d, "pv_sh");
  p.pv_sp = i64(d, "pv_sp");
  p.m_sb = i64(d, "m_sb");
  p.m_sn = i64(d, "m_sn");
  p.scale = static_cast<float>(f64(d, "scale", 1.0));
  p.causal = flag(d, "causal");
  p.dropout = flag(d, "dropout");
  p.drop_scale = static_cast<float>(f64(d, "drop_scale", 1.0));
  p.key_attn = static_cast<uint32_t>(i64(d, "key_attn"));
  p.thr_attn = static_cast<uint32_t>(i64(d, "thr_attn"));
  p.pdropout = flag(d, "pdropout");
  p.pdrop_scale = static_cast<float>(f64(d, "pdrop_scale", 1.0));
  p.key_pk = static_cast<uint32_t>(i64(d, "key_pk"));
  p.key_pv = static_cast<uint32_t>(i64(d, "key_pv"));
  p.thr_pref = static_cast<uint32_t>(i64(d, "thr_pref"));
  p.vec = flag(d, "vec");
  p.chunks = static_cast<int>(i64(d, "chunks", 1));
  return p;
}

using Launcher = std::string (*)(const AttnParams&, int, cudaStream_t);

void run(Launcher f, const py::dict& d, int dtype, uint64_t stream) {
  const AttnParams p = params_from(d);
  std::string err;
  {
    py::gil_scoped_release release;
    err = f(p, dtype, reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(stream)));
  }
  if (!err.empty()) throw std::runtime_error("ptv2_kernels._C: " + err);
}

std::vector<int> compiled_archs() {
  std::vector<int> out;
  std::stringstream ss(PTV2_CUDA_ARCHS_STR);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    out.push_back(std::stoi(item));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ptv2_kernels CUDA kernels (prefix attention forward/backward), pointer-based, no libtorch";
  m.def("forward", [](const py::dict& d, int dtype, uint64_t stream) { run(ptv2::forward, d, dtype, stream); },
        py::arg("args"), py::arg("dtype"), py::arg("stream"));
  m.def("backward_preprocess",
        [](const py::dict& d, int dtype, uint64_t stream) { run(ptv2::backward_preprocess, d, dtype, stream); },
        py::arg("args"), py::arg("dtype"), py::arg("stream"));
  m.def("backward_dq", [](const py::dict& d, int dtype, uint64_t stream) { run(ptv2::backward_dq, d, dtype, stream); },
        py::arg("args"), py::arg("dtype"), py::arg("stream"));
  m.def("backward_dkv",
        [](const py::dict& d, int dtype, uint64_t stream) { run(ptv2::backward_dkv, d, dtype, stream); },
        py::arg("args"), py::arg("dtype"), py::arg("stream"));
  m.def("backward_dprefix",
        [](const py::dict& d, int dtype, uint64_t stream) { run(ptv2::backward_dprefix, d, dtype, stream); },
        py::arg("args"), py::arg("dtype"), py::arg("stream"));
  m.def("compiled_archs", &compiled_archs, "SM architectures compiled to SASS, e.g. [80, 86, 89, 90]");
  m.def("ptx_arch", []() { return PTV2_PTX_ARCH; }, "architecture of the embedded PTX (0: none)");
  m.def("supported_head_dim", &ptv2::supported_head_dim);
  m.def("kernel_head_dim", &ptv2::kernel_head_dim);
  m.def("dprefix_block_m", &ptv2::dprefix_block_m);
  m.def("dprefix_block_n", &ptv2::dprefix_block_n);
  m.def("cuda_runtime_version", []() {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
  m.def("cuda_driver_version", []() {
    int v = 0;
    cudaDriverGetVersion(&v);
    return v;
  });
  m.attr("DTYPE_FLOAT16") = static_cast<int>(ptv2::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(ptv2::kBFloat16);
}
