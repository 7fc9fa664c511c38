"""lightflax worker: the trainer's own compiled train step (same model, batch, Adam).

    python lightflax_worker.py --model=xray_light --k=5 --size=128 --batch=64 [--impl=einsum] [--kernels=xla]
        [--threads=2]   (threads per native call; default: the library's)
        [--reuse_alloc=0]   (plain malloc for XLA's buffers: the large-block reuse layer off)
        [--runtime=openmp]   (the native runtime: pool (default) or openmp, the previous one)
"""

import os
import sys

from worker_protocol import parse_args, serve  # lightflax itself: the installed package


def main():
    a = parse_args(("--impl", {"default": None}), ("--dtype", {"default": "float32"}),
                   ("--kernels", {"default": "native", "choices": ["native", "xla"]}),
                   ("--threads", {"type": int, "default": None}),
                   ("--runtime", {"default": None, "choices": ["pool", "openmp"]}),
                   ("--huge_pages", {"type": int, "default": 0, "choices": [0, 1]}),
                   ("--reuse_alloc", {"type": int, "default": 1, "choices": [0, 1]}))

    def build():
        import jax

        from lightflax import native, param_counts, reuse_alloc, speed, timing

        kwargs = {"k": a.k} if a.model == "xray_light" else {}
        if a.impl:
            kwargs["impl"] = a.impl
        native.set_kernels(a.kernels)
        if a.threads:
            native.set_threads(a.threads)
        if a.runtime:
            native.set_runtime(a.runtime)
        used = native.status()["kernels"]
        v = speed.model_variant(a.model, kwargs, batch=a.batch, size=a.size, dtype=a.dtype)
        args = [v.args]

        def step():
            out = timing.sync(v.compiled.compiled(*args[0]))
            args[0] = v.next_args(out, args[0])

        state = v.args[0]
        counts = param_counts.variables_counts({"params": state.params, "batch_stats": state.batch_stats})
        return step, {"framework": f"lightflax {used} (jax {jax.__version__})" + (f" impl={a.impl}" if a.impl else "")
                                   + (f" threads={a.threads}" if a.threads else "")
                                   + (f" runtime={a.runtime}" if a.runtime else "")
                                   + (" huge_pages=1" if a.huge_pages else "")
                                   + ("" if a.reuse_alloc else " reuse_alloc=0"),
                      "allocator": reuse_alloc.status()["allocator"],
                      "total_params": counts["total"], "trainable_params": counts["trainable"],
                      "compile_s": v.compiled.compile_s}

    serve(build)


if __name__ == "__main__":
    from lightflax import huge_pages, reuse_alloc, startup

    if "--huge_pages=1" in sys.argv:  # the opt-in variant (lightflax/huge_pages.py)
        os.environ[huge_pages.ENV_SWITCH] = "1"
    if "--reuse_alloc=0" in sys.argv:  # the layer off (lightflax/reuse_alloc.py)
        os.environ[reuse_alloc.ENV_SWITCH] = "0"
    startup.reexec_if_useful()  # as launch.py does
    main()
