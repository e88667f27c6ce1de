// Emulated kernel launch: blocks run one after another; shared memory is one static buffer,
// poisoned with NaN bytes before every block so a read of anything not written shows up in results.
#pragma once
#include "emu_shim.h"
namespace ptv2 { extern unsigned char smem[1 << 18]; }
#include "mma.cuh"  // emu/mma.cuh: takes the place of csrc/mma.cuh (same include guard)
template <typename K, typename P> void emu_launch(K kernel, long long blocks, const P& p) {
  for (long long b = 0; b < blocks; ++b) {
    std::memset(ptv2::smem, 0xFF, sizeof(ptv2::smem));  // NaN poison: reads of unwritten smem show up
    std::barrier<> blk(128), w0(32), w1(32), w2(32), w3(32);
    EmuCtx ctx{&blk, {&w0, &w1, &w2, &w3}, {}};
    emu_ctx_ = &ctx;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < 128; ++t)
      ts.emplace_back([&, t] { emu_tid_ = make_uint3(t, 0, 0); emu_bid_ = make_uint3((unsigned)b, 0, 0); kernel(p); });
    for (auto& t : ts) t.join();
  }
}
