"""The CPU paths a C++ toolchain may lack (csrc/cpu_isa.h, setup.py's probe).

* ``setup.cpu_path_macros`` turns off exactly the paths the compiler cannot build: none with this
  machine's compiler; AMX alone with a compiler that rejects only the tile instructions (GCC 11
  with binutils < 2.36); both with no working compiler (no AVX-512 BF16: no AMX path either);
* the C++ sources pass ``g++ -fsyntax-only -Werror`` with those paths turned off (every use of
  their namespaces is guarded).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
X86_GCC = sys.platform.startswith("linux") and os.uname().machine == "x86_64" and \
    shutil.which("g++") is not None


def _setup_module():
    """setup.py's functions, without running its ``setup()``."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        source = f.read().replace("setup(**_extension_kwargs())", "")
    ns: dict = {"__name__": "setup_under_test"}
    exec(compile(source, "setup.py", "exec"), ns)
    return ns


def _compiler_rejecting(tmp_path, word: str) -> str:
    """A ``c++`` that fails on sources containing ``word`` and compiles the rest."""
    path = tmp_path / "cxx"
    path.write_text(f'#!/bin/sh\nfor a in "$@"; do case "$a" in *.cpp) '
                    f'grep -q "{word}" "$a" && exit 1;; esac; done\nexec g++ "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.skipif(not X86_GCC, reason="x86-64 Linux with g++ only")
def test_probe_turns_off_only_what_the_toolchain_lacks(tmp_path):
    setup = _setup_module()
    paths = setup["cpu_path_macros"]
    assert paths("g++") == []  # this machine's toolchain builds every path
    assert paths(_compiler_rejecting(tmp_path, "amx")) == [("RMT_FAST_NO_AMX", None)]
    both = [("RMT_FAST_NO_AVX512_BF16", None), ("RMT_FAST_NO_AMX", None)]
    assert paths(_compiler_rejecting(tmp_path, "avx512bf16")) == both
    assert paths(str(tmp_path / "no-such-compiler")) == both


@pytest.mark.skipif(not X86_GCC, reason="x86-64 Linux with g++ only")
@pytest.mark.parametrize("source,macros", [
    ("memory_attention_cpu.cpp", ["RMT_FAST_NO_AMX"]),
    *((f, ["RMT_FAST_NO_AVX512_BF16"]) for f in ("memory_attention_cpu.cpp", "activations.cpp",
                                                 "layer_norm.cpp", "cross_entropy.cpp"))])
def test_sources_build_without_the_optional_paths(source, macros):
    from torch.utils import cpp_extension

    cmd = ["g++", "-fsyntax-only", "-std=c++17", "-fopenmp", "-Wall", "-Werror",
           "-Wno-c++20-extensions", "-Wno-maybe-uninitialized", "-I", CSRC]
    cmd += [f"-D{m}" for m in macros]
    for inc in cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]:
        cmd += ["-isystem", inc]
    cmd.append(os.path.join(CSRC, source))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
