// Convolutions over oneDNN: the primitive cache, the forward and the backward handlers (dense,
// and depthwise = groups of one channel, depth multiplier 1).
#include <omp.h>

#include <mutex>
#include <unordered_map>

#include "handlers.h"
#include "loops_ops.h"
#include "parallel.h"

namespace lf {
namespace {
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
    po.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    attr.set_post_ops(po);
  }
  if (g.bias)
    return dnnl::convolution_forward::primitive_desc(Engine(), prop, dnnl::algorithm::convolution_direct, e.src,
                                                     w_any, e.bias, e.dst, strides, padl, padr, attr);
  return dnnl::convolution_forward::primitive_desc(Engine(), prop, dnnl::algorithm::convolution_direct, e.src, w_any,
                                                   e.dst, strides, padl, padr, attr);
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
  dnnl::convolution_backward_data::primitive_desc bdp(Engine(), dnnl::algorithm::convolution_direct, e->src, w_any,
                                                      e->dst, strides, padl, padr, hint, attr);
  e->bwd_data = dnnl::convolution_backward_data(bdp);
  e->bwd_data_w = bdp.weights_desc();
  e->bwd_data_scratch = bdp.scratchpad_desc().get_size();
  // No diff_bias in the primitive: oneDNN sums the bias gradient in float32 over n*oh*ow rows,
  // which loses the cancellation of a bias in front of a BatchNorm (exact gradient 0) to ~1e-4 of
  // the model's gradient scale; ConvBwd sums it in double instead, in the pass that applies the
  // ReLU mask.
  dnnl::convolution_backward_weights::primitive_desc wdp(Engine(), dnnl::algorithm::convolution_direct, e->src,
                                                         w_any, e->dst, strides, padl, padr, hint, attr);
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

// A convolution's batch is cut into chunks of b images (the last one `last` <= b images), each run
// by primitives created for its own batch: single-threaded under the chunk runtime, where the
// chunks go to the pool (parallel.h); one chunk of the whole batch on an OpenMP team under
// kOpenMP. The chunking depends on the batch only (BatchChunks), so results do not depend on the
// thread count.
struct Chunking {
  int64_t chunks, b, last;
};

Chunking ChunksOf(int64_t n) {
  int64_t want = std::max<int64_t>(1, BatchChunks(n));
  int64_t b = (n + want - 1) / want, chunks = (n + b - 1) / b;
  return {chunks, b, n - (chunks - 1) * b};
}

ConvGeom WithBatch(ConvGeom g, int64_t n) {
  g.n = n;
  return g;
}

// The first error of any chunk (chunks may run on pool threads, which must not throw).
struct ChunkErrors {
  std::mutex mu;
  std::string what;
  template <class F>
  void Run(F&& f) {
    try {
      f();
    } catch (const std::exception& e) {  // dnnl::error, std::bad_alloc
      std::lock_guard<std::mutex> lk(mu);
      if (what.empty()) what = e.what();
    }
  }
};

// A chunk's own buffer for the weight gradient in the primitive's layout (thread-local).
float* ChunkScratch(size_t bytes) {
  thread_local std::vector<char> buf;
  if (buf.size() < bytes) buf.resize(bytes);
  return reinterpret_cast<float*>(buf.data());
}

// relu?(conv(x, w, groups) + b) for every leading (vmapped) replica: the dense and the depthwise
// forward handlers' common body (their shape checks and call counters differ).
ffi::Error ConvFwdRun(F32Buf x, F32Buf w, F32Buf b, F32Ret y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                      int64_t pl, int64_t pr, int64_t bias, int64_t relu, bool depthwise) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  EnterCall();
  ChunkErrors errors;
  try {
    ConvGeom g = Geom(xd, wd, yd, sh, sw, pt, pb, pl, pr, bias, relu);
    if (depthwise) g.groups = g.c;
    if (g.n == 0) return ffi::Error::Success();  // an empty batch: nothing to write
    const Chunking ch = ChunksOf(g.n);
    const std::shared_ptr<ConvEntry> e[2] = {GetFwd(WithBatch(g, ch.b)), GetFwd(WithBatch(g, ch.last))};
    int64_t reps = Prod(xd, 0, xd.size() - 4);
    int64_t xs = Prod(xd, xd.size() - 4, xd.size()), ws = Prod(wd, wd.size() - 4, wd.size());
    int64_t ys = Prod(yd, yd.size() - 4, yd.size()), xi = xs / g.n, yi = ys / g.n;
    for (int64_t r = 0; r < reps; ++r) {
      memory wm[2];
      wm[0] = WeightsFor(e[0]->fwd_w, e[0]->user_w, w.typed_data() + r * ws, 0);
      wm[1] = e[1]->fwd_w == e[0]->fwd_w ? wm[0]
                                          : WeightsFor(e[1]->fwd_w, e[1]->user_w, w.typed_data() + r * ws, 3);
      ParallelChunks(ch.chunks, [&](int64_t k, int) {
        errors.Run([&] {
          const bool last = k + 1 == ch.chunks;
          const ConvEntry& ek = *e[last];
          const int64_t off = k * ch.b;
          memory xm(ek.src, Engine(), x.typed_data() + r * xs + off * xi);
          memory ym(ek.dst, Engine(), y->typed_data() + r * ys + off * yi);
          std::unordered_map<int, memory> args{{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm[last]}, {DNNL_ARG_DST, ym},
                                               {DNNL_ARG_SCRATCHPAD, ScratchMem(ek.fwd_scratch, 1)}};
          if (g.bias) args[DNNL_ARG_BIAS] = memory(ek.bias, Engine(), b.typed_data() + r * g.o);
          ek.fwd.execute(Stream(), args);
          Stream().wait();
        });
      });
    }
  } catch (const std::exception& err) {  // dnnl::error, std::bad_alloc
    errors.what = err.what();
  }
  if (errors.what.empty()) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(depthwise ? "lightflax depthwise conv (oneDNN): " : "lightflax conv (oneDNN): ") +
                              errors.what);
}


// ---------------------------------------------------------------------------
// Depthwise convolution (groups = channels, depth multiplier 1)
// ---------------------------------------------------------------------------
// x (N, H, W, C), w (KH, KW, 1, C) as lax.conv_general_dilated(feature_group_count=C) takes it,
// b (C,) -> y (N, OH, OW, C). Backward: ConvBwd with groups = C (LfDwConvBwd, LfDwConvBwdW).

// dy, x, w, y (the forward output: ReLU mask when relu) -> [dx], dw, db.
// The shape checks (and the call counter) are the callers'; depthwise: groups = C.
// One chunk's weight gradient, into its own plain (user-layout) partial `part`: the caller adds the
// partials in chunk order.
void BwdWeightsChunk(const ConvEntry& ek, const memory& xm, const memory& dym, float* part) {
  memory dwu(ek.user_w, Engine(), part);
  memory dwm = dwu;
  const bool reorder = !(ek.bwd_weights_w == ek.user_w);
  if (reorder) dwm = memory(ek.bwd_weights_w, Engine(), ChunkScratch(ek.bwd_weights_w.get_size()));
  ek.bwd_weights.execute(Stream(), {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_DIFF_WEIGHTS, dwm},
                                    {DNNL_ARG_SCRATCHPAD, ScratchMem(ek.bwd_weights_scratch, 1)}});
  if (reorder) dnnl::reorder(dwm, dwu).execute(Stream(), dwm, dwu);
  Stream().wait();
}

// dw = the chunks' partials added in chunk order (in double, rounded once).
void AddPartials(const float* parts, int64_t chunks, int64_t n, float* out) {
  if (chunks == 1) {
    std::copy(parts, parts + n, out);
    return;
  }
  ParallelFor(n, [&](int64_t j, int) {
    double s = 0.0;
    for (int64_t k = 0; k < chunks; ++k) s += parts[k * n + j];
    out[j] = (float)s;
  }, 4096);
}

// The gradient the primitives take: dy * (y > 0) when relu (the ReLU post-op's gradient, into the
// caller's scratch), else dy; db = its channel sums when bias (in double), else 0.
const float* MaskedBiasGrad(const float* gy, const float* yy, const ConvGeom& g, int64_t rows, float* db) {
  std::vector<double> bsum(g.o);
  const float* out = gy;
  if (g.relu) {  // loops_ops.h: per instruction set, chunk-order double sums
    float* masked = Scratch(2, rows * g.o * sizeof(float));
    loops::MaskSumsRun(gy, yy, rows, g.o, true, masked, bsum.data());
    out = masked;
  } else if (g.bias) {
    loops::MaskSumsRun(gy, gy, rows, g.o, false, nullptr, bsum.data());
  }
  for (int64_t k = 0; k < g.o; ++k) db[k] = g.bias ? (float)bsum[k] : 0.f;
  return out;
}

ffi::Error ConvBwd(F32Buf dy, F32Buf x, F32Buf w, F32Buf y, float* dx, float* dw, float* db, int64_t sh, int64_t sw,
                   int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t bias, int64_t relu, bool depthwise) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = dy.dimensions();
  EnterCall();
  ChunkErrors errors;
  try {
    ConvGeom g = Geom(xd, wd, yd, sh, sw, pt, pb, pl, pr, bias, relu);
    if (depthwise) g.groups = g.c;
    if (g.n == 0) {  // an empty batch: zero weight and bias gradients
      std::fill(dw, dw + Prod(wd, 0, wd.size()), 0.f);
      std::fill(db, db + Prod(xd, 0, xd.size() - 4) * g.o, 0.f);
      return ffi::Error::Success();
    }
    const Chunking ch = ChunksOf(g.n);
    const std::shared_ptr<ConvEntry> e[2] = {GetBwd(WithBatch(g, ch.b)), GetBwd(WithBatch(g, ch.last))};
    int64_t reps = Prod(xd, 0, xd.size() - 4);
    int64_t xs = Prod(xd, xd.size() - 4, xd.size()), ws = Prod(wd, wd.size() - 4, wd.size());
    int64_t ys = Prod(yd, yd.size() - 4, yd.size()), xi = xs / g.n, yi = ys / g.n;
    float* parts = Scratch(3, (size_t)ch.chunks * ws * sizeof(float));
    for (int64_t r = 0; r < reps; ++r) {
      const float* g_ptr = MaskedBiasGrad(dy.typed_data() + r * ys, y.typed_data() + r * ys, g, ys / g.o, db + r * g.o);
      memory wm[2];
      if (dx != nullptr) {
        wm[0] = WeightsFor(e[0]->bwd_data_w, e[0]->user_w, w.typed_data() + r * ws, 0);
        wm[1] = e[1]->bwd_data_w == e[0]->bwd_data_w ? wm[0] : memory(e[1]->bwd_data_w, Engine());
        if (!(e[1]->bwd_data_w == e[0]->bwd_data_w)) {
          memory wu(e[1]->user_w, Engine(), w.typed_data() + r * ws);
          dnnl::reorder(wu, wm[1]).execute(Stream(), wu, wm[1]);
        }
      }
      ParallelChunks(ch.chunks, [&](int64_t k, int) {
        errors.Run([&] {
          const bool last = k + 1 == ch.chunks;
          const ConvEntry& ek = *e[last];
          const int64_t off = k * ch.b;
          memory dym(ek.dst, Engine(), const_cast<float*>(g_ptr) + off * yi);
          memory xm(ek.src, Engine(), x.typed_data() + r * xs + off * xi);
          if (dx != nullptr) {
            memory dxm(ek.src, Engine(), dx + r * xs + off * xi);
            ek.bwd_data.execute(Stream(), {{DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_WEIGHTS, wm[last]},
                                           {DNNL_ARG_DIFF_SRC, dxm},
                                           {DNNL_ARG_SCRATCHPAD, ScratchMem(ek.bwd_data_scratch, 1)}});
          }
          BwdWeightsChunk(ek, xm, dym, parts + k * ws);
        });
      });
      AddPartials(parts, ch.chunks, ws, dw + r * ws);
    }
  } catch (const std::exception& err) {  // dnnl::error, std::bad_alloc
    errors.what = err.what();
  }
  if (errors.what.empty()) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("lightflax conv backward (oneDNN): ") + errors.what);
}

}  // namespace

// Handlers: dense (counter 0) and depthwise (counter 7).
template <bool kDepthwise>
ffi::Error ConvFwdImpl(F32Buf x, F32Buf w, F32Buf b,
                       F32Ret y, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                       int64_t pr, int64_t bias, int64_t relu) {
  if (auto err = CheckConv(x.dimensions(), w.dimensions(), y->dimensions(), kDepthwise); err.failure()) return err;
  Timed timed(kDepthwise ? kDwConvFwd : kConvFwd);
  return ConvFwdRun(x, w, b, y, sh, sw, pt, pb, pl, pr, bias, relu, kDepthwise);
}

// Handlers: dense (counter 1) and depthwise (counter 8), with dx (BwdImpl) or without (BwdWImpl:
// the input needs no gradient, e.g. the image).
template <bool kDepthwise>
ffi::Error ConvBwdImpl(F32Buf dy, F32Buf x, F32Buf w,
                       F32Buf y, F32Ret dx, F32Ret dw,
                       F32Ret db, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                       int64_t pr, int64_t bias, int64_t relu) {
  if (auto err = CheckConv(x.dimensions(), w.dimensions(), dy.dimensions(), kDepthwise); err.failure()) return err;
  Timed timed(kDepthwise ? kDwConvBwd : kConvBwd);
  return ConvBwd(dy, x, w, y, dx->typed_data(), dw->typed_data(), db->typed_data(), sh, sw, pt, pb, pl, pr, bias,
                 relu, kDepthwise);
}

template <bool kDepthwise>
ffi::Error ConvBwdWImpl(F32Buf dy, F32Buf x, F32Buf w,
                        F32Buf y, F32Ret dw, F32Ret db,
                        int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t bias,
                        int64_t relu) {
  if (auto err = CheckConv(x.dimensions(), w.dimensions(), dy.dimensions(), kDepthwise); err.failure()) return err;
  Timed timed(kDepthwise ? kDwConvBwd : kConvBwd);
  return ConvBwd(dy, x, w, y, nullptr, dw->typed_data(), db->typed_data(), sh, sw, pt, pb, pl, pr, bias, relu,
                 kDepthwise);
}

template ffi::Error ConvFwdImpl<false>(F32Buf, F32Buf, F32Buf, F32Ret, int64_t, int64_t, int64_t, int64_t, int64_t,
                                       int64_t, int64_t, int64_t);
template ffi::Error ConvFwdImpl<true>(F32Buf, F32Buf, F32Buf, F32Ret, int64_t, int64_t, int64_t, int64_t, int64_t,
                                      int64_t, int64_t, int64_t);
template ffi::Error ConvBwdImpl<false>(F32Buf, F32Buf, F32Buf, F32Buf, F32Ret, F32Ret, F32Ret, int64_t, int64_t,
                                       int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
template ffi::Error ConvBwdImpl<true>(F32Buf, F32Buf, F32Buf, F32Buf, F32Ret, F32Ret, F32Ret, int64_t, int64_t,
                                      int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
template ffi::Error ConvBwdWImpl<false>(F32Buf, F32Buf, F32Buf, F32Buf, F32Ret, F32Ret, int64_t, int64_t, int64_t,
                                        int64_t, int64_t, int64_t, int64_t, int64_t);
template ffi::Error ConvBwdWImpl<true>(F32Buf, F32Buf, F32Buf, F32Buf, F32Ret, F32Ret, int64_t, int64_t, int64_t,
                                       int64_t, int64_t, int64_t, int64_t, int64_t);

}  // namespace lf
