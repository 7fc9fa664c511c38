// Today's loops (lightflax_native.cc at commit 408170b), copied for the microbenchmark and made
// single-threaded (no OpenMP: the #pragma omp lines are ignored, one "thread" partial): the "before"
// of benchmarks/native_loops/bench_loops.py. Not part of the library.
#pragma once
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace old {

inline float Mask(float dy, float y) { return y > 0.f ? dy : 0.f; }

template <typename F>
void WithChannels(int64_t c, F f) {
  switch (c) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    default: f(std::integral_constant<int, 0>{});
  }
}

template <int N, typename F>
void ChannelSumsN(int64_t m, int64_t c, double* const* outs, F f) {
  int nthr = 1;
  std::vector<double> part((size_t)nthr * N * c, 0.0);
  WithChannels(c, [&](auto ct) {
    constexpr int CT = decltype(ct)::value;
    const int64_t cc = CT ? CT : c;
    {
      int t = 0;
      int64_t lo = m * t / nthr, hi = m * (t + 1) / nthr;
      double* acc = part.data() + (size_t)t * N * cc;
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
  });
  for (int q = 0; q < N; ++q)
    for (int64_t k = 0; k < c; ++k) {
      double sum = 0.0;
      for (int t = 0; t < nthr; ++t) sum += part[((size_t)t * N + q) * c + k];
      outs[q][k] = sum;
    }
}

template <typename F>
void ChannelSums(int64_t m, int64_t c, double* out, F f) {
  double* outs[1] = {out};
  ChannelSumsN<1>(m, c, outs, [&](int64_t i, int64_t k) { return std::array<float, 1>{f(i, k)}; });
}

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
  for (int64_t i = 0; i < m; ++i) {
    const float* __restrict__ xi = x + i * cc;
    float* __restrict__ yi = y + i * cc;
#pragma omp simd
    for (int64_t k = 0; k < cc; ++k) {
      float v = (xi[k] - pmu[k]) * pm[k] + pb[k];
      yi[k] = RELU ? (v > 0.f ? v : 0.f) : v;
    }
  }
}

inline void BnApply(const float* x, const float* mean, const float* var, const float* scale, const float* bias,
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

inline void ShiftedMean(const float* x, int64_t m, int64_t c, double* out) {
  std::vector<float> x0(x, x + c);
  const float* p0 = x0.data();
  ChannelSums(m, c, out, [&](int64_t i, int64_t k) { return x[i * c + k] - p0[k]; });
  for (int64_t k = 0; k < c; ++k) out[k] = (double)p0[k] + out[k] / (double)m;
}

inline void BnTrain(const float* xr, const float* scale, const float* bias, float eps, bool relu, int64_t m,
                    int64_t c, float* y, float* mr, float* vr) {
  std::vector<double> s(c);
  ShiftedMean(xr, m, c, s.data());
  for (int64_t k = 0; k < c; ++k) mr[k] = (float)s[k];
  ChannelSums(m, c, s.data(), [&](int64_t i, int64_t k) {
    float d = xr[i * c + k] - mr[k];
    return d * d;
  });
  for (int64_t k = 0; k < c; ++k) vr[k] = (float)(s[k] / (double)m);
  BnApply(xr, mr, vr, scale, bias, eps, relu, m, c, y);
}

inline void BnBwdSums(const float* dy, const float* x, const float* y, const float* mean, const float* var,
                      float eps, bool relu, int64_t m, int64_t c, double* sg, double* sgx) {
  std::vector<float> inv(c);
  for (int64_t k = 0; k < c; ++k) inv[k] = 1.f / std::sqrt(var[k] + eps);
  const float* pi = inv.data();
  double* outs[2] = {sg, sgx};
  ChannelSumsN<2>(m, c, outs, [&](int64_t i, int64_t k) {
    int64_t j = i * c + k;
    float g = relu ? Mask(dy[j], y[j]) : dy[j];
    return std::array<float, 2>{g, g * ((x[j] - mean[k]) * pi[k])};
  });
}

inline void BnBwdApply(const float* dy, const float* x, const float* y, const float* mean, const float* var,
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
    for (int64_t i = 0; i < m; ++i) {
      const float* __restrict__ dyi = dy + i * cc;
      const float* __restrict__ xi = x + i * cc;
      const float* __restrict__ yi = y + i * cc;
      float* __restrict__ dxi = dx + i * cc;
      for (int64_t k = 0; k < cc; ++k) {
        float g = relu ? Mask(dyi[k], yi[k]) : dyi[k];
        float xhat = (xi[k] - pmu[k]) * pi[k];
        dxi[k] = pa[k] * (((g - pg[k]) - pgl[k]) - (xhat * pgx[k] + xhat * pgxl[k]));
      }
    }
  });
}

// BnBwdImpl for one replica: -> dx, dscale, dbias.
inline void BnBwd(const float* dy, const float* x, const float* y, const float* mean, const float* var,
                  const float* scale, float eps, bool relu, int64_t m, int64_t c, float* dx, float* dscale,
                  float* dbias) {
  std::vector<double> a(c), b(c);
  BnBwdSums(dy, x, y, mean, var, eps, relu, m, c, a.data(), b.data());
  for (int64_t k = 0; k < c; ++k) {
    dbias[k] = (float)a[k];
    dscale[k] = (float)b[k];
  }
  BnBwdApply(dy, x, y, mean, var, scale, dbias, dscale, eps, relu, true, (double)m, m, c, dx);
}

inline float Max4(float a, float b, float c, float d) {
  float m = a;
  m = b > m ? b : m;
  m = c > m ? c : m;
  m = d > m ? d : m;
  bool nan = (a != a) | (b != b) | (c != c) | (d != d);
  return nan ? a + b + c + d : m;
}

inline void PoolFwd(const float* xp, int64_t n, int64_t h, int64_t w, int64_t c, float* yp) {
  int64_t ho = h / 2, wo = w / 2;
  WithChannels(c, [&](auto ct) {
    constexpr int CT = decltype(ct)::value;
    const int64_t cc = CT ? CT : c;
    for (int64_t row = 0; row < n * ho; ++row) {
      int64_t b = row / ho, i = row % ho;
      const float* __restrict__ r0 = xp + ((b * h + 2 * i) * w) * cc;
      const float* __restrict__ r1 = r0 + w * cc;
      float* __restrict__ out = yp + (b * ho + i) * wo * cc;
      for (int64_t j = 0; j < wo; ++j)
        for (int64_t k = 0; k < cc; ++k) {
          int64_t a = 2 * j * cc + k;
          out[j * cc + k] = Max4(r0[a], r0[a + cc], r1[a], r1[a + cc]);
        }
    }
  });
}

inline void PoolBwd(const float* xp, const float* gp, int64_t n, int64_t h, int64_t w, int64_t c, float* dp) {
  int64_t ho = h / 2, wo = w / 2;
  WithChannels(c, [&](auto ct) {
    constexpr int CT = decltype(ct)::value;
    const int64_t cc = CT ? CT : c;
    for (int64_t row = 0; row < n * ho; ++row) {
      int64_t b = row / ho, i = row % ho;
      int64_t off = ((b * h + 2 * i) * w) * cc;
      const float* __restrict__ r0 = xp + off;
      const float* __restrict__ r1 = r0 + w * cc;
      float* __restrict__ d0 = dp + off;
      float* __restrict__ d1 = d0 + w * cc;
      const float* __restrict__ g = gp + (b * ho + i) * wo * cc;
      for (int64_t j = 0; j < wo; ++j)
        for (int64_t k = 0; k < cc; ++k) {
          int64_t a = 2 * j * cc + k;
          float v0 = r0[a], v1 = r0[a + cc], v2 = r1[a], v3 = r1[a + cc];
          float m = Max4(v0, v1, v2, v3);
          bool e0 = v0 == m, e1 = (v1 == m) & !e0, e2 = (v2 == m) & !(e0 | e1), e3 = (v3 == m) & !(e0 | e1 | e2);
          float gv = g[j * cc + k];
          d0[a] = e0 ? gv : 0.f;
          d0[a + cc] = e1 ? gv : 0.f;
          d1[a] = e2 ? gv : 0.f;
          d1[a + cc] = e3 ? gv : 0.f;
        }
      for (int64_t a = 2 * wo * cc; a < w * cc; ++a) d0[a] = d1[a] = 0.f;
    }
  });
  if (h % 2)
    for (int64_t b = 0; b < n; ++b) std::memset(dp + ((b * h + h - 1) * w) * c, 0, w * c * sizeof(float));
}

// The ReLU-mask + bias-gradient pass of ConvBwd (relu and bias): masked = dy * (y > 0), db = sums.
inline void ConvMask(const float* gg, const float* yy, int64_t rows, int64_t o, float* masked, double* bsum) {
  ChannelSums(rows, o, bsum, [&](int64_t i, int64_t k) {
    int64_t j = i * o + k;
    float v = Mask(gg[j], yy[j]);
    masked[j] = v;
    return v;
  });
}

}  // namespace old
