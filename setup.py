"""Build: the optional native kernel library (lightflax/native/csrc, XLA FFI over oneDNN), and the
optional large-block reuse layer (lightflax/native/csrc/alloc, plain C, no dependencies).

Everything else is declared in setup.cfg. The extension is OPTIONAL: without oneDNN
(``apt-get install -y libdnnl-dev``), a C++17 compiler or jax's FFI headers the build
prints one warning and lightflax installs without it (XLA's kernels; see docs/native.md).
"""

import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def build_extension(self, ext):
        if ext.name.endswith("_reuse_alloc"):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                self.warn(f"lightflax: large-block reuse layer not built ({type(e).__name__}: {e}); "
                          "XLA's buffers will use plain malloc")
            return
        try:
            import jax.ffi

            ext.include_dirs.append(jax.ffi.include_dir())
        except Exception as e:  # noqa: BLE001 - any failure means "no native kernels"
            self.warn(f"lightflax: native kernels not built: no XLA FFI headers from jax ({e}); "
                      "lightflax will use XLA's kernels")
            return
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            self.warn(f"lightflax: native kernels not built ({type(e).__name__}: {e}); lightflax will use "
                      "XLA's kernels. For them: apt-get install -y libdnnl-dev g++, then reinstall")


setup(
    ext_modules=[
        # Not a Python module: a plain C library that the entry points preload (LD_PRELOAD) so that
        # XLA:CPU's large per-step buffers are reused instead of faulted in again (lightflax/reuse_alloc.py).
        Extension(
            "lightflax.native._lightflax_reuse_alloc",
            sources=["lightflax/native/csrc/alloc/reuse.c"],
            language="c",
            extra_compile_args=["-O2", "-Wall"],
            libraries=["dl", "pthread"],
            optional=True,
        ),
        Extension(
            "lightflax.native._lightflax_native",
            sources=sorted(glob.glob("lightflax/native/csrc/*.cc")),
            depends=sorted(glob.glob("lightflax/native/csrc/*.h") + glob.glob("lightflax/native/csrc/*.inc")),
            language="c++",
            extra_compile_args=["-std=c++17", "-O3", "-fopenmp", "-Wno-attributes", "-Wno-return-type"],
            extra_link_args=["-fopenmp"],
            libraries=["dnnl"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
