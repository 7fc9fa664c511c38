// THE ONLY place that knows how work is spread over threads. Everything else writes its loops as
// lf::ParallelFor / lf::ParallelChunks (reductions: per-chunk partials added in chunk order, as loops_ops.h does);
// oneDNN primitives run on the same runtime.
//
// Runtime (default, kPool): every call is cut into MORE chunks than threads; the chunks are handed
// out one at a time (an atomic counter) to the calling thread (XLA's, which takes chunks itself and
// never blocks idle while chunks remain) and to a small pool of lightflax's own worker threads. A
// worker the OS has preempted delays only the chunk it holds, not a barrier of a whole team. Every
// thread that runs chunks runs OpenMP (so oneDNN) single-threaded: no OpenMP team inside an XLA call.
// The alternative kOpenMP (lightflax_native_set_runtime(1)) is the previous runtime, kept for A/B
// measurement: an OpenMP team of NumThreads() per loop, oneDNN primitives multi-threaded.
//
// Chunk boundaries depend on the problem size only, never on the thread count, so every result
// (sums included: per-chunk partials are added in chunk order) is the same at 1, 2 or 3 threads.
#pragma once

#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <vector>

#include "common.h"

namespace lf {

inline std::atomic<int> g_threads{1};  // lightflax_native_set_threads; <= 0: the CPUs this process may use
enum Runtime : int { kPool = 0, kOpenMP = 1 };
inline std::atomic<int> g_runtime{kPool};  // lightflax_native_set_runtime

// The threads a call may use (>= 1).
int NumThreads();

// Every handler calls this first: sets this thread's OpenMP team size (1 under kPool).
void EnterCall();

// Chunks a primitive-level loop (convolutions) is cut into, for a batch of n: depends on n only.
inline int64_t BatchChunks(int64_t n) { return g_runtime.load() == kOpenMP ? 1 : std::min<int64_t>(n, 8); }

namespace detail {
using ChunkFn = void (*)(void* ctx, int64_t chunk, int tid);
// Runs fn(ctx, c, tid) for c in [0, chunks) on the calling thread (tid 0) and the pool (tid 1 ..),
// each c exactly once; returns when all have returned.
void RunChunks(int64_t chunks, ChunkFn fn, void* ctx);
template <class Fn>
void Tramp(void* ctx, int64_t c, int tid) {
  (*static_cast<Fn*>(ctx))(c, tid);
}
}  // namespace detail

// f(c, tid) for c in [0, chunks): chunks are the unit of work (each a sizeable piece).
template <class F>
void ParallelChunks(int64_t chunks, F&& f) {
  if (chunks <= 0) return;
  if (chunks == 1) {  // on this thread, outside any OpenMP region (kOpenMP: oneDNN's own team)
    f(0, 0);
    return;
  }
  if (g_runtime.load(std::memory_order_relaxed) == kOpenMP) {
    if (NumThreads() > 1) g_parallel_jobs.fetch_add(1, std::memory_order_relaxed);
#pragma omp parallel for num_threads(NumThreads()) schedule(static)
    for (int64_t c = 0; c < chunks; ++c) f(c, omp_get_thread_num());
    return;
  }
  using Fn = std::remove_reference_t<F>;
  detail::RunChunks(chunks, &detail::Tramp<Fn>, (void*)&f);
}

// Chunks a loop of n light iterations is cut into: at least kMinGrain iterations each (a chunk
// must outweigh handing it out), at most kMaxChunks. Depends on n (and grain) only.
inline int64_t LoopChunks(int64_t n, int64_t grain) {
  constexpr int64_t kMaxChunks = 16;
  return std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, n / std::max<int64_t>(grain, 1)));
}

// f(i, tid) for every i in [0, n), each exactly once, on any thread (tid < NumThreads(); two
// concurrent calls may both use tid 0: per-call scratch only). grain: the fewest iterations worth a
// chunk of their own (iterations are rows of a few hundred bytes: 256 by default).
template <class F>
void ParallelFor(int64_t n, F&& f, int64_t grain = 256) {
  if (n <= 0) return;
  if (g_runtime.load(std::memory_order_relaxed) == kOpenMP) {  // the previous runtime, as it was
#pragma omp parallel for num_threads(NumThreads()) schedule(static)
    for (int64_t i = 0; i < n; ++i) f(i, omp_get_thread_num());
    return;
  }
  const int64_t chunks = LoopChunks(n, grain);
  ParallelChunks(chunks, [&](int64_t c, int tid) {
    const int64_t lo = n * c / chunks, hi = n * (c + 1) / chunks;
    for (int64_t i = lo; i < hi; ++i) f(i, tid);
  });
}

namespace detail {
// Rows [lo, hi) of ChannelSumsN: float blocks of 64 rows added into the double partials acc.
template <int N, int CT, typename F>
void SumRows(int64_t lo, int64_t hi, int64_t c, double* acc, F& f) {
  const int64_t cc = CT ? CT : c;
  std::vector<float> blk_v(CT ? 0 : N * cc);
  alignas(64) float blk_s[CT ? N * CT : 1];
  float* blk = CT ? blk_s : blk_v.data();
  for (int64_t i0 = lo; i0 < hi; i0 += 64) {
    int64_t i1 = std::min(hi, i0 + 64);
    for (int64_t k = 0; k < N * cc; ++k) blk[k] = 0.f;
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t k = 0; k < cc; ++k) {
        std::array<float, N> v = f(i, k);
        for (int q = 0; q < N; ++q) blk[q * cc + k] += v[q];
      }
    for (int64_t k = 0; k < N * cc; ++k) acc[k] += blk[k];
  }
}

template <int N, typename F>
struct SumChunks {
  int64_t m, c, chunks;
  double* part;
  F* f;
  template <class CTy>
  void operator()(CTy) const {
    constexpr int CT = CTy::value;
    const SumChunks& s = *this;
    ParallelChunks(chunks, [&s](int64_t t, int) {
      SumRows<N, CT>(s.m * t / s.chunks, s.m * (t + 1) / s.chunks, s.c, s.part + (size_t)t * N * s.c, *s.f);
    });
  }
};
}  // namespace detail

// outs[q][c] = sum_i f(i, c)[q] over rows i, for N outputs at once (one pass over the rows):
// the rows are cut into chunks (by m only); in each, float blocks of 64 rows are added into the
// chunk's double partials, which are added in chunk order (results do not depend on the thread
// count, on which thread ran a chunk, on N, or on the compiled channel count).
template <int N, typename F>
void ChannelSumsN(int64_t m, int64_t c, double* const* outs, F f) {
  const int64_t chunks = LoopChunks(m, 4096);
  std::vector<double> part((size_t)chunks * N * c, 0.0);
  WithChannels(c, detail::SumChunks<N, F>{m, c, chunks, part.data(), &f});
  for (int q = 0; q < N; ++q)
    for (int64_t k = 0; k < c; ++k) {
      double sum = 0.0;
      for (int64_t t = 0; t < chunks; ++t) sum += part[((size_t)t * N + q) * c + k];
      outs[q][k] = sum;
    }
}

// out[c] = sum_i f(i, c) over rows i (ChannelSumsN with one output).
template <typename F>
void ChannelSums(int64_t m, int64_t c, double* out, F f) {
  double* outs[1] = {out};
  ChannelSumsN<1>(m, c, outs, [&](int64_t i, int64_t k) { return std::array<float, 1>{f(i, k)}; });
}

}  // namespace lf
