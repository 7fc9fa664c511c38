// 2x2 max pooling, stride 2, VALID (floor); x viewed as (n, h, w, c): loops_ops.h's loops (per
// instruction set, chunks of output rows over lf::ParallelFor).
// Ties: the gradient goes to the FIRST maximal element in row-major order.
#include "handlers.h"
#include "loops_ops.h"
#include "parallel.h"

namespace lf {
namespace {

// x (..., h, w, c) and the pooled operand p (..., h/2, w/2, c): equal ranks >= 3, the same leading
// dimensions and channels (XLA calls these only from lightflax.native.ops, which pools NHWC).
ffi::Error CheckPool(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> pd) {
  const size_t r = xd.size();
  if (r < 3 || pd.size() != r)
    return ffi::Error::InvalidArgument("lightflax max pool: operands need equal ranks >= 3 (..., H, W, C)");
  for (size_t i = 0; i + 3 < r; ++i)
    if (xd[i] != pd[i]) return ffi::Error::InvalidArgument("lightflax max pool: leading dimensions differ");
  if (pd[r - 3] != xd[r - 3] / 2 || pd[r - 2] != xd[r - 2] / 2 || pd[r - 1] != xd[r - 1])
    return ffi::Error::InvalidArgument("lightflax max pool: the pooled operand is not (..., H/2, W/2, C)");
  return ffi::Error::Success();
}

}  // namespace

ffi::Error PoolFwdImpl(F32Buf x, F32Ret y) {
  if (auto err = CheckPool(x.dimensions(), y->dimensions()); err.failure()) return err;
  Timed timed(kPoolFwd);
  EnterCall();
  auto xd = x.dimensions();
  size_t r = xd.size();
  loops::PoolFwdRun(x.typed_data(), Prod(xd, 0, r - 3), xd[r - 3], xd[r - 2], xd[r - 1], y->typed_data());
  return ffi::Error::Success();
}

// The gradient goes to the FIRST element equal to the window's maximum (row-major), as XLA's
// select-and-scatter and lightflax.native.xla_pool; a NaN window passes none. The odd last
// row/column get 0 in the same pass (no zero-fill).
ffi::Error PoolBwdImpl(F32Buf x, F32Buf dy, F32Ret dx) {
  if (auto err = CheckPool(x.dimensions(), dy.dimensions()); err.failure()) return err;
  if (dx->dimensions().size() != x.dimensions().size())
    return ffi::Error::InvalidArgument("lightflax max pool backward: dx must have x's shape");
  Timed timed(kPoolBwd);
  EnterCall();
  auto xd = x.dimensions();
  size_t r = xd.size();
  loops::PoolBwdRun(x.typed_data(), dy.typed_data(), Prod(xd, 0, r - 3), xd[r - 3], xd[r - 2], xd[r - 1],
                    dx->typed_data());
  return ffi::Error::Success();
}

}  // namespace lf
