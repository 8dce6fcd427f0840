"""Build and install rmt_fast.

The extension ``rmt_fast._C`` is built with ninja from ``csrc/``: the C++ sources always, the CUDA
sources when torch has CUDA and ``nvcc`` is found. Environment switches:

* ``RMT_FAST_BUILD_CUDA=1`` / ``0``: force the CUDA sources in / out.
* ``RMT_FAST_REQUIRE_EXT=1``: fail the install if the extension does not build (default: warn and
  install the pure-PyTorch package, which falls back at import time).

torch itself is not a requirement here on purpose: install the build you want first
(``pip install torch==2.13.0`` for CPU), then ``pip install --no-build-isolation .``.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["rmt_fast", "rmt_fast.ops", "rmt_fast.integrations", "rmt_fast.kernels",
            "rmt_fast.tasks", "rmt_fast.bench"]
PACKAGE_DIR = {"rmt_fast.kernels": "kernels", "rmt_fast.bench": "bench"}


def _packages():
    out = []
    for pkg in PACKAGES:
        path = PACKAGE_DIR.get(pkg, pkg.replace(".", os.sep))
        if os.path.isfile(os.path.join(ROOT, path, "__init__.py")):
            out.append(pkg)
    return out


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


setup(
    name="rmt_fast",
    version="0.1.0",
    description="Kernel-accelerated Recurrent Memory Transformer (RMT) for PyTorch and Hugging Face",
    long_description=open(os.path.join(ROOT, "README.md")).read()
    if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir=PACKAGE_DIR,
    package_data={"rmt_fast": ["checkpoints/*/*", "checkpoints/*/*/*"]},
    install_requires=["numpy", "safetensors", "tqdm", "transformers>=4.56"],
    extras_require={
        "triton": ["triton>=3.2"],
        "bench": ["matplotlib"],
        "peers": ["recurrent-memory-transformer-pytorch"],
    },
    entry_points={"console_scripts": ["rmt-fast=rmt_fast.cli:main"]},
    **_extension_kwargs(),
)
