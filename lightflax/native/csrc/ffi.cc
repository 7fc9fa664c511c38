// XLA FFI bindings of the handlers (one binding macro per family) and the exported C ABI that
// lightflax/native/_loader.py reads with ctypes.
#include <string>

#include "handlers.h"
#include "parallel.h"

namespace ffi = xla::ffi;
using lf::F32Buf;

#define LF_ARGS1 ffi::Ffi::Bind().Arg<F32Buf>()
#define LF_ARGS2 LF_ARGS1.Arg<F32Buf>()
#define LF_ARGS3 LF_ARGS2.Arg<F32Buf>()
#define LF_ARGS4 LF_ARGS3.Arg<F32Buf>()
#define LF_ARGS5 LF_ARGS4.Arg<F32Buf>()
#define LF_ARGS6 LF_ARGS5.Arg<F32Buf>()
#define LF_ARGS8 LF_ARGS6.Arg<F32Buf>().Arg<F32Buf>()
#define LF_RET(b) b.Ret<F32Buf>()

// Convolutions: NARGS inputs, NRETS outputs, then the geometry attributes.
#define LF_CONV_HANDLER(name, impl, args, rets)                                                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                                           \
      name, impl, rets(args).Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pb") \
                      .Attr<int64_t>("pl").Attr<int64_t>("pr").Attr<int64_t>("bias").Attr<int64_t>("relu"))
// BatchNorm: inputs and outputs, then eps and relu, then ATTRS (more attributes, or nothing).
#define LF_BN_HANDLER(name, impl, args_rets, attrs) \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl, args_rets.Attr<float>("eps").Attr<int64_t>("relu") attrs)
// Pooling: inputs and outputs only.
#define LF_POOL_HANDLER(name, impl, args_rets) XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl, args_rets)

#define LF_R1(b) LF_RET(b)
#define LF_R2(b) LF_RET(LF_RET(b))
#define LF_R3(b) LF_RET(LF_RET(LF_RET(b)))
#define LF_NONE

LF_CONV_HANDLER(LfConvFwd, lf::Guarded<lf::ConvFwdImpl<false>>::Run, LF_ARGS3, LF_R1);
LF_CONV_HANDLER(LfDwConvFwd, lf::Guarded<lf::ConvFwdImpl<true>>::Run, LF_ARGS3, LF_R1);
LF_CONV_HANDLER(LfConvBwd, lf::Guarded<lf::ConvBwdImpl<false>>::Run, LF_ARGS4, LF_R3);
LF_CONV_HANDLER(LfConvBwdW, lf::Guarded<lf::ConvBwdWImpl<false>>::Run, LF_ARGS4, LF_R2);
LF_CONV_HANDLER(LfDwConvBwd, lf::Guarded<lf::ConvBwdImpl<true>>::Run, LF_ARGS4, LF_R3);
LF_CONV_HANDLER(LfDwConvBwdW, lf::Guarded<lf::ConvBwdWImpl<true>>::Run, LF_ARGS4, LF_R2);

XLA_FFI_DEFINE_HANDLER_SYMBOL(LfBnReduce, lf::Guarded<lf::BnReduceImpl>::Run, LF_R1(LF_ARGS2).Attr<int64_t>("mode"));
LF_BN_HANDLER(LfBnTrain, lf::Guarded<lf::BnTrainImpl>::Run, LF_R3(LF_ARGS3), LF_NONE);
LF_BN_HANDLER(LfBnApply, lf::Guarded<lf::BnApplyImpl>::Run, LF_R1(LF_ARGS5), LF_NONE);
LF_BN_HANDLER(LfBnBwdReduce, lf::Guarded<lf::BnBwdReduceImpl>::Run, LF_R2(LF_ARGS5), LF_NONE);
LF_BN_HANDLER(LfBnBwdApply, lf::Guarded<lf::BnBwdApplyImpl>::Run, LF_R1(LF_ARGS8), .Attr<int64_t>("train").Attr<double>("count"));
LF_BN_HANDLER(LfBnBwd, lf::Guarded<lf::BnBwdImpl>::Run, LF_R3(LF_ARGS6), .Attr<int64_t>("train"));

LF_POOL_HANDLER(LfPoolFwd, lf::Guarded<lf::PoolFwdImpl>::Run, LF_R1(LF_ARGS1));
LF_POOL_HANDLER(LfPoolBwd, lf::Guarded<lf::PoolBwdImpl>::Run, LF_R1(LF_ARGS2));

LF_EXPORT int64_t lightflax_native_abi() { return lf::kAbiVersion; }
// The oneDNN major.minor this library was compiled against, and the one it runs with.
LF_EXPORT int64_t lightflax_native_dnnl_built() { return DNNL_VERSION_MAJOR * 100 + DNNL_VERSION_MINOR; }
LF_EXPORT int64_t lightflax_native_dnnl_runtime() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 100 + v->minor;
}
LF_EXPORT void lightflax_native_set_threads(int64_t n) { lf::g_threads = (int)n; }
LF_EXPORT int64_t lightflax_native_get_threads() { return lf::g_threads.load(); }
LF_EXPORT int64_t lightflax_native_primitives() { return lf::g_primitives.load(); }
// The counter kinds' names, comma-separated, in counter order (index i of the two functions below).
LF_EXPORT const char* lightflax_native_counter_names() {
  static const std::string names = [] {
    std::string s;
    for (int i = 0; i < lf::kNumCounters; ++i) s += (i ? "," : "") + std::string(lf::kCounterNames[i]);
    return s;
  }();
  return names.c_str();
}
LF_EXPORT int64_t lightflax_native_calls(int64_t i) {
  return (i >= 0 && i < lf::kNumCounters) ? lf::g_calls[i].load() : -1;
}
LF_EXPORT int64_t lightflax_native_time_ns(int64_t i) {
  return (i >= 0 && i < lf::kNumCounters) ? lf::g_ns[i].load() : -1;
}
LF_EXPORT int64_t lightflax_native_parallel_jobs() { return lf::g_parallel_jobs.load(); }
LF_EXPORT void lightflax_native_reset_calls() {
  lf::g_parallel_jobs = 0;
  for (auto& c : lf::g_calls) c = 0;
  for (auto& t : lf::g_ns) t = 0;
}
