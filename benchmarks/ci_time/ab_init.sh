#!/bin/bash
# The init's seconds (cProfile's cumulative start_or_resume), optimisations ON, no persistent cache,
# interleaved: a tree with the op-by-op init (OLD) against one with the jitted init (NEW).
#   bash benchmarks/ci_time/ab_init.sh OLD_TREE NEW_TREE      (python: $PYTHON, default python)
# OLD_TREE/NEW_TREE: checkouts (e.g. `git worktree add`) with their native libraries built or copied.
set -eu
old=$(realpath "$1"); new=$(realpath "$2"); py=${PYTHON:-python}
unset JAX_DISABLE_MOST_OPTIMIZATIONS JAX_COMPILATION_CACHE_DIR
export JAX_PLATFORMS=cpu LIGHTFLAX_NATIVE_THREADS=1
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
for round in 1 2; do for m in "xray_light --k=5" "xray_conv2d"; do for v in old new; do
  tree=$old; [ $v = new ] && tree=$new
  rm -rf "$work/run"
  (cd "$tree" && PYTHONPATH="$tree" "$py" -m cProfile -o "$work/prof" launch.py --experiment=$m --dataset=synthetic \
      --image_size=64 --synthetic_size=32 --batch_size=8 --epochs=1 --steps_per_epoch=2 --workdir="$work/run" >/dev/null 2>&1)
  t=$("$py" -c "
import pstats, sys; s = pstats.Stats(sys.argv[1]).stats
print(' '.join(f'{f[2]}={v[3]:.2f}' for f, v in s.items() if f[2] in ('start_or_resume', '_train', 'check_train_step')))" "$work/prof")
  echo "round $round $m $v $t"
done; done; done
