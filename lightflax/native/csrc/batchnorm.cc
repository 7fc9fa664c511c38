// Batch normalization over (N, H, W) per channel; x viewed as (reps, m, c) (plain C++ loops,
// ReLU fused). Sums are accumulated in double; partials are added in a fixed order, so results do
// not depend on scheduling.
#include "handlers.h"
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

// y = relu?((x - mean) * (rsqrt(var + eps) * scale) + bias). The row loop is compiled per channel
// count and per ReLU (branch-free: a data-dependent branch on the sign is ~50 % mispredicted).
template <int CT, bool RELU>
void BnApplyRows(const float* __restrict__ x, const float* mul, const float* mu, const float* bb, int64_t m,
                 int64_t c, float* __restrict__ y) {
  const int64_t cc = CT ? CT : c;
  constexpr int kLocal = CT ? CT : 1;
  alignas(64) float lm[kLocal], lmu[kLocal], lb[kLocal];
  const float *pm = mul, *pmu = mu, *pb = bb;
  if (CT) {
    std::copy(mul, mul + cc, lm);
    std::copy(mu, mu + cc, lmu);
    std::copy(bb, bb + cc, lb);
    pm = lm, pmu = lmu, pb = lb;
  }
  ParallelFor(m, [&](int64_t i, int) {
    const float* __restrict__ xi = x + i * cc;
    float* __restrict__ yi = y + i * cc;
#pragma omp simd
    for (int64_t k = 0; k < cc; ++k) {
      float v = (xi[k] - pmu[k]) * pm[k] + pb[k];
      yi[k] = RELU ? (v > 0.f ? v : 0.f) : v;
    }
  });
}

void BnApply(const float* x, const float* mean, const float* var, const float* scale, const float* bias,
             float eps, bool relu, int64_t m, int64_t c, float* y) {
  std::vector<float> mul(c), mu(c), bb(c);
  for (int64_t k = 0; k < c; ++k) {
    mul[k] = (1.f / std::sqrt(var[k] + eps)) * scale[k];
    mu[k] = mean[k];
    bb[k] = bias[k];
  }
  WithChannels(c, [&](auto ct) {
    constexpr int CT = decltype(ct)::value;
    if (relu)
      BnApplyRows<CT, true>(x, mul.data(), mu.data(), bb.data(), m, c, y);
    else
      BnApplyRows<CT, false>(x, mul.data(), mu.data(), bb.data(), m, c, y);
  });
}

// Per-channel mean of x (m rows of c) in double, summed as deviations from the channel's first
// value: mean = x0 + sum(x - x0) / m. The float blocks of ChannelSums then add small deviations
// (better conditioned than the raw values), and a constant channel has mean == its value exactly
// (all deviations 0), so x - mean == 0 and the normalised output is exactly the bias.
void ShiftedMean(const float* x, int64_t m, int64_t c, double* out) {
  std::vector<float> x0(x, x + c);
  const float* p0 = x0.data();
  ChannelSums(m, c, out, [&](int64_t i, int64_t k) { return x[i * c + k] - p0[k]; });
  for (int64_t k = 0; k < c; ++k) out[k] = (double)p0[k] + out[k] / (double)m;
}

// g = dy * (y > 0) when relu, else dy; xhat = (x - mean) * rsqrt(var + eps).
// sums: sg = sum g, sgx = sum g * xhat (per channel).
void BnBwdSums(const float* dy, const float* x, const float* y, const float* mean, const float* var, float eps,
               bool relu, int64_t m, int64_t c, double* sg, double* sgx) {
  std::vector<float> inv(c);
  for (int64_t k = 0; k < c; ++k) inv[k] = 1.f / std::sqrt(var[k] + eps);
  const float* pi = inv.data();
  double* outs[2] = {sg, sgx};
  // one pass: (g, g * xhat) per element, g = dy masked by the ReLU when relu
  ChannelSumsN<2>(m, c, outs, [&](int64_t i, int64_t k) {
    int64_t j = i * c + k;
    float g = relu ? Mask(dy[j], y[j]) : dy[j];
    return std::array<float, 2>{g, g * ((x[j] - mean[k]) * pi[k])};
  });
}

// dx = scale * inv * (g - sg / count - xhat * sgx / count) (train), scale * inv * g (inference).
// The per-channel means sg / count and sgx / count are carried as float pairs (hi + lo) so that
// sum(dx) over a channel cancels to float accuracy: with a rounded mean, a channel of constant
// input (a dead ReLU in front) leaves count * ulp(mean) * scale * inv in the gradient of the bias
// in front of this BatchNorm, whose exact value is 0.
void BnBwdApply(const float* dy, const float* x, const float* y, const float* mean, const float* var,
                const float* scale, const float* sg, const float* sgx, float eps, bool relu, bool train,
                double count, int64_t m, int64_t c, float* dx) {
  std::vector<float> inv(c), a(c), mg(c), mgl(c), mgx(c), mgxl(c), mu(c);
  for (int64_t k = 0; k < c; ++k) {
    inv[k] = 1.f / std::sqrt(var[k] + eps);
    a[k] = scale[k] * inv[k];
    double g1 = train ? (double)sg[k] / count : 0.0, g2 = train ? (double)sgx[k] / count : 0.0;
    mg[k] = (float)g1;
    mgl[k] = (float)(g1 - (double)mg[k]);
    mgx[k] = (float)g2;
    mgxl[k] = (float)(g2 - (double)mgx[k]);
    mu[k] = mean[k];
  }
  const float *pi = inv.data(), *pa = a.data(), *pg = mg.data(), *pgl = mgl.data(), *pgx = mgx.data(),
              *pgxl = mgxl.data(), *pmu = mu.data();
  WithChannels(c, [&](auto ct) {
    constexpr int CT = decltype(ct)::value;
    const int64_t cc = CT ? CT : c;
    ParallelFor(m, [&](int64_t i, int) {
      const float* __restrict__ dyi = dy + i * cc;
      const float* __restrict__ xi = x + i * cc;
      const float* __restrict__ yi = y + i * cc;
      float* __restrict__ dxi = dx + i * cc;
      for (int64_t k = 0; k < cc; ++k) {
        float g = relu ? Mask(dyi[k], yi[k]) : dyi[k];
        float xhat = (xi[k] - pmu[k]) * pi[k];
        dxi[k] = pa[k] * (((g - pg[k]) - pgl[k]) - (xhat * pgx[k] + xhat * pgxl[k]));
      }
    });
  });
}

}  // namespace

// The local statistics of the cross-device path (ops.py merges them across devices):
// mode 0: mean of x -> out; mode 1: mean of (x - mean)^2 -> out. Both are the double sums
// divided by the local count and rounded once, exactly as BnTrainImpl computes the one-device
// statistics, so that the merge over one device reproduces BnTrainImpl bit for bit and a
// constant channel has mean == its value and variance 0 on any number of devices.
ffi::Error BnReduceImpl(F32Buf x, F32Buf mean, F32Ret out,
                        int64_t mode) {
  Timed timed(kBnReduce);
  EnterCall();
  BnView v = View(x.dimensions(), mean.dimensions());
  std::vector<double> s(v.c);
  for (int64_t r = 0; r < v.reps; ++r) {
    const float* xr = x.typed_data() + r * v.m * v.c;
    const float* mr = mean.typed_data() + r * v.c;
    if (mode == 0) {
      ShiftedMean(xr, v.m, v.c, s.data());
      for (int64_t k = 0; k < v.c; ++k) out->typed_data()[r * v.c + k] = (float)s[k];
      continue;
    }
    ChannelSums(v.m, v.c, s.data(), [&](int64_t i, int64_t k) {
      float d = xr[i * v.c + k] - mr[k];
      return d * d;
    });
    for (int64_t k = 0; k < v.c; ++k) out->typed_data()[r * v.c + k] = (float)(s[k] / (double)v.m);
  }
  return ffi::Error::Success();
}

// Training forward on local statistics: -> y, mean, var (biased).
ffi::Error BnTrainImpl(F32Buf x, F32Buf scale, F32Buf bias,
                       F32Ret y, F32Ret mean,
                       F32Ret var, float eps, int64_t relu) {
  Timed timed(kBnFwd);
  EnterCall();
  BnView v = View(x.dimensions(), scale.dimensions());
  std::vector<double> s(v.c);
  for (int64_t r = 0; r < v.reps; ++r) {
    const float* xr = x.typed_data() + r * v.m * v.c;
    float* mr = mean->typed_data() + r * v.c;
    float* vr = var->typed_data() + r * v.c;
    ShiftedMean(xr, v.m, v.c, s.data());
    for (int64_t k = 0; k < v.c; ++k) mr[k] = (float)s[k];
    ChannelSums(v.m, v.c, s.data(), [&](int64_t i, int64_t k) {
      float d = xr[i * v.c + k] - mr[k];
      return d * d;
    });
    for (int64_t k = 0; k < v.c; ++k) vr[k] = (float)(s[k] / (double)v.m);
    BnApply(xr, mr, vr, scale.typed_data() + r * v.c, bias.typed_data() + r * v.c, eps, relu != 0, v.m, v.c,
            y->typed_data() + r * v.m * v.c);
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
    BnApply(x.typed_data() + r * v.m * v.c, mean.typed_data() + r * v.c, var.typed_data() + r * v.c,
            scale.typed_data() + r * v.c, bias.typed_data() + r * v.c, eps, relu != 0, v.m, v.c,
            y->typed_data() + r * v.m * v.c);
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
