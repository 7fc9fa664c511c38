// lightflax native CPU kernels: what every source file shares (includes, the oneDNN engine and
// stream, scratch buffers, the call counters, small helpers).
//
// Layouts: activations NHWC, convolution kernels HWIO, float32 only. Every handler accepts
// leading batch dimensions in front of its per-example ranks (jax.ffi.ffi_call(
// vmap_method="broadcast_all") gives every operand the same leading dimensions); it loops over them.
// How work is spread over threads lives in parallel.h only.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "channels.h"
#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

#define LF_EXPORT extern "C" __attribute__((visibility("default")))

namespace lf {

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;
using F32Buf = ffi::Buffer<ffi::F32>;
using F32Ret = ffi::ResultBuffer<ffi::F32>;

// 2: lightflax_bn_reduce returns local means; 3: depthwise forward; 4: per-kind handler time
// (lightflax_native_time_ns); 5: depthwise backward; 6: counter names from the library
// (lightflax_native_counter_names); 7: the parallel runtime's switch (lightflax_native_set_runtime /
// get_runtime) and its job count (lightflax_native_parallel_jobs).
constexpr int64_t kAbiVersion = 7;

// The handler kinds counted (calls and wall time). Python reads the names from the library
// (lightflax_native_counter_names): add a kind here and in kCounterNames, nowhere else.
enum Counter : int { kConvFwd, kConvBwd, kBnFwd, kBnBwd, kBnReduce, kPoolFwd, kPoolBwd, kDwConvFwd, kDwConvBwd,
                     kNumCounters };
inline const char* const kCounterNames[kNumCounters] = {"conv_fwd", "conv_bwd",  "bn_fwd",
                                                        "bn_bwd",   "bn_reduce", "pool_fwd",
                                                        "pool_bwd", "dwconv_fwd", "dwconv_bwd"};

inline std::atomic<int64_t> g_primitives{0};
// Calls of the parallel runtime that handed chunks to more than one thread (parallel.h): tests check
// that a loop is spread, benchmarks report it; reset with the handler counts.
inline std::atomic<int64_t> g_parallel_jobs{0};
inline std::atomic<int64_t> g_calls[kNumCounters];
inline std::atomic<int64_t> g_ns[kNumCounters];  // wall ns inside those handlers (summed over XLA's threads)

// Counts one call of handler kind i and adds its wall time when it returns (benchmarks: which
// kernels ran and how long they took; two clock reads per call, ~50 ns).
struct Timed {
  Counter i;
  std::chrono::steady_clock::time_point t0;
  explicit Timed(Counter kind) : i(kind), t0(std::chrono::steady_clock::now()) { g_calls[i] += 1; }
  ~Timed() {
    g_ns[i] += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
  }
};

inline dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

inline dnnl::stream& Stream() {
  thread_local dnnl::stream strm(Engine());
  return strm;
}

// A thread-local scratch buffer per purpose, grown as needed (never shrunk).
inline float* Scratch(int slot, size_t bytes) {
  thread_local std::vector<char> bufs[4];
  auto& b = bufs[slot];
  if (b.size() < bytes) b.resize(bytes);
  return reinterpret_cast<float*>(b.data());
}

inline int64_t Prod(ffi::Span<const int64_t> d, size_t lo, size_t hi) {
  int64_t p = 1;
  for (size_t i = lo; i < hi; ++i) p *= d[i];
  return p;
}

// dy where the ReLU output y is positive, else 0; both loads unconditional (a blend, not a
// data-dependent branch: ~50 % mispredicted on ReLU masks).
inline float Mask(float dy, float y) { return y > 0.f ? dy : 0.f; }


}  // namespace lf
