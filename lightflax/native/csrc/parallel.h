// THE ONLY place that knows how work is spread over threads. Everything else writes its loops as
// lf::ParallelFor (and reductions as lf::ChannelSumsN); oneDNN primitives run on the same runtime.
//
// This implementation: OpenMP (the runtime Debian's oneDNN uses). XLA calls a handler from one of
// its own threads; EnterCall() sets that thread's OpenMP team size to the configured thread count
// (lightflax_native_set_threads) before the handler runs.
#pragma once

#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <vector>

#include "common.h"

namespace lf {

inline std::atomic<int> g_threads{1};  // lightflax_native_set_threads; <= 0: the runtime's default

// Every handler calls this first.
inline void EnterCall() {
  int n = g_threads.load(std::memory_order_relaxed);
  if (n > 0 && omp_get_max_threads() != n) omp_set_num_threads(n);
}

// The threads a call may use.
inline int NumThreads() {
  int n = g_threads.load();
  return n > 0 ? n : omp_get_max_threads();
}

// f(i, tid) for every i in [0, n), each exactly once, on any thread (tid < NumThreads()).
template <class F>
void ParallelFor(int64_t n, F&& f) {
#pragma omp parallel for num_threads(NumThreads()) schedule(static)
  for (int64_t i = 0; i < n; ++i) f(i, omp_get_thread_num());
}

// ChannelSumsN's work on rows [lo, hi): float blocks of 64 rows added into acc (N * c doubles).
template <int N, int CT, typename F>
void ChannelSumsRows(int64_t lo, int64_t hi, int64_t c, double* acc, F& f) {
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

// outs[q][c] = sum_i f(i, c)[q] over rows i, for N outputs at once (one pass over the rows):
// the rows are cut into chunks; each chunk's double partials are added in chunk order (results
// do not depend on which thread ran a chunk, on N, or on the compiled channel count).
template <int N, typename F>
void ChannelSumsN(int64_t m, int64_t c, double* const* outs, F f) {
  int64_t chunks = std::min<int64_t>(NumThreads(), std::max<int64_t>(1, m / 4096));
  std::vector<double> part((size_t)chunks * N * c, 0.0);
  WithChannels(c, [&](auto ct) {
    ParallelFor(chunks, [&](int64_t t, int) {
      ChannelSumsRows<N, decltype(ct)::value>(m * t / chunks, m * (t + 1) / chunks, c,
                                              part.data() + (size_t)t * N * c, f);
    });
  });
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
