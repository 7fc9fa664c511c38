"""Build: the optional native kernel library (lightflax/native/csrc, XLA FFI over oneDNN 3.2), and the
optional large-block reuse layer (lightflax/native/csrc/alloc, plain C, no dependencies).

Everything else is declared in setup.cfg. oneDNN comes from PyPI: the headers from the build
requirement ``onednn-devel-cpu-gomp`` (pyproject.toml), the runtime ``libdnnl.so.3`` from the
install requirement ``onednn-cpu-gomp`` (setup.cfg), found here through their installed files
(importlib.metadata), never /usr. At run time lightflax/native/_loader.py loads libdnnl.so.3 from
the installed wheel before the extension. The extension is OPTIONAL: without those wheels, a C++17
compiler or jax's FFI headers the build prints one warning and lightflax installs without it
(XLA's kernels; see docs/native.md).
"""

import glob
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ONEDNN = "2023.2.0"  # oneDNN 3.2: the wheels onednn-cpu-gomp / onednn-devel-cpu-gomp (GNU OpenMP)


def wheel_file(dist: str, suffix: str) -> str:
    """The absolute path of the installed file of distribution `dist` whose path ends with `suffix`."""
    from importlib import metadata

    d = metadata.distribution(dist)  # PackageNotFoundError when the wheel is not installed
    if d.version != ONEDNN:
        raise RuntimeError(f"{dist} {d.version} is installed, lightflax builds against {ONEDNN}")
    for f in d.files or ():  # RECORD paths are relative to site-packages ("../../libdnnl.so.3")
        path = os.path.normpath(os.path.abspath(d.locate_file(f)))
        if path.replace(os.sep, "/").endswith("/" + suffix):
            return path
    raise FileNotFoundError(f"{dist} has no file {suffix}")


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
            hpp = wheel_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp")
            ext.include_dirs.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(hpp))))
            # The runtime library by its full path: the extension then needs "libdnnl.so.3" (its
            # soname), which _loader.py loads from the installed onednn-cpu-gomp wheel.
            ext.extra_objects.append(wheel_file("onednn-cpu-gomp", "lib/libdnnl.so.3"))
        except Exception as e:  # noqa: BLE001 - any failure means "no native kernels"
            self.warn(f"lightflax: native kernels not built: {type(e).__name__}: {e}; lightflax will use "
                      f"XLA's kernels. For them: pip install onednn-devel-cpu-gomp=={ONEDNN}, then reinstall")
            return
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            self.warn(f"lightflax: native kernels not built ({type(e).__name__}: {e}); lightflax will use "
                      "XLA's kernels. For them: a C++17 compiler (e.g. apt-get install -y g++), then reinstall")


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
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
