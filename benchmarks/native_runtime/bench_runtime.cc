// Standalone benchmark of lightflax's native parallel runtime (lightflax/native/csrc/parallel.h):
// the chunk pool (runtime 0) against an OpenMP team (runtime 1), same loops, interleaved rounds.
//
// Build (from the repository root; needs oneDNN's and jax's FFI headers, as the extension):
//   g++ -std=c++17 -O3 -fopenmp -I lightflax/native/csrc -I "$(python -c 'import jax.ffi; print(jax.ffi.include_dir())')" \
//     benchmarks/native_runtime/bench_runtime.cc lightflax/native/csrc/parallel.cc -o /tmp/bench_runtime -ldnnl
// Run: /tmp/bench_runtime [rounds] [threads] [spin_us]   (add a busy process for the contended case:
//   python -c 'while 1: pass' &)
// Prints one JSON line per (round, workload, runtime): wall and process CPU microseconds per call.
#include <sys/resource.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "parallel.h"

extern "C" void lightflax_native_set_runtime(int64_t r);
extern "C" void lightflax_native_set_spin_us(int64_t us);

namespace {

double CpuUs() {
  rusage u;
  getrusage(RUSAGE_SELF, &u);
  return (u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1e6 + u.ru_utime.tv_usec + u.ru_stime.tv_usec;
}

double WallUs() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Serial work between native calls (XLA's own ops), about `us` microseconds of arithmetic.
volatile double g_sink;
void SerialGap(int us) {
  if (us <= 0) return;
  double t_end = WallUs() + us, s = 0;
  while (WallUs() < t_end)
    for (int k = 0; k < 200; ++k) s += std::sqrt((double)k);
  g_sink = s;
}

struct Data {
  int64_t m = 32 * 80 * 80, c = 32;  // a BatchNorm-sized activation: 6.5 M floats
  std::vector<float> x, y;
  Data() : x(m * c), y(m * c) {
    for (size_t i = 0; i < x.size(); ++i) x[i] = (float)((i * 2654435761u) % 1000) * 1e-3f;
  }
};

// One "call" of each workload.
void Empty() {
  lf::ParallelChunks(8, [](int64_t, int) {});
}

void Elementwise(Data& d) {  // y = relu(x * a + b), BN apply's shape
  const float* x = d.x.data();
  float* y = d.y.data();
  lf::WithChannels(d.c, [&](auto ct) {
    constexpr int CT = decltype(ct)::value;
    lf::ParallelFor(d.m, [&](int64_t i, int) {
      for (int k = 0; k < CT; ++k) {
        float v = x[i * CT + k] * 1.5f - 0.2f;
        y[i * CT + k] = v > 0.f ? v : 0.f;
      }
    });
  });
}

void Sums(Data& d) {  // per-channel sums (BN statistics' shape)
  std::vector<double> out(d.c);
  const float* x = d.x.data();
  int64_t c = d.c;
  lf::ChannelSums(d.m, c, out.data(), [&](int64_t i, int64_t k) { return x[i * c + k]; });
  g_sink = out[0];
}

void Compute() {  // compute-bound chunks (a convolution's shape): 8 chunks of ~250 us
  lf::ParallelChunks(8, [](int64_t c, int) {
    double s = 0;
    for (int k = 0; k < 600000; ++k) s += std::sqrt((double)(k + c));
    g_sink = s;
  });
}

template <class F>
void Time(const char* name, int runtime, int threads, int round, int calls, int gap_us, F f) {
  lightflax_native_set_runtime(runtime);
  lf::g_threads = threads;
  lf::EnterCall();
  f();  // warm
  double w0 = WallUs(), c0 = CpuUs();
  for (int i = 0; i < calls; ++i) {
    f();
    SerialGap(gap_us);
  }
  double w = (WallUs() - w0) / calls, c = (CpuUs() - c0) / calls;
  double load[3] = {0, 0, 0};
  getloadavg(load, 3);
  std::printf(
      "{\"round\": %d, \"workload\": \"%s\", \"gap_us\": %d, \"runtime\": \"%s\", \"threads\": %d, "
      "\"wall_us\": %.1f, \"cpu_us\": %.1f, \"load1\": %.2f}\n",
      round, name, gap_us, runtime == lf::kPool ? "pool" : "openmp", lf::NumThreads(), w, c, load[0]);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  int rounds = argc > 1 ? std::atoi(argv[1]) : 3;
  int threads = argc > 2 ? std::atoi(argv[2]) : 2;
  if (argc > 3) lightflax_native_set_spin_us(std::atoi(argv[3]));
  Data d;
  // per round: the pool and an OpenMP team at `threads`, and one thread (the serial reference)
  const int configs[3][2] = {{lf::kPool, threads}, {lf::kOpenMP, threads}, {lf::kPool, 1}};
  for (int r = 0; r < rounds; ++r)
    for (auto& cfg : configs) {
      int rt = cfg[0], t = cfg[1];
      Time("empty", rt, t, r, 20000, 0, Empty);
      Time("empty", rt, t, r, 2000, 100, Empty);
      Time("elementwise", rt, t, r, 40, 0, [&] { Elementwise(d); });
      Time("sums", rt, t, r, 40, 0, [&] { Sums(d); });
      Time("compute", rt, t, r, 20, 0, Compute);
      Time("compute", rt, t, r, 20, 500, Compute);
    }
  return 0;
}
