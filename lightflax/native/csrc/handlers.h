// The FFI handler bodies each source file defines; ffi.cc binds them (XLA_FFI_DEFINE_HANDLER_SYMBOL).
#pragma once

#include <exception>
#include <string>

#include "common.h"

namespace lf {

// conv.cc. Dense (kDepthwise false: w HWIO) and depthwise (w (KH, KW, 1, C)) convolutions:
// y = relu?(conv(x, w) + b); backward -> [dx], dw, db (BwdW: no dx).
template <bool kDepthwise>
ffi::Error ConvFwdImpl(F32Buf x, F32Buf w, F32Buf b, F32Ret y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                       int64_t pl, int64_t pr, int64_t bias, int64_t relu);
template <bool kDepthwise>
ffi::Error ConvBwdImpl(F32Buf dy, F32Buf x, F32Buf w, F32Buf y, F32Ret dx, F32Ret dw, F32Ret db, int64_t sh,
                       int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t bias, int64_t relu);
template <bool kDepthwise>
ffi::Error ConvBwdWImpl(F32Buf dy, F32Buf x, F32Buf w, F32Buf y, F32Ret dw, F32Ret db, int64_t sh, int64_t sw,
                        int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t bias, int64_t relu);

// batchnorm.cc
ffi::Error BnReduceImpl(F32Buf x, F32Buf mean, F32Ret out, int64_t mode);
ffi::Error BnTrainImpl(F32Buf x, F32Buf scale, F32Buf bias, F32Ret y, F32Ret mean, F32Ret var, float eps,
                       int64_t relu);
ffi::Error BnApplyImpl(F32Buf x, F32Buf mean, F32Buf var, F32Buf scale, F32Buf bias, F32Ret y, float eps,
                       int64_t relu);
ffi::Error BnBwdReduceImpl(F32Buf dy, F32Buf x, F32Buf y, F32Buf mean, F32Buf var, F32Ret sg, F32Ret sgx,
                           float eps, int64_t relu);
ffi::Error BnBwdApplyImpl(F32Buf dy, F32Buf x, F32Buf y, F32Buf mean, F32Buf var, F32Buf scale, F32Buf sg,
                          F32Buf sgx, F32Ret dx, float eps, int64_t relu, int64_t train, double count);
ffi::Error BnBwdImpl(F32Buf dy, F32Buf x, F32Buf y, F32Buf mean, F32Buf var, F32Buf scale, F32Ret dx,
                     F32Ret dscale, F32Ret dbias, float eps, int64_t relu, int64_t train);

// pool.cc: 2x2 max pooling, stride 2, VALID.
ffi::Error PoolFwdImpl(F32Buf x, F32Ret y);
ffi::Error PoolBwdImpl(F32Buf x, F32Buf dy, F32Ret dx);

// Handler bodies run inside Guarded<Impl>::Run (ffi.cc binds that): an exception (std::bad_alloc from
// a scratch buffer, a dnnl::error a body did not catch) becomes an FFI error that XLA raises in
// Python, never an exception crossing the C boundary (std::terminate).
template <auto Impl>
struct Guarded;
template <class... A, ffi::Error (*Impl)(A...)>
struct Guarded<Impl> {
  static ffi::Error Run(A... a) {
    try {
      return Impl(a...);
    } catch (const std::exception& e) {
      return ffi::Error::Internal(std::string("lightflax native kernel: ") + e.what());
    } catch (...) {
      return ffi::Error::Internal("lightflax native kernel: unknown C++ exception");
    }
  }
};

}  // namespace lf
