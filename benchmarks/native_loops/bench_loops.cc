// Microbenchmark of lightflax's hand-written loops: today's (old_loops.h) against the ISA-dispatched
// ones (lightflax/native/csrc/loops_ops.h), one thread. Built by bench_loops.py as a shared library
// (ctypes: reference checks, interleaved timing) and as an executable (callgrind instruction counts:
//   bench_loops OP VERSION N H W C   runs OP once; VERSION old|base|avx2|none).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#define LF_LOOPS_STANDALONE
#include "serial_parallel.h"
#include "old_loops.h"
#include "loops_ops.h"

using namespace lf::loops;

extern "C" {
int lfb_set_isa(int v) { return SetIsa(v); }

// BN training forward: y, mean, var.
void old_bn_train(const float* x, const float* s, const float* b, float eps, int relu, int64_t m, int64_t c, float* y,
                  float* mean, float* var) {
  old::BnTrain(x, s, b, eps, relu, m, c, y, mean, var);
}
void new_bn_train(const float* x, const float* s, const float* b, float eps, int relu, int64_t m, int64_t c, float* y,
                  float* mean, float* var) {
  BnStats(x, m, c, 2, nullptr, mean, var);
  BnApplyRun(x, m, c, mean, var, s, b, eps, relu, y);
}
void old_bn_bwd(const float* dy, const float* x, const float* y, const float* mean, const float* var, const float* s,
                float eps, int relu, int64_t m, int64_t c, float* dx, float* ds, float* db) {
  old::BnBwd(dy, x, y, mean, var, s, eps, relu, m, c, dx, ds, db);
}
void new_bn_bwd(const float* dy, const float* x, const float* y, const float* mean, const float* var, const float* s,
                float eps, int relu, int64_t m, int64_t c, float* dx, float* ds, float* db) {
  std::vector<double> a(c), b(c);
  BnBwdSumsRun(dy, x, y, m, c, mean, var, eps, relu, a.data(), b.data());
  for (int64_t k = 0; k < c; ++k) db[k] = (float)a[k], ds[k] = (float)b[k];
  BnBwdApplyRun(dy, x, y, m, c, mean, var, s, db, ds, eps, relu, true, (double)m, dx);
}
void old_pool_fwd(const float* x, int64_t n, int64_t h, int64_t w, int64_t c, float* y) { old::PoolFwd(x, n, h, w, c, y); }
void new_pool_fwd(const float* x, int64_t n, int64_t h, int64_t w, int64_t c, float* y) { PoolFwdRun(x, n, h, w, c, y); }
void old_pool_bwd(const float* x, const float* g, int64_t n, int64_t h, int64_t w, int64_t c, float* dx) {
  old::PoolBwd(x, g, n, h, w, c, dx);
}
void new_pool_bwd(const float* x, const float* g, int64_t n, int64_t h, int64_t w, int64_t c, float* dx) {
  PoolBwdRun(x, g, n, h, w, c, dx);
}
void old_mask(const float* g, const float* y, int64_t m, int64_t c, float* out, double* s) {
  old::ConvMask(g, y, m, c, out, s);
}
void new_mask(const float* g, const float* y, int64_t m, int64_t c, float* out, double* s) {
  MaskSumsRun(g, y, m, c, true, out, s);
}
}

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: bench_loops OP VERSION N H W C\n");
    return 2;
  }
  std::string op = argv[1], ver = argv[2];
  int64_t n = atoll(argv[3]), h = atoll(argv[4]), w = atoll(argv[5]), c = atoll(argv[6]), m = n * h * w;
  std::vector<float> x(m * c), g(m * c), y(m * c), dx(m * c), p(4 * c, 1.f);
  std::vector<double> s(c);
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  for (auto& v : x) v = nd(rng);
  for (auto& v : g) v = nd(rng);
  for (int64_t i = 0; i < m * c; ++i) y[i] = x[i] > 0 ? x[i] : 0.f;
  bool old_v = ver == "old";
  if (ver == "base") SetIsa(kBase);
  if (ver == "avx2") SetIsa(kAvx2);
  if (ver == "none") return 0;
  float* P = p.data();
  if (op == "bn_train")
    (old_v ? old_bn_train : new_bn_train)(x.data(), P, P + c, 1e-3f, 0, m, c, y.data(), P + 2 * c, P + 3 * c);
  else if (op == "bn_train_relu")
    (old_v ? old_bn_train : new_bn_train)(x.data(), P, P + c, 1e-3f, 1, m, c, y.data(), P + 2 * c, P + 3 * c);
  else if (op == "bn_bwd")
    (old_v ? old_bn_bwd : new_bn_bwd)(g.data(), x.data(), y.data(), P, P + c, P + 2 * c, 1e-3f, 0, m, c, dx.data(),
                                      P + 3 * c, P + 3 * c);
  else if (op == "bn_bwd_relu")
    (old_v ? old_bn_bwd : new_bn_bwd)(g.data(), x.data(), y.data(), P, P + c, P + 2 * c, 1e-3f, 1, m, c, dx.data(),
                                      P + 3 * c, P + 3 * c);
  else if (op == "pool_fwd")
    (old_v ? old_pool_fwd : new_pool_fwd)(x.data(), n, h, w, c, y.data());
  else if (op == "pool_bwd")
    (old_v ? old_pool_bwd : new_pool_bwd)(x.data(), g.data(), n, h, w, c, dx.data());
  else if (op == "mask")
    (old_v ? old_mask : new_mask)(g.data(), y.data(), m, c, dx.data(), s.data());
  else {
    std::fprintf(stderr, "unknown op %s\n", op.c_str());
    return 2;
  }
  std::printf("%g\n", (double)dx[m * c / 2] + y[m * c / 3] + s[0]);
  return 0;
}
