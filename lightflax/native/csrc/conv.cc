// Convolutions over oneDNN: the primitive cache, the forward and the backward handlers (dense,
// and depthwise = groups of one channel, depth multiplier 1).
#include <mutex>
#include <unordered_map>

#include "handlers.h"
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
  for (int64_t v : {(int64_t)kind, (int64_t)NumThreads(), g.n, g.h, g.w, g.c, g.kh, g.kw, g.o, g.oh,
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
ffi::Error ConvFwdRun(F32Buf x, F32Buf w, F32Buf b,
                      F32Ret y, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                      int64_t pr, int64_t bias, int64_t relu, bool depthwise) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  EnterCall();
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


// ---------------------------------------------------------------------------
// Depthwise convolution (groups = channels, depth multiplier 1)
// ---------------------------------------------------------------------------
// x (N, H, W, C), w (KH, KW, 1, C) as lax.conv_general_dilated(feature_group_count=C) takes it,
// b (C,) -> y (N, OH, OW, C). Backward: ConvBwd with groups = C (LfDwConvBwd, LfDwConvBwdW).

// dy, x, w, y (the forward output: ReLU mask when relu) -> [dx], dw, db.
// The shape checks (and the call counter) are the callers'; depthwise: groups = C.
ffi::Error ConvBwd(F32Buf dy, F32Buf x, F32Buf w,
                   F32Buf y, float* dx, float* dw, float* db, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr, int64_t bias, int64_t relu, bool depthwise) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = dy.dimensions();
  EnterCall();
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
        const float* yy = y.typed_data() + r * ys;
        const float* gg = g_ptr;
        ChannelSums(rows, g.o, bsum.data(), [&](int64_t i, int64_t k) {
          int64_t j = i * g.o + k;
          float v = Mask(gg[j], yy[j]);
          masked[j] = v;
          return v;
        });
        g_ptr = masked;
      } else if (g.bias) {
        const float* gg = g_ptr;
        ChannelSums(rows, g.o, bsum.data(), [&](int64_t i, int64_t k) { return gg[i * g.o + k]; });
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
