// Definitions behind emu_shim.h (thread-local threadIdx/blockIdx, the block context, shared memory).
#include "emu_shim.h"
thread_local uint3 emu_tid_;
thread_local uint3 emu_bid_;
EmuCtx* emu_ctx_ = nullptr;
namespace ptv2 { alignas(128) unsigned char smem[1 << 18]; }
