// The parallel loop of the native kernels (stand-in of branch loops until the source split of branch
// native lands with the real one: same interface, OpenMP as the monolithic file; take native's at merge).
//   lf::NumThreads(): the threads a native call may use.
//   lf::ParallelFor(n, f): f(i, tid) for every i in [0, n), each exactly once, on any thread.
#pragma once
#include <omp.h>

#include <cstdint>

namespace lf {
int NumThreads();  // lightflax_native.cc

template <class F>
void ParallelFor(int64_t n, F&& f) {
  int nt = NumThreads();
  if (nt > n) nt = (int)n;
  if (nt <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i, 0);
    return;
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i) f(i, omp_get_thread_num());
}
}  // namespace lf
