// Batch normalization over (N, H, W) per channel; x viewed as (reps, m, c); ReLU fused. The loops
// are loops_ops.h's: statistics in one pass over x (shifted sums), compiled per instruction set.
// Sums are accumulated in double; partials are added in chunk order, so results depend neither on
// scheduling nor on the thread count.
#include "handlers.h"
#include "loops_ops.h"
#include "parallel.h"

namespace lf {
namespace {

struct BnView {
  int64_t reps, m, c;
};

BnView View(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> pd) {
  size_t p = pd.size() - 1;  // leading dims of the per-channel operands
  return BnView{Prod(xd, 0, p), Prod(xd, p, xd.size() - 1), xd[xd.size() - 1]};
}

// The loops: loops_ops.h (per instruction set, chunked over lf::ParallelFor, sums added in chunk order).
void BnBwdSums(const float* dy, const float* x, const float* y, const float* mean, const float* var, float eps,
               bool relu, int64_t m, int64_t c, double* sg, double* sgx) {
  loops::BnBwdSumsRun(dy, x, y, m, c, mean, var, eps, relu, sg, sgx);
}

void BnBwdApply(const float* dy, const float* x, const float* y, const float* mean, const float* var,
                const float* scale, const float* sg, const float* sgx, float eps, bool relu, bool train,
                double count, int64_t m, int64_t c, float* dx) {
  loops::BnBwdApplyRun(dy, x, y, m, c, mean, var, scale, sg, sgx, eps, relu, train, count, dx);
}

}  // namespace

// The local statistics of the cross-device path (ops.py merges them across devices):
// mode 0: mean of x -> out; mode 1: mean of (x - mean)^2 around the given (merged) mean -> out.
// Both use BnTrainImpl's arithmetic (loops::BnStats: the same shifted sums, the same rounding), so
// that the merge over one device reproduces BnTrainImpl bit for bit, and a constant channel has
// mean == its value and variance 0 on any number of devices.
ffi::Error BnReduceImpl(F32Buf x, F32Buf mean, F32Ret out, int64_t mode) {
  Timed timed(kBnReduce);
  EnterCall();
  BnView v = View(x.dimensions(), mean.dimensions());
  for (int64_t r = 0; r < v.reps; ++r) {
    const float* xr = x.typed_data() + r * v.m * v.c;
    float* o = out->typed_data() + r * v.c;
    if (mode == 0)
      loops::BnStats(xr, v.m, v.c, 0, nullptr, o, nullptr);
    else
      loops::BnStats(xr, v.m, v.c, 1, mean.typed_data() + r * v.c, nullptr, o);
  }
  return ffi::Error::Success();
}

// Training forward on local statistics: -> y, mean, var (biased). Two passes over x: the
// statistics, then the normalisation.
ffi::Error BnTrainImpl(F32Buf x, F32Buf scale, F32Buf bias, F32Ret y, F32Ret mean, F32Ret var, float eps,
                       int64_t relu) {
  Timed timed(kBnFwd);
  EnterCall();
  BnView v = View(x.dimensions(), scale.dimensions());
  for (int64_t r = 0; r < v.reps; ++r) {
    const float* xr = x.typed_data() + r * v.m * v.c;
    float* mr = mean->typed_data() + r * v.c;
    float* vr = var->typed_data() + r * v.c;
    loops::BnStats(xr, v.m, v.c, 2, nullptr, mr, vr);
    loops::BnApplyRun(xr, v.m, v.c, mr, vr, scale.typed_data() + r * v.c, bias.typed_data() + r * v.c, eps,
                      relu != 0, y->typed_data() + r * v.m * v.c);
  }
  return ffi::Error::Success();
}

// Forward with given statistics (inference, or training after a cross-device mean).
ffi::Error BnApplyImpl(F32Buf x, F32Buf mean, F32Buf var,
                       F32Buf scale, F32Buf bias, F32Ret y,
                       float eps, int64_t relu) {
  Timed timed(kBnFwd);
  EnterCall();
  BnView v = View(x.dimensions(), scale.dimensions());
  for (int64_t r = 0; r < v.reps; ++r)
    loops::BnApplyRun(x.typed_data() + r * v.m * v.c, v.m, v.c, mean.typed_data() + r * v.c,
                      var.typed_data() + r * v.c, scale.typed_data() + r * v.c, bias.typed_data() + r * v.c, eps,
                      relu != 0, y->typed_data() + r * v.m * v.c);
  return ffi::Error::Success();
}

// Local sums for the backward pass (cross-device: psum them, then BnBwdApply).
ffi::Error BnBwdReduceImpl(F32Buf dy, F32Buf x, F32Buf y,
                           F32Buf mean, F32Buf var, F32Ret sg,
                           F32Ret sgx, float eps, int64_t relu) {
  Timed timed(kBnReduce);
  EnterCall();
  BnView v = View(x.dimensions(), mean.dimensions());
  std::vector<double> a(v.c), b(v.c);
  for (int64_t r = 0; r < v.reps; ++r) {
    int64_t o = r * v.m * v.c;
    BnBwdSums(dy.typed_data() + o, x.typed_data() + o, y.typed_data() + o, mean.typed_data() + r * v.c,
              var.typed_data() + r * v.c, eps, relu != 0, v.m, v.c, a.data(), b.data());
    for (int64_t k = 0; k < v.c; ++k) {
      sg->typed_data()[r * v.c + k] = (float)a[k];
      sgx->typed_data()[r * v.c + k] = (float)b[k];
    }
  }
  return ffi::Error::Success();
}

ffi::Error BnBwdApplyImpl(F32Buf dy, F32Buf x, F32Buf y,
                          F32Buf mean, F32Buf var, F32Buf scale,
                          F32Buf sg, F32Buf sgx, F32Ret dx,
                          float eps, int64_t relu, int64_t train, double count) {
  Timed timed(kBnBwd);
  EnterCall();
  BnView v = View(x.dimensions(), mean.dimensions());
  for (int64_t r = 0; r < v.reps; ++r) {
    int64_t o = r * v.m * v.c, q = r * v.c;
    BnBwdApply(dy.typed_data() + o, x.typed_data() + o, y.typed_data() + o, mean.typed_data() + q,
               var.typed_data() + q, scale.typed_data() + q, sg.typed_data() + q, sgx.typed_data() + q, eps,
               relu != 0, train != 0, count, v.m, v.c, dx->typed_data() + o);
  }
  return ffi::Error::Success();
}

// Local-statistics backward in one call: -> dx, dscale (= sum g*xhat), dbias (= sum g).
ffi::Error BnBwdImpl(F32Buf dy, F32Buf x, F32Buf y,
                     F32Buf mean, F32Buf var, F32Buf scale,
                     F32Ret dx, F32Ret dscale,
                     F32Ret dbias, float eps, int64_t relu, int64_t train) {
  Timed timed(kBnBwd);
  EnterCall();
  BnView v = View(x.dimensions(), mean.dimensions());
  std::vector<double> a(v.c), b(v.c);
  for (int64_t r = 0; r < v.reps; ++r) {
    int64_t o = r * v.m * v.c, q = r * v.c;
    BnBwdSums(dy.typed_data() + o, x.typed_data() + o, y.typed_data() + o, mean.typed_data() + q,
              var.typed_data() + q, eps, relu != 0, v.m, v.c, a.data(), b.data());
    float* sg = dbias->typed_data() + q;
    float* sgx = dscale->typed_data() + q;
    for (int64_t k = 0; k < v.c; ++k) {
      sg[k] = (float)a[k];
      sgx[k] = (float)b[k];
    }
    BnBwdApply(dy.typed_data() + o, x.typed_data() + o, y.typed_data() + o, mean.typed_data() + q,
               var.typed_data() + q, scale.typed_data() + q, sg, sgx, eps, relu != 0, train != 0, (double)v.m,
               v.m, v.c, dx->typed_data() + o);
  }
  return ffi::Error::Success();
}

}  // namespace lf

// The instruction set of the hand-written loops (loops.h): 0 baseline x86-64, 1 AVX2 + FMA;
// set_isa(-1): the best the CPU has (the default). Returns the one in use (tests force each).
LF_EXPORT int64_t lightflax_native_set_isa(int64_t want) { return lf::loops::SetIsa((int)want); }
LF_EXPORT int64_t lightflax_native_isa() { return lf::loops::Isa(); }
