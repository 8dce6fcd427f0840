"""The C++/CUDA extension ``rmt_fast._C`` (package metadata lives in ``pyproject.toml``).

The extension is built with ninja from ``csrc/``: the C++ sources always, the CUDA sources when
torch has CUDA and ``nvcc`` is found. Environment switches:

* ``RMT_FAST_BUILD_CUDA=1`` / ``0``: force the CUDA sources in / out.
* ``RMT_FAST_REQUIRE_EXT=1``: fail the install if the extension does not build (default: warn and
  install the pure-PyTorch package, which falls back at import time).

The CPU kernels' AVX-512 BF16 and AMX-BF16 paths are compiled only where the C++ compiler and
its assembler can build them (a probe compiles one such function each; GCC 11 with binutils
older than 2.36, for one, has the AMX intrinsics but cannot assemble them); without them the
kernels stop at the next path down, chosen at run time as always (``csrc/cpu_isa.h``).

The extension is compiled against the torch found at build time: install the torch build you
want first (``pip install torch==2.13.0`` for CPU), then ``pip install --no-build-isolation .``.
"""

import glob
import os
import subprocess
import sys
import tempfile

from setuptools import setup

#: one function per optional CPU path, compiled to an object file by :func:`_probe` (so that the
#: assembler sees the instructions too): the macro that turns the path off, and the source
CPU_PATH_PROBES = {
    "RMT_FAST_NO_AVX512_BF16": """
#include <immintrin.h>
#pragma GCC target("avx512f,avx512bf16")
__m512 probe(__m512 acc, __m512 a, __m512 b) {
  const __m512bh x = _mm512_cvtne2ps_pbh(a, b);
  return _mm512_dpbf16_ps(acc, x, x);
}
""",
    "RMT_FAST_NO_AMX": """
#include <immintrin.h>
#pragma GCC target("amx-tile,amx-bf16")
void probe(const void* config, const void* a, void* c) {
  _tile_loadconfig(config);
  _tile_loadd(0, a, 64);
  _tile_loadd(1, a, 64);
  _tile_loadd(2, c, 64);
  _tile_dpbf16ps(2, 0, 1);
  _tile_stored(2, c, 64);
  _tile_release();
}
""",
}


def _probe(cxx: str, source: str) -> bool:
    """Whether ``cxx`` compiles and assembles ``source`` (C++) into an object file."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        try:
            done = subprocess.run([cxx, "-c", "-O2", src, "-o", os.path.join(tmp, "probe.o")],
                                  capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        return done.returncode == 0


def cpu_path_macros(cxx: str) -> list[tuple[str, None]]:
    """``define_macros`` that turn off the optional CPU paths ``cxx`` cannot build (x86-64 GCC
    only: other compilers build the portable path alone, ``csrc/cpu_isa.h``)."""
    macros = []
    for macro, source in CPU_PATH_PROBES.items():
        if macros or not _probe(cxx, source):  # no AVX-512 BF16: no AMX path either
            macros.append((macro, None))
    return macros


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
    macros = []
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        macros = cpu_path_macros(os.environ.get("CXX", "c++"))
        for name, _ in macros:
            print(f"rmt_fast: the C++ toolchain cannot build the CPU path that {name} turns off; "
                  "building without it", file=sys.stderr)
    kwargs = dict(sources=cpp + (cu if use_cuda else []), extra_compile_args={"cxx": cxx},
                  extra_link_args=["-fopenmp"], define_macros=macros)
    if sys.platform.startswith("linux"):
        # libstdc++ ahead of torch's libraries on the link line (setuptools puts `libraries`
        # before the -lc10 -ltorch ... that cpp_extension appends). On one CUDA machine
        # (bench/README.md, GPU check 2026-12-04) an extension linked by Ubuntu's g++ did not need
        # libstdc++.so at all and every C++ exception it threw killed the process; binding the
        # C++ runtime to libstdc++ itself is the suspected cure, not yet confirmed on that machine.
        kwargs["libraries"] = ["stdc++"]
    if use_cuda:
        kwargs["define_macros"].append(("RMT_FAST_WITH_CUDA", None))
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
