// The hand-written loops (loops_body.inc) per instruction set, chosen at run time.
//
// loops_body.inc is compiled twice: lf::loops::base (baseline x86-64, SSE2) and lf::loops::avx2
// (AVX2 + FMA, via #pragma GCC target: same source, no separate translation unit or compiler flag).
// Isa() picks one once per process (__builtin_cpu_supports); lightflax_native_set_isa (tests,
// benchmarks) forces one. The versions differ only in FMA contraction (a * b + c rounded once), i.e.
// in the last bits; tests/test_native_loops.py checks both against float64.
//
// Callers use the LF_LOOP(fn<...>)(args...) macro: the same template in the selected namespace.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>

namespace lf {
namespace loops {

enum IsaKind : int { kBase = 0, kAvx2 = 1 };

// Per-channel constants of BwdApply (see loops_ops.h, BnBwdApplyRun): mu, inv, a = scale * inv, and
// the means of g and g * xh as float pairs (hi + lo).
struct BwdConsts {
  const float *mu, *inv, *a, *mg, *mgl, *mgx, *mgxl;
};

#define LF_LOOPS_W 4
namespace base {
#include "loops_body.inc"
}  // namespace base
#undef LF_LOOPS_W

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define LF_LOOPS_W 8
namespace avx2 {
#include "loops_body.inc"
}  // namespace avx2
#undef LF_LOOPS_W
#pragma GCC pop_options
inline bool CpuHasAvx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#define LF_HAVE_AVX2 1
#else
inline bool CpuHasAvx2() { return false; }
#define LF_HAVE_AVX2 0
#endif

// -1: not chosen yet; else an IsaKind. One variable for the whole library (C++17 inline variable).
inline std::atomic<int> g_isa{-1};

inline int Isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = CpuHasAvx2() ? kAvx2 : kBase;
    g_isa.store(v, std::memory_order_relaxed);
  }
  return v;
}

// Forces an instruction set (kBase or kAvx2; -1: the best the CPU has). Returns the one now in use
// (kBase when AVX2 was asked for and the CPU lacks it).
inline int SetIsa(int want) {
  int v = (want == kAvx2 && CpuHasAvx2()) ? kAvx2 : (want < 0 ? (CpuHasAvx2() ? kAvx2 : kBase) : kBase);
  g_isa.store(v, std::memory_order_relaxed);
  return v;
}

}  // namespace loops
}  // namespace lf

#if LF_HAVE_AVX2
#define LF_LOOP(...) (::lf::loops::Isa() == ::lf::loops::kAvx2 ? ::lf::loops::avx2::__VA_ARGS__ : ::lf::loops::base::__VA_ARGS__)
#else
#define LF_LOOP(...) (::lf::loops::base::__VA_ARGS__)
#endif
