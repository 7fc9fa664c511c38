// 2x2 max pooling, stride 2, VALID (floor); x viewed as (n, h, w, c) (plain C++ loops).
// Ties: the gradient goes to the FIRST maximal element in row-major order.
#include "handlers.h"
#include "parallel.h"

namespace lf {
namespace {

// max of a window; NaN if any element is NaN (as jnp.max). Branch-free selects.
inline float Max4(float a, float b, float c, float d) {
  float m = a;
  m = b > m ? b : m;
  m = c > m ? c : m;
  m = d > m ? d : m;
  bool nan = (a != a) | (b != b) | (c != c) | (d != d);
  return nan ? a + b + c + d : m;
}

}  // namespace

ffi::Error PoolFwdImpl(F32Buf x, F32Ret y) {
  Timed timed(kPoolFwd);
  EnterCall();
  auto xd = x.dimensions();
  size_t r = xd.size();
  int64_t n = Prod(xd, 0, r - 3), h = xd[r - 3], w = xd[r - 2], c = xd[r - 1], ho = h / 2, wo = w / 2;
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  WithChannels(c, [&](auto ct) {
    constexpr int CT = decltype(ct)::value;
    const int64_t cc = CT ? CT : c;
    ParallelFor(n * ho, [&](int64_t row, int) {
      int64_t b = row / ho, i = row % ho;
      const float* __restrict__ r0 = xp + ((b * h + 2 * i) * w) * cc;
      const float* __restrict__ r1 = r0 + w * cc;
      float* __restrict__ out = yp + (b * ho + i) * wo * cc;
      for (int64_t j = 0; j < wo; ++j)
        for (int64_t k = 0; k < cc; ++k) {
          int64_t a = 2 * j * cc + k;
          out[j * cc + k] = Max4(r0[a], r0[a + cc], r1[a], r1[a + cc]);
        }
    });
  });
  return ffi::Error::Success();
}

// The gradient goes to the FIRST element equal to the window's maximum (row-major), as XLA's
// select-and-scatter and lightflax.kernels.max_pool_2x2; a NaN window passes none.
ffi::Error PoolBwdImpl(F32Buf x, F32Buf dy, F32Ret dx) {
  Timed timed(kPoolBwd);
  EnterCall();
  auto xd = x.dimensions();
  size_t r = xd.size();
  int64_t n = Prod(xd, 0, r - 3), h = xd[r - 3], w = xd[r - 2], c = xd[r - 1], ho = h / 2, wo = w / 2;
  const float* xp = x.typed_data();
  const float* gp = dy.typed_data();
  float* dp = dx->typed_data();
  WithChannels(c, [&](auto ct) {
    constexpr int CT = decltype(ct)::value;
    const int64_t cc = CT ? CT : c;
    ParallelFor(n * ho, [&](int64_t row, int) {
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
      for (int64_t a = 2 * wo * cc; a < w * cc; ++a) d0[a] = d1[a] = 0.f;  // odd last column
    });
  });
  if (h % 2)  // odd last row of every image: no window
    for (int64_t b = 0; b < n; ++b) std::memset(dp + ((b * h + h - 1) * w) * c, 0, w * c * sizeof(float));
  return ffi::Error::Success();
}

}  // namespace lf
