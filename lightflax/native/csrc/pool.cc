// 2x2 max pooling, stride 2, VALID (floor); x viewed as (n, h, w, c): loops_ops.h's loops (per
// instruction set, chunks of output rows over lf::ParallelFor).
// Ties: the gradient goes to the FIRST maximal element in row-major order.
#include "handlers.h"
#include "loops_ops.h"
#include "parallel.h"

namespace lf {

ffi::Error PoolFwdImpl(F32Buf x, F32Ret y) {
  Timed timed(kPoolFwd);
  EnterCall();
  auto xd = x.dimensions();
  size_t r = xd.size();
  loops::PoolFwdRun(x.typed_data(), Prod(xd, 0, r - 3), xd[r - 3], xd[r - 2], xd[r - 1], y->typed_data());
  return ffi::Error::Success();
}

// The gradient goes to the FIRST element equal to the window's maximum (row-major), as XLA's
// select-and-scatter and lightflax.kernels.max_pool_2x2; a NaN window passes none. The odd last
// row/column get 0 in the same pass (no zero-fill).
ffi::Error PoolBwdImpl(F32Buf x, F32Buf dy, F32Ret dx) {
  Timed timed(kPoolBwd);
  EnterCall();
  auto xd = x.dimensions();
  size_t r = xd.size();
  loops::PoolBwdRun(x.typed_data(), dy.typed_data(), Prod(xd, 0, r - 3), xd[r - 3], xd[r - 2], xd[r - 1],
                    dx->typed_data());
  return ffi::Error::Success();
}

}  // namespace lf
