"""The C++/CUDA extension ``rmt_fast._C`` (package metadata lives in ``pyproject.toml``).

The extension is built with ninja from ``csrc/``: the C++ sources always, the CUDA sources when
torch has CUDA and ``nvcc`` is found. Environment switches:

* ``RMT_FAST_BUILD_CUDA=1`` / ``0``: force the CUDA sources in / out.
* ``RMT_FAST_REQUIRE_EXT=1``: fail the install if the extension does not build (default: warn and
  install the pure-PyTorch package, which falls back at import time).

The extension is compiled against the torch found at build time: install the torch build you
want first (``pip install torch==2.13.0`` for CPU), then ``pip install --no-build-isolation .``.
"""

import glob
import os
import sys

from setuptools import setup


def _extension_kwargs():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("rmt_fast: torch not found at build time; skipping the rmt_fast._C extension",
              file=sys.stderr)
        return {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp:
        return {}
    force = os.environ.get("RMT_FAST_BUILD_CUDA")
    has_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    use_cuda = bool(cu) and (force == "1" or (force != "0" and has_cuda))
    # torch >= 2.14 headers require C++20; older ones build with C++17
    std = "-std=c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 14) \
        else "-std=c++17"
    # -fno-trapping-math: lets the activation loops vectorise (csrc/activation_math.h)
    cxx = ["-O3", std, "-fopenmp", "-fno-trapping-math"]
    kwargs = dict(sources=cpp + (cu if use_cuda else []), extra_compile_args={"cxx": cxx},
                  extra_link_args=["-fopenmp"])
    if sys.platform.startswith("linux"):
        # libstdc++ ahead of torch's libraries on the link line (setuptools puts `libraries`
        # before the -lc10 -ltorch ... that cpp_extension appends). On one CUDA machine
        # (bench/README.md, GPU check 2026-12-04) an extension linked by Ubuntu's g++ did not need
        # libstdc++.so at all and every C++ exception it threw killed the process; binding the
        # C++ runtime to libstdc++ itself is the suspected cure, not yet confirmed on that machine.
        kwargs["libraries"] = ["stdc++"]
    if use_cuda:
        kwargs["define_macros"] = [("RMT_FAST_WITH_CUDA", None)]
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", std]
        ext = cpp_extension.CUDAExtension("rmt_fast._C", **kwargs)
    else:
        ext = cpp_extension.CppExtension("rmt_fast._C", **kwargs)

    class OptionalBuildExt(cpp_extension.BuildExtension):
        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # the pure-PyTorch fallback still works
                if os.environ.get("RMT_FAST_REQUIRE_EXT") == "1":
                    raise
                print(f"rmt_fast: WARNING: extension {extension.name} failed to build ({exc}); "
                      "installing without it", file=sys.stderr)

    return dict(ext_modules=[ext], cmdclass={"build_ext": OptionalBuildExt.with_options(
        use_ninja=True)})


setup(**_extension_kwargs())
