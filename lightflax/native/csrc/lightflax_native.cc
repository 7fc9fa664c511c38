// lightflax native CPU kernels: XLA FFI handlers over oneDNN (convolutions) and
// plain C++ loops (batch normalization, 2x2 max pooling).
//
// Layouts: activations NHWC, convolution kernels HWIO, float32 only. Every
// handler accepts leading batch dimensions in front of its per-example ranks
// (jax.ffi.ffi_call(vmap_method="broadcast_all") gives every operand the same
// leading dimensions); it loops over them.
//
// Threads: Debian's oneDNN uses OpenMP. XLA calls a handler from one of its own
// threads; each handler sets that thread's OpenMP team size to g_threads
// (lightflax_native_set_threads) before it runs.
#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "loops_ops.h"
#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

#define LF_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

constexpr int64_t kAbiVersion = 5;  // 2: lightflax_bn_reduce returns local means; 3: depthwise forward;
                                    // 4: per-kind handler time (lightflax_native_time_ns); 5: depthwise backward

std::atomic<int> g_threads{1};
std::atomic<int64_t> g_primitives{0};
constexpr int kCounters = 16;
// conv_fwd, conv_bwd, bn_fwd, bn_bwd, bn_reduce, pool_fwd, pool_bwd, dw_fwd, dw_bwd
std::atomic<int64_t> g_calls[kCounters];
std::atomic<int64_t> g_ns[kCounters];  // wall nanoseconds spent inside those handlers (summed over XLA's threads)

// Counts one call of handler kind i and adds its wall time when it returns (benchmarks: which
// kernels ran and how long they took; two clock reads per call, ~50 ns).
struct Timed {
  int i;
  std::chrono::steady_clock::time_point t0;
  explicit Timed(int kind) : i(kind), t0(std::chrono::steady_clock::now()) { g_calls[i] += 1; }
  ~Timed() {
    g_ns[i] += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
  }
};

void SetThreads() {
  int n = g_threads.load(std::memory_order_relaxed);
  if (n > 0 && omp_get_max_threads() != n) omp_set_num_threads(n);
}

dnnl::engine& Engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

dnnl::stream& Stream() {
  thread_local dnnl::stream strm(Engine());
  return strm;
}

// A thread-local scratch buffer per purpose, grown as needed (never shrunk).
float* Scratch(int slot, size_t bytes) {
  thread_local std::vector<char> bufs[4];
  auto& b = bufs[slot];
  if (b.size() < bytes) b.resize(bytes);
  return reinterpret_cast<float*>(b.data());
}

int64_t Prod(ffi::Span<const int64_t> d, size_t lo, size_t hi) {
  int64_t p = 1;
  for (size_t i = lo; i < hi; ++i) p *= d[i];
  return p;
}

// dy where the ReLU output y is positive, else 0; both loads unconditional (a blend, not a
// data-dependent branch: ~50 % mispredicted on ReLU masks).
inline float Mask(float dy, float y) { return y > 0.f ? dy : 0.f; }

int Threads() {
  int n = g_threads.load();
  return n > 0 ? n : omp_get_max_threads();
}
}  // namespace
int lf::NumThreads() { return Threads(); }
namespace {

// Channel counts the loops are compiled for (the study's models: 8, 16, 32; 64 for wider ones):
// a compile-time count lets the per-row channel loop unroll into vector code. Others (0) run the
// same loop with the count read at run time. Results do not depend on which version runs.
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

// outs[q][c] = sum_i f(i, c)[q] over rows i, for N outputs at once (one pass over the rows):
// float blocks of 64 rows added into per-thread double partials, which are added in thread
// order (results do not depend on scheduling, on N, or on the compiled channel count).
template <int N, typename F>
void ChannelSumsN(int64_t m, int64_t c, double* const* outs, F f) {
  int nthr = (int)std::min<int64_t>(Threads(), std::max<int64_t>(1, m / 4096));
  std::vector<double> part((size_t)nthr * N * c, 0.0);
  WithChannels(c, [&](auto ct) {
    constexpr int CT = decltype(ct)::value;
    const int64_t cc = CT ? CT : c;
#pragma omp parallel num_threads(nthr)
    {
      int t = omp_get_thread_num();
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

// out[c] = sum_i f(i, c) over rows i (ChannelSumsN with one output).
template <typename F>
void ChannelSums(int64_t m, int64_t c, double* out, F f) {
  double* outs[1] = {out};
  ChannelSumsN<1>(m, c, outs, [&](int64_t i, int64_t k) { return std::array<float, 1>{f(i, k)}; });
}

// ---------------------------------------------------------------------------
// Convolution
// ---------------------------------------------------------------------------

// groups: 1 (a dense convolution, weights HWIO (KH, KW, C, O)) or C (depthwise, weights
// (KH, KW, 1, C) as lax.conv_general_dilated(feature_group_count=C) takes them).
struct ConvGeom {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr;
  bool bias, relu;
  int64_t groups = 1;
};

struct ConvEntry {
  // forward
  dnnl::primitive fwd;
  memory::desc fwd_w;
  size_t fwd_scratch = 0;
  // backward
  dnnl::primitive bwd_data, bwd_weights;
  memory::desc bwd_data_w, bwd_weights_w;
  size_t bwd_data_scratch = 0, bwd_weights_scratch = 0;
  memory::desc src, dst, user_w, bias;
};

std::mutex g_mu;
std::unordered_map<std::string, std::shared_ptr<ConvEntry>> g_conv_cache;

std::string Key(const ConvGeom& g, int kind) {
  std::string key;
  for (int64_t v : {(int64_t)kind, (int64_t)omp_get_max_threads(), g.n, g.h, g.w, g.c, g.kh, g.kw, g.o, g.oh,
                    g.ow, g.sh, g.sw, g.pt, g.pb, g.pl, g.pr, (int64_t)g.bias, (int64_t)g.relu, g.groups}) {
    key += std::to_string(v);
    key += ',';
  }
  return key;
}

// oneDNN's weight dimensions: {O, I, KH, KW}, grouped {G, O/G, I/G, KH, KW}.
memory::dims WeightDims(const ConvGeom& g) {
  if (g.groups == 1) return {g.o, g.c, g.kh, g.kw};
  return {g.groups, g.o / g.groups, g.c / g.groups, g.kh, g.kw};
}

void BaseDescs(const ConvGeom& g, ConvEntry* e) {
  e->src = memory::desc({g.n, g.c, g.h, g.w}, dt::f32, tag::nhwc);
  e->dst = memory::desc({g.n, g.o, g.oh, g.ow}, dt::f32, tag::nhwc);
  if (g.groups == 1) {
    e->user_w = memory::desc(WeightDims(g), dt::f32, tag::hwio);
  } else {  // the user's (KH, KW, C/G, O) buffer, group g's outputs contiguous in O: strides per dim
    int64_t og = g.o / g.groups, ig = g.c / g.groups;
    e->user_w = memory::desc(WeightDims(g), dt::f32, memory::dims{og, 1, g.o, g.kw * ig * g.o, ig * g.o});
  }
  e->bias = memory::desc({g.o}, dt::f32, tag::x);
}

dnnl::convolution_forward::primitive_desc FwdPd(const ConvGeom& g, const ConvEntry& e, dnnl::prop_kind prop,
                                                 bool post_ops) {
  memory::desc w_any(WeightDims(g), dt::f32, tag::any);
  memory::dims strides{g.sh, g.sw}, padl{g.pt, g.pl}, padr{g.pb, g.pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  if (post_ops && g.relu) {
    dnnl::post_ops po;
    po.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    attr.set_post_ops(po);
  }
  if (g.bias) {
    dnnl::convolution_forward::desc d(prop, dnnl::algorithm::convolution_direct, e.src, w_any, e.bias, e.dst,
                                      strides, padl, padr);
    return dnnl::convolution_forward::primitive_desc(d, attr, Engine());
  }
  dnnl::convolution_forward::desc d(prop, dnnl::algorithm::convolution_direct, e.src, w_any, e.dst, strides, padl,
                                    padr);
  return dnnl::convolution_forward::primitive_desc(d, attr, Engine());
}

std::shared_ptr<ConvEntry> GetFwd(const ConvGeom& g) {
  std::string key = Key(g, 0);
  {
    std::lock_guard<std::mutex> lk(g_mu);
    auto it = g_conv_cache.find(key);
    if (it != g_conv_cache.end()) return it->second;
  }
  auto e = std::make_shared<ConvEntry>();
  BaseDescs(g, e.get());
  auto pd = FwdPd(g, *e, dnnl::prop_kind::forward_inference, true);
  e->fwd = dnnl::convolution_forward(pd);
  e->fwd_w = pd.weights_desc();
  e->fwd_scratch = pd.scratchpad_desc().get_size();
  g_primitives += 1;
  std::lock_guard<std::mutex> lk(g_mu);
  return g_conv_cache.emplace(key, e).first->second;
}

std::shared_ptr<ConvEntry> GetBwd(const ConvGeom& g) {
  std::string key = Key(g, 1);
  {
    std::lock_guard<std::mutex> lk(g_mu);
    auto it = g_conv_cache.find(key);
    if (it != g_conv_cache.end()) return it->second;
  }
  auto e = std::make_shared<ConvEntry>();
  BaseDescs(g, e.get());
  auto hint = FwdPd(g, *e, dnnl::prop_kind::forward_training, false);
  memory::desc w_any(WeightDims(g), dt::f32, tag::any);
  memory::dims strides{g.sh, g.sw}, padl{g.pt, g.pl}, padr{g.pb, g.pr};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::convolution_backward_data::desc bd(dnnl::algorithm::convolution_direct, e->src, w_any, e->dst, strides,
                                           padl, padr);
  dnnl::convolution_backward_data::primitive_desc bdp(bd, attr, Engine(), hint);
  e->bwd_data = dnnl::convolution_backward_data(bdp);
  e->bwd_data_w = bdp.weights_desc();
  e->bwd_data_scratch = bdp.scratchpad_desc().get_size();
  // No diff_bias in the primitive: oneDNN sums the bias gradient in float32 over n*oh*ow rows,
  // which loses the cancellation of a bias in front of a BatchNorm (exact gradient 0) to ~1e-4 of
  // the model's gradient scale; ConvBwd sums it in double instead, in the pass that applies the
  // ReLU mask.
  dnnl::convolution_backward_weights::desc wd(dnnl::algorithm::convolution_direct, e->src, w_any, e->dst,
                                              strides, padl, padr);
  dnnl::convolution_backward_weights::primitive_desc wdp(wd, attr, Engine(), hint);
  e->bwd_weights = dnnl::convolution_backward_weights(wdp);
  e->bwd_weights_w = wdp.diff_weights_desc();
  e->bwd_weights_scratch = wdp.scratchpad_desc().get_size();
  g_primitives += 2;
  std::lock_guard<std::mutex> lk(g_mu);
  return g_conv_cache.emplace(key, e).first->second;
}

// Weights as the primitive wants them: the user's HWIO buffer itself when the
// primitive takes plain HWIO, else a reorder into a thread-local buffer.
memory WeightsFor(const memory::desc& want, const memory::desc& user, float* w, int slot) {
  memory wu(user, Engine(), w);
  if (want == user) return wu;
  memory wp(want, Engine(), Scratch(slot, want.get_size()));
  dnnl::reorder(wu, wp).execute(Stream(), wu, wp);
  return wp;
}

memory ScratchMem(size_t bytes, int slot) {
  return memory(memory::desc({(int64_t)std::max<size_t>(bytes, 1)}, dt::u8, tag::x), Engine(),
                Scratch(slot, std::max<size_t>(bytes, 1)));
}

ConvGeom Geom(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd, ffi::Span<const int64_t> yd, int64_t sh,
              int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t bias, int64_t relu) {
  size_t px = xd.size() - 4, pw = wd.size() - 4, py = yd.size() - 4;
  return ConvGeom{xd[px], xd[px + 1], xd[px + 2], xd[px + 3], wd[pw], wd[pw + 1], wd[pw + 3], yd[py + 1],
                  yd[py + 2], sh, sw, pt, pb, pl, pr, bias != 0, relu != 0};
}

// x (..., H, W, C), y (..., OH, OW, O), w (..., KH, KW, C, O) for a dense convolution or
// (..., KH, KW, 1, C) for a depthwise one (O = C).
ffi::Error CheckConv(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd, ffi::Span<const int64_t> yd,
                     bool depthwise) {
  const std::string what = depthwise ? "lightflax depthwise conv: " : "lightflax conv: ";
  if (xd.size() < 4 || wd.size() != xd.size() || yd.size() != xd.size())
    return ffi::Error::InvalidArgument(what + "operands need equal ranks >= 4 (NHWC, HWIO)");
  size_t p = xd.size() - 4;
  for (size_t i = 0; i < p; ++i)
    if (xd[i] != wd[i] || xd[i] != yd[i])
      return ffi::Error::InvalidArgument(what + "leading (vmapped) dimensions differ");
  if (depthwise ? (wd[p + 2] != 1 || xd[p + 3] != wd[p + 3] || yd[p + 3] != wd[p + 3] || xd[p] != yd[p])
                : (xd[p + 3] != wd[p + 2] || yd[p + 3] != wd[p + 3] || xd[p] != yd[p]))
    return ffi::Error::InvalidArgument(what + (depthwise ? "shape mismatch (w must be (KH, KW, 1, C))"
                                                         : "shape mismatch"));
  return ffi::Error::Success();
}

// relu?(conv(x, w, groups) + b) for every leading (vmapped) replica: the dense and the depthwise
// forward handlers' common body (their shape checks and call counters differ).
ffi::Error ConvFwdRun(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
                      ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                      int64_t pr, int64_t bias, int64_t relu, bool depthwise) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  SetThreads();
  try {
    ConvGeom g = Geom(xd, wd, yd, sh, sw, pt, pb, pl, pr, bias, relu);
    if (depthwise) g.groups = g.c;
    auto e = GetFwd(g);
    int64_t reps = Prod(xd, 0, xd.size() - 4);
    int64_t xs = Prod(xd, xd.size() - 4, xd.size()), ws = Prod(wd, wd.size() - 4, wd.size());
    int64_t ys = Prod(yd, yd.size() - 4, yd.size());
    auto& s = Stream();
    for (int64_t r = 0; r < reps; ++r) {
      memory xm(e->src, Engine(), x.typed_data() + r * xs), ym(e->dst, Engine(), y->typed_data() + r * ys);
      memory wm = WeightsFor(e->fwd_w, e->user_w, w.typed_data() + r * ws, 0);
      std::unordered_map<int, memory> args{{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, ym},
                                           {DNNL_ARG_SCRATCHPAD, ScratchMem(e->fwd_scratch, 1)}};
      if (g.bias) args[DNNL_ARG_BIAS] = memory(e->bias, Engine(), b.typed_data() + r * g.o);
      e->fwd.execute(s, args);
    }
    s.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string(depthwise ? "lightflax depthwise conv (oneDNN): "
                                                      : "lightflax conv (oneDNN): ") + err.what());
  }
  return ffi::Error::Success();
}

// Handlers: dense (counter 0) and depthwise (counter 7).
template <bool kDepthwise>
ffi::Error ConvFwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                       int64_t pr, int64_t bias, int64_t relu) {
  if (auto err = CheckConv(x.dimensions(), w.dimensions(), y->dimensions(), kDepthwise); err.failure()) return err;
  Timed timed(kDepthwise ? 7 : 0);
  return ConvFwdRun(x, w, b, y, sh, sw, pt, pb, pl, pr, bias, relu, kDepthwise);
}

// ---------------------------------------------------------------------------
// Depthwise convolution (groups = channels, depth multiplier 1)
// ---------------------------------------------------------------------------
// x (N, H, W, C), w (KH, KW, 1, C) as lax.conv_general_dilated(feature_group_count=C) takes it,
// b (C,) -> y (N, OH, OW, C). Backward: ConvBwd with groups = C (LfDwConvBwd, LfDwConvBwdW).

// dy, x, w, y (the forward output: ReLU mask when relu) -> [dx], dw, db.
// The shape checks (and the call counter) are the callers'; depthwise: groups = C.
ffi::Error ConvBwd(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::Buffer<ffi::F32> y, float* dx, float* dw, float* db, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr, int64_t bias, int64_t relu, bool depthwise) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = dy.dimensions();
  SetThreads();
  try {
    ConvGeom g = Geom(xd, wd, yd, sh, sw, pt, pb, pl, pr, bias, relu);
    if (depthwise) g.groups = g.c;
    auto e = GetBwd(g);
    int64_t reps = Prod(xd, 0, xd.size() - 4);
    int64_t xs = Prod(xd, xd.size() - 4, xd.size()), ws = Prod(wd, wd.size() - 4, wd.size());
    int64_t ys = Prod(yd, yd.size() - 4, yd.size());
    auto& s = Stream();
    for (int64_t r = 0; r < reps; ++r) {
      float* g_ptr = dy.typed_data() + r * ys;
      int64_t rows = ys / g.o;
      std::vector<double> bsum(g.o);
      if (g.relu) {  // dy * (y > 0), the ReLU post-op's gradient, and (bias) its channel sums
        float* masked = Scratch(2, ys * sizeof(float));
        lf::loops::MaskSumsRun(g_ptr, y.typed_data() + r * ys, rows, g.o, true, masked, bsum.data());
        g_ptr = masked;
      } else if (g.bias) {
        lf::loops::MaskSumsRun(g_ptr, g_ptr, rows, g.o, false, nullptr, bsum.data());
      }
      for (int64_t k = 0; k < g.o; ++k) db[r * g.o + k] = g.bias ? (float)bsum[k] : 0.f;
      memory dym(e->dst, Engine(), g_ptr), xm(e->src, Engine(), x.typed_data() + r * xs);
      if (dx != nullptr) {
        memory wm = WeightsFor(e->bwd_data_w, e->user_w, w.typed_data() + r * ws, 0);
        memory dxm(e->src, Engine(), dx + r * xs);
        e->bwd_data.execute(s, {{DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DIFF_SRC, dxm},
                                {DNNL_ARG_SCRATCHPAD, ScratchMem(e->bwd_data_scratch, 1)}});
      }
      memory dwu(e->user_w, Engine(), dw + r * ws);
      memory dwm = dwu;
      bool reorder = !(e->bwd_weights_w == e->user_w);
      if (reorder) dwm = memory(e->bwd_weights_w, Engine(), Scratch(0, e->bwd_weights_w.get_size()));
      std::unordered_map<int, memory> args{{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, dym},
                                           {DNNL_ARG_DIFF_WEIGHTS, dwm},
                                           {DNNL_ARG_SCRATCHPAD, ScratchMem(e->bwd_weights_scratch, 1)}};
      e->bwd_weights.execute(s, args);
      if (reorder) dnnl::reorder(dwm, dwu).execute(s, dwm, dwu);
    }
    s.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("lightflax conv backward (oneDNN): ") + err.what());
  }
  return ffi::Error::Success();
}

// Handlers: dense (counter 1) and depthwise (counter 8), with dx (BwdImpl) or without (BwdWImpl:
// the input needs no gradient, e.g. the image).
template <bool kDepthwise>
ffi::Error ConvBwdImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::Buffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw,
                       ffi::ResultBuffer<ffi::F32> db, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                       int64_t pr, int64_t bias, int64_t relu) {
  if (auto err = CheckConv(x.dimensions(), w.dimensions(), dy.dimensions(), kDepthwise); err.failure()) return err;
  Timed timed(kDepthwise ? 8 : 1);
  return ConvBwd(dy, x, w, y, dx->typed_data(), dw->typed_data(), db->typed_data(), sh, sw, pt, pb, pl, pr, bias,
                 relu, kDepthwise);
}

template <bool kDepthwise>
ffi::Error ConvBwdWImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> dw, ffi::ResultBuffer<ffi::F32> db,
                        int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t bias,
                        int64_t relu) {
  if (auto err = CheckConv(x.dimensions(), w.dimensions(), dy.dimensions(), kDepthwise); err.failure()) return err;
  Timed timed(kDepthwise ? 8 : 1);
  return ConvBwd(dy, x, w, y, nullptr, dw->typed_data(), db->typed_data(), sh, sw, pt, pb, pl, pr, bias, relu,
                 kDepthwise);
}

// ---------------------------------------------------------------------------
// Batch normalization over (N, H, W) per channel; x viewed as (reps, m, c).
// Sums are accumulated in double; per-thread partials are added in a fixed
// order, so results do not depend on scheduling.
// ---------------------------------------------------------------------------

struct BnView {
  int64_t reps, m, c;
};

BnView View(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> pd) {
  size_t p = pd.size() - 1;  // leading dims of the per-channel operands
  return BnView{Prod(xd, 0, p), Prod(xd, p, xd.size() - 1), xd[xd.size() - 1]};
}

// The statistics and loops: loops_ops.h (one pass for mean and variance, ISA-dispatched loops).
// The local statistics of the cross-device path (ops.py merges them across devices):
// mode 0: mean of x -> out; mode 1: mean of (x - mean)^2 around the given (merged) mean -> out.
// Both are the arithmetic of BnTrainImpl's statistics (lf::loops::BnStats), so that the merge over
// one device reproduces BnTrainImpl bit for bit, and a constant channel has mean == its value and
// variance 0 on any number of devices.
ffi::Error BnReduceImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> out,
                        int64_t mode) {
  Timed timed(4);
  SetThreads();
  BnView v = View(x.dimensions(), mean.dimensions());
  for (int64_t r = 0; r < v.reps; ++r) {
    const float* xr = x.typed_data() + r * v.m * v.c;
    float* o = out->typed_data() + r * v.c;
    if (mode == 0)
      lf::loops::BnStats(xr, v.m, v.c, 0, nullptr, o, nullptr);
    else
      lf::loops::BnStats(xr, v.m, v.c, 1, mean.typed_data() + r * v.c, nullptr, o);
  }
  return ffi::Error::Success();
}

// Training forward on local statistics: -> y, mean, var (biased). Two passes over x: the
// statistics (one pass), then the normalisation.
ffi::Error BnTrainImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                       ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                       ffi::ResultBuffer<ffi::F32> var, float eps, int64_t relu) {
  Timed timed(2);
  SetThreads();
  BnView v = View(x.dimensions(), scale.dimensions());
  for (int64_t r = 0; r < v.reps; ++r) {
    const float* xr = x.typed_data() + r * v.m * v.c;
    float* mr = mean->typed_data() + r * v.c;
    float* vr = var->typed_data() + r * v.c;
    lf::loops::BnStats(xr, v.m, v.c, 2, nullptr, mr, vr);
    lf::loops::BnApplyRun(xr, v.m, v.c, mr, vr, scale.typed_data() + r * v.c, bias.typed_data() + r * v.c, eps,
                          relu != 0, y->typed_data() + r * v.m * v.c);
  }
  return ffi::Error::Success();
}

// Forward with given statistics (inference, or training after a cross-device mean).
ffi::Error BnApplyImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var,
                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                       float eps, int64_t relu) {
  Timed timed(2);
  SetThreads();
  BnView v = View(x.dimensions(), scale.dimensions());
  for (int64_t r = 0; r < v.reps; ++r)
    lf::loops::BnApplyRun(x.typed_data() + r * v.m * v.c, v.m, v.c, mean.typed_data() + r * v.c,
                          var.typed_data() + r * v.c, scale.typed_data() + r * v.c, bias.typed_data() + r * v.c, eps,
                          relu != 0, y->typed_data() + r * v.m * v.c);
  return ffi::Error::Success();
}

// g = dy * (y > 0) when relu, else dy; xhat = (x - mean) * rsqrt(var + eps).
// sums: sg = sum g, sgx = sum g * xhat (per channel).
void BnBwdSums(const float* dy, const float* x, const float* y, const float* mean, const float* var, float eps,
               bool relu, int64_t m, int64_t c, double* sg, double* sgx) {
  lf::loops::BnBwdSumsRun(dy, x, y, m, c, mean, var, eps, relu, sg, sgx);
}

// dx (see lf::loops::BnBwdApplyRun).
void BnBwdApply(const float* dy, const float* x, const float* y, const float* mean, const float* var,
                const float* scale, const float* sg, const float* sgx, float eps, bool relu, bool train,
                double count, int64_t m, int64_t c, float* dx) {
  lf::loops::BnBwdApplyRun(dy, x, y, m, c, mean, var, scale, sg, sgx, eps, relu, train, count, dx);
}

// Local sums for the backward pass (cross-device: psum them, then BnBwdApply).
ffi::Error BnBwdReduceImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> y,
                           ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var, ffi::ResultBuffer<ffi::F32> sg,
                           ffi::ResultBuffer<ffi::F32> sgx, float eps, int64_t relu) {
  Timed timed(4);
  SetThreads();
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

ffi::Error BnBwdApplyImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> y,
                          ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var, ffi::Buffer<ffi::F32> scale,
                          ffi::Buffer<ffi::F32> sg, ffi::Buffer<ffi::F32> sgx, ffi::ResultBuffer<ffi::F32> dx,
                          float eps, int64_t relu, int64_t train, double count) {
  Timed timed(3);
  SetThreads();
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
ffi::Error BnBwdImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> y,
                     ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var, ffi::Buffer<ffi::F32> scale,
                     ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                     ffi::ResultBuffer<ffi::F32> dbias, float eps, int64_t relu, int64_t train) {
  Timed timed(3);
  SetThreads();
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

// ---------------------------------------------------------------------------
// 2x2 max pooling, stride 2, VALID (floor). x viewed as (n, h, w, c).
// Ties: the gradient goes to the FIRST maximal element in row-major order.
// ---------------------------------------------------------------------------

ffi::Error PoolFwdImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  Timed timed(5);
  SetThreads();
  auto xd = x.dimensions();
  size_t r = xd.size();
  lf::loops::PoolFwdRun(x.typed_data(), Prod(xd, 0, r - 3), xd[r - 3], xd[r - 2], xd[r - 1], y->typed_data());
  return ffi::Error::Success();
}

// The gradient goes to the FIRST element equal to the window's maximum (row-major), as XLA's
// select-and-scatter and lightflax.kernels.max_pool_2x2; a NaN window passes none.
ffi::Error PoolBwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx) {
  Timed timed(6);
  SetThreads();
  auto xd = x.dimensions();
  size_t r = xd.size();
  lf::loops::PoolBwdRun(x.typed_data(), dy.typed_data(), Prod(xd, 0, r - 3), xd[r - 3], xd[r - 2], xd[r - 1],
                        dx->typed_data());
  return ffi::Error::Success();
}

}  // namespace

#define CONV_ATTRS                                                                                        \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pb").Attr<int64_t>("pl") \
      .Attr<int64_t>("pr").Attr<int64_t>("bias").Attr<int64_t>("relu")
#define F32 ffi::Buffer<ffi::F32>

XLA_FFI_DEFINE_HANDLER_SYMBOL(LfConvFwd, ConvFwdImpl<false>,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>() CONV_ATTRS);
#define CONV_BWD_BINDING \
  ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>().Ret<F32>().Ret<F32>() CONV_ATTRS
#define CONV_BWD_W_BINDING \
  ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>().Ret<F32>() CONV_ATTRS
XLA_FFI_DEFINE_HANDLER_SYMBOL(LfConvBwd, ConvBwdImpl<false>, CONV_BWD_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LfConvBwdW, ConvBwdWImpl<false>, CONV_BWD_W_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LfDwConvBwd, ConvBwdImpl<true>, CONV_BWD_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LfDwConvBwdW, ConvBwdWImpl<true>, CONV_BWD_W_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LfBnReduce, BnReduceImpl,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>().Attr<int64_t>("mode"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LfBnTrain, BnTrainImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LfBnApply, BnApplyImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LfBnBwdReduce, BnBwdReduceImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LfBnBwdApply, BnBwdApplyImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("train")
                                  .Attr<double>("count"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LfBnBwd, BnBwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("train"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(LfDwConvFwd, ConvFwdImpl<true>,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LfPoolFwd, PoolFwdImpl, ffi::Ffi::Bind().Arg<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(LfPoolBwd, PoolBwdImpl, ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>());

LF_EXPORT int64_t lightflax_native_abi() { return kAbiVersion; }
// The oneDNN major.minor this library was compiled against, and the one it runs with.
LF_EXPORT int64_t lightflax_native_dnnl_built() { return DNNL_VERSION_MAJOR * 100 + DNNL_VERSION_MINOR; }
LF_EXPORT int64_t lightflax_native_dnnl_runtime() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 100 + v->minor;
}
// The instruction set of the hand-written loops (loops.h): 0 baseline x86-64, 1 AVX2 + FMA.
// set_isa(-1) picks the best the CPU has (the default); returns the one in use.
LF_EXPORT int64_t lightflax_native_set_isa(int64_t want) { return lf::loops::SetIsa((int)want); }
LF_EXPORT int64_t lightflax_native_isa() { return lf::loops::Isa(); }
LF_EXPORT void lightflax_native_set_threads(int64_t n) { g_threads = (int)n; }
LF_EXPORT int64_t lightflax_native_get_threads() { return g_threads.load(); }
LF_EXPORT int64_t lightflax_native_primitives() { return g_primitives.load(); }
LF_EXPORT int64_t lightflax_native_calls(int64_t i) { return (i >= 0 && i < kCounters) ? g_calls[i].load() : -1; }
LF_EXPORT int64_t lightflax_native_time_ns(int64_t i) { return (i >= 0 && i < kCounters) ? g_ns[i].load() : -1; }
LF_EXPORT void lightflax_native_reset_calls() {
  for (auto& c : g_calls) c = 0;
  for (auto& t : g_ns) t = 0;
}
