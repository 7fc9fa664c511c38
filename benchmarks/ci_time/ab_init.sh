#!/bin/bash
# start_or_resume (the init) seconds, optimisations ON, no persistent cache: old (op by op) vs new (jit)
unset JAX_DISABLE_MOST_OPTIMIZATIONS JAX_COMPILATION_CACHE_DIR
export JAX_PLATFORMS=cpu LIGHTFLAX_NATIVE_THREADS=1
for round in 1 2; do for m in "xray_light --k=5" "xray_conv2d"; do for v in old new; do
  cd /work/ab_$v; rm -rf /tmp/abw
  PYTHONPATH=/work/ab_$v /work/main/.venv/bin/python -m cProfile -o /tmp/ab.prof launch.py --experiment=$m --dataset=synthetic --image_size=64 --synthetic_size=32 --batch_size=8 --epochs=1 --steps_per_epoch=2 --workdir=/tmp/abw > /dev/null 2>&1
  t=$(/work/main/.venv/bin/python -c "
import pstats; s=pstats.Stats('/tmp/ab.prof').stats
print(' '.join(f'{f[2]}={v[3]:.2f}' for f, v in s.items() if f[2] in ('start_or_resume','_train','check_train_step')))")
  echo "round $round $m $v $t"
done; done; done
