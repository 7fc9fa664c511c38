// BatchNorm, 2x2 max pooling and the convolution backward's ReLU mask on raw float32 arrays (one
// replica: x viewed as (m, c) rows of channels, or (n, h, w, c) images): the kernels of loops.h
// spread over lf::ParallelFor (ForEachChunk) in fixed chunks of rows. Sums are taken per chunk (float partials per
// block of 64 rows, then double) and added in chunk order, so results depend neither on the thread
// count nor on the scheduling. batchnorm.cc / pool.cc / conv.cc wrap them in FFI handlers;
// benchmarks/native_loops/ runs them standalone.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "channels.h"
#include "loops.h"
#ifndef LF_LOOPS_STANDALONE  // benchmarks/native_loops: its own serial lf::ParallelFor
#include "parallel.h"
#endif

namespace lf {
namespace loops {

// Per-thread float scratch of the loops for a channel count known only at run time.
inline float* LoopScratch(int64_t n) {
  thread_local std::vector<float> buf;
  if ((int64_t)buf.size() < n) buf.resize(n);
  return buf.data();
}

// f(ch, tid) for each of nch chunks of rows. Every chunk (about 64 KiB) is worth handing out on its
// own: grain 1 (ParallelFor's default grain of 256 iterations would run the study's loops serially).
template <class F>
void ForEachChunk(int64_t nch, F&& f) {
  ParallelFor(nch, std::forward<F>(f), 1);
}

// Rows per chunk: a multiple of the 64-row sum blocks, about 64 KiB of float32 per chunk.
inline int64_t ChunkRows(int64_t c) {
  int64_t r = (16384 / (c > 0 ? c : 1)) / 64 * 64;
  return r < 64 ? 64 : r;
}

// The shift of the one-pass sums: per channel, the mean of up to 256 rows spread over the
// matrix, summed in double and rounded to float (a constant channel's shift is its value exactly,
// so all its deviations are 0). Deviations from a shift near the mean keep the one-pass variance
// free of cancellation (var = E[d^2] - E[d]^2 with E[d] ~ std / 16).
inline void SampleShift(const float* x, int64_t m, int64_t c, float* shift) {
  const int64_t n = m < 256 ? m : 256;
  std::vector<double> s(c, 0.0);
  for (int64_t t = 0; t < n; ++t) {
    const float* xi = x + (t * m / n) * c;
    for (int64_t k = 0; k < c; ++k) s[k] += xi[k];
  }
  for (int64_t k = 0; k < c; ++k) shift[k] = (float)(s[k] / (double)n);
}

// One pass over x: s1 = sum (x - shift), s2 = sum (x - shift)^2 per channel (double).
inline void ShiftedSumsRun(const float* x, int64_t m, int64_t c, const float* shift, double* s1, double* s2) {
  const int64_t rows = ChunkRows(c), nch = (m + rows - 1) / rows;
  std::vector<double> part((size_t)nch * 2 * c, 0.0);
  WithChannels(c, [&](auto ct) {
    constexpr int CT = decltype(ct)::value;
    ForEachChunk(nch, [&](int64_t ch, int) {
      int64_t i0 = ch * rows, n = (i0 + rows < m ? rows : m - i0);
      double* p = part.data() + (size_t)ch * 2 * c;
      LF_LOOP(ShiftedSums<CT>)(x + i0 * c, n, c, shift, p, p + c, CT ? nullptr : LoopScratch(3 * c));
    });
  });
  for (int64_t k = 0; k < c; ++k) s1[k] = s2[k] = 0.0;
  for (int64_t ch = 0; ch < nch; ++ch)
    for (int64_t k = 0; k < c; ++k) {
      s1[k] += part[(size_t)ch * 2 * c + k];
      s2[k] += part[(size_t)ch * 2 * c + c + k];
    }
}

// The batch statistics from one pass: mean (rounded to float) and, given a mean mu (this mean, or
// the mean over devices), var = mean of (x - mu)^2 = E[d^2] - E[d]^2 + (E[d] - (mu - shift))^2 in
// double. mode: 0 mean only, 1 var around the given mu only, 2 both (the one-device forward; the same
// arithmetic as modes 0 then 1, so the cross-device path on one device equals it bit for bit).
inline void BnStats(const float* x, int64_t m, int64_t c, int mode, const float* mu_in, float* mean, float* var) {
  std::vector<float> shift(c);
  std::vector<double> s1(c), s2(c);
  SampleShift(x, m, c, shift.data());
  ShiftedSumsRun(x, m, c, shift.data(), s1.data(), s2.data());
  for (int64_t k = 0; k < c; ++k) {
    double a = s1[k] / (double)m;
    float mu = mode == 1 ? mu_in[k] : (float)((double)shift[k] + a);
    if (mode != 1) mean[k] = mu;
    if (mode == 0) continue;
    double dmu = (double)mu - (double)shift[k];
    double v = (s2[k] / (double)m - a * a) + (a - dmu) * (a - dmu);
    var[k] = (float)(v > 0.0 ? v : 0.0);
  }
}

// y = relu?((x - mean) * (rsqrt(var + eps) * scale) + bias).
inline void BnApplyRun(const float* x, int64_t m, int64_t c, const float* mean, const float* var, const float* scale,
                       const float* bias, float eps, bool relu, float* y) {
  std::vector<float> mul(c);
  for (int64_t k = 0; k < c; ++k) mul[k] = (1.f / std::sqrt(var[k] + eps)) * scale[k];
  const int64_t rows = ChunkRows(c), nch = (m + rows - 1) / rows;
  WithChannels(c, [&](auto ct) {
    constexpr int CT = decltype(ct)::value;
    ForEachChunk(nch, [&](int64_t ch, int) {
      int64_t i0 = ch * rows, n = (i0 + rows < m ? rows : m - i0);
      if (relu)
        LF_LOOP(Apply<CT, true>)(x + i0 * c, n, c, mean, mul.data(), bias, y + i0 * c);
      else
        LF_LOOP(Apply<CT, false>)(x + i0 * c, n, c, mean, mul.data(), bias, y + i0 * c);
    });
  });
}

// sg = sum g, sgx = sum g * xhat per channel (g = dy masked by the ReLU when relu).
inline void BnBwdSumsRun(const float* dy, const float* x, const float* y, int64_t m, int64_t c, const float* mean,
                         const float* var, float eps, bool relu, double* sg, double* sgx) {
  std::vector<float> inv(c);
  for (int64_t k = 0; k < c; ++k) inv[k] = 1.f / std::sqrt(var[k] + eps);
  const int64_t rows = ChunkRows(c), nch = (m + rows - 1) / rows;
  std::vector<double> part((size_t)nch * 2 * c, 0.0);
  WithChannels(c, [&](auto ct) {
    constexpr int CT = decltype(ct)::value;
    ForEachChunk(nch, [&](int64_t ch, int) {
      int64_t i0 = ch * rows, n = (i0 + rows < m ? rows : m - i0), o = i0 * c;
      double* p = part.data() + (size_t)ch * 2 * c;
      float* t = CT ? nullptr : LoopScratch(4 * c);
      if (relu)
        LF_LOOP(BwdSums<CT, true>)(dy + o, x + o, y + o, n, c, mean, inv.data(), p, p + c, t);
      else
        LF_LOOP(BwdSums<CT, false>)(dy + o, x + o, y + o, n, c, mean, inv.data(), p, p + c, t);
    });
  });
  for (int64_t k = 0; k < c; ++k) sg[k] = sgx[k] = 0.0;
  for (int64_t ch = 0; ch < nch; ++ch)
    for (int64_t k = 0; k < c; ++k) {
      sg[k] += part[(size_t)ch * 2 * c + k];
      sgx[k] += part[(size_t)ch * 2 * c + c + k];
    }
}

// dx = scale * inv * (g - sg / count - xhat * sgx / count) (train), scale * inv * g (inference).
// The per-channel means sg / count and sgx / count are carried as float pairs (hi + lo) so that
// sum(dx) over a channel cancels to float accuracy: with a rounded mean, a channel of constant
// input (a dead ReLU in front) leaves count * ulp(mean) * scale * inv in the gradient of the bias
// in front of this BatchNorm, whose exact value is 0.
inline void BnBwdApplyRun(const float* dy, const float* x, const float* y, int64_t m, int64_t c, const float* mean,
                          const float* var, const float* scale, const float* sg, const float* sgx, float eps,
                          bool relu, bool train, double count, float* dx) {
  std::vector<float> v(7 * c);
  float *inv = v.data(), *a = inv + c, *mg = a + c, *mgl = mg + c, *mgx = mgl + c, *mgxl = mgx + c, *mu = mgxl + c;
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
  const BwdConsts q{mu, inv, a, mg, mgl, mgx, mgxl};
  const int64_t rows = ChunkRows(c), nch = (m + rows - 1) / rows;
  WithChannels(c, [&](auto ct) {
    constexpr int CT = decltype(ct)::value;
    ForEachChunk(nch, [&](int64_t ch, int) {
      int64_t i0 = ch * rows, n = (i0 + rows < m ? rows : m - i0), o = i0 * c;
      if (relu)
        LF_LOOP(BwdApply<CT, true>)(dy + o, x + o, y + o, n, c, q, dx + o);
      else
        LF_LOOP(BwdApply<CT, false>)(dy + o, x + o, y + o, n, c, q, dx + o);
    });
  });
}

// The convolution backward's first pass: out = dy * (y > 0) when mask (the fused ReLU's gradient),
// and sums[k] = sum of it (the bias gradient) when sums != nullptr. mask = false: sums of dy only.
inline void MaskSumsRun(const float* dy, const float* y, int64_t m, int64_t c, bool mask, float* out, double* sums) {
  const int64_t rows = ChunkRows(c), nch = (m + rows - 1) / rows;
  std::vector<double> part((size_t)nch * c, 0.0);
  WithChannels(c, [&](auto ct) {
    constexpr int CT = decltype(ct)::value;
    ForEachChunk(nch, [&](int64_t ch, int) {
      int64_t i0 = ch * rows, n = (i0 + rows < m ? rows : m - i0), o = i0 * c;
      double* p = part.data() + (size_t)ch * c;
      float* t = CT ? nullptr : LoopScratch(c);
      if (mask)
        LF_LOOP(MaskSums<CT, true>)(dy + o, y + o, n, c, out + o, p, t);
      else
        LF_LOOP(MaskSums<CT, false>)(dy + o, y + o, n, c, nullptr, p, t);
    });
  });
  if (sums == nullptr) return;
  for (int64_t k = 0; k < c; ++k) sums[k] = 0.0;
  for (int64_t ch = 0; ch < nch; ++ch)
    for (int64_t k = 0; k < c; ++k) sums[k] += part[(size_t)ch * c + k];
}

// Output rows (of all n images) per pooling chunk: about 64 KiB of input.
inline int64_t PoolChunk(int64_t w, int64_t c) {
  int64_t r = 8192 / (w * c > 0 ? w * c : 1);
  return r < 1 ? 1 : r;
}

// y (n, h/2, w/2, c) = 2x2 max pooling, stride 2, VALID, of x (n, h, w, c).
inline void PoolFwdRun(const float* x, int64_t n, int64_t h, int64_t w, int64_t c, float* y) {
  const int64_t ho = h / 2, wo = w / 2, total = n * ho, per = PoolChunk(w, c), nch = (total + per - 1) / per;
  WithChannels(c, [&](auto ct) {
    constexpr int CT = decltype(ct)::value;
    ForEachChunk(nch, [&](int64_t ch, int) {
      for (int64_t row = ch * per; row < total && row < (ch + 1) * per; ++row) {
        int64_t b = row / ho, i = row % ho;
        const float* r0 = x + ((b * h + 2 * i) * w) * c;
        LF_LOOP(PoolFwdRow<CT>)(r0, r0 + w * c, wo, c, y + row * wo * c);
      }
    });
  });
}

// dx (n, h, w, c): dy (n, h/2, w/2, c) to the first maximum of each window, 0 elsewhere (the odd
// last row and column of an image too: written in the same pass, no zero-fill of dx).
inline void PoolBwdRun(const float* x, const float* dy, int64_t n, int64_t h, int64_t w, int64_t c, float* dx) {
  const int64_t ho = h / 2, wo = w / 2, total = n * ho, per = PoolChunk(w, c), nch = (total + per - 1) / per;
  const int64_t tail = (w - 2 * wo) * c;
  WithChannels(c, [&](auto ct) {
    constexpr int CT = decltype(ct)::value;
    ForEachChunk(nch, [&](int64_t ch, int) {
      for (int64_t row = ch * per; row < total && row < (ch + 1) * per; ++row) {
        int64_t b = row / ho, i = row % ho, off = ((b * h + 2 * i) * w) * c;
        LF_LOOP(PoolBwdRow<CT>)(x + off, x + off + w * c, dy + row * wo * c, wo, c, tail, dx + off,
                                dx + off + w * c);
        if (h % 2 && i == ho - 1) {  // the image's odd last row: no window
          float* last = dx + ((b * h + h - 1) * w) * c;
          for (int64_t a = 0; a < w * c; ++a) last[a] = 0.f;
        }
      }
    });
  });
  if (ho == 0)  // h == 1: no window at all
    for (int64_t a = 0; a < n * h * w * c; ++a) dx[a] = 0.f;
}

}  // namespace loops
}  // namespace lf
