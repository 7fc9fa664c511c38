// Serial stand-in for lightflax/native/csrc/parallel.h (with LF_LOOPS_STANDALONE) (the microbenchmark measures one thread).
#pragma once
#include <cstdint>
namespace lf {
inline int NumThreads() { return 1; }
template <class F>
void ParallelFor(int64_t n, F&& f, int64_t = 1) {
  for (int64_t i = 0; i < n; ++i) f(i, 0);
}
}  // namespace lf
