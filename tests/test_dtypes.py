"""dtype="auto": decided from the CPU flags / GPU capability at run time (mocked here)."""

import warnings

import pytest
import torch

from rmt_fast import dtypes

X86_INFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse sse2 avx2 avx512f avx512bw {extra}
bugs\t\t: sysret_ss_attrs

processor\t: 1
flags\t\t: fpu sse sse2 avx2 avx512f avx512bw {extra}
"""
ARM_INFO = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp {extra}
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize("text, machine, native", [
    (X86_INFO.format(extra="avx512_bf16 avx512_vnni"), "x86_64", True),
    (X86_INFO.format(extra="amx_tile amx_bf16 amx_int8"), "x86_64", True),
    (X86_INFO.format(extra="avx512_vnni"), "x86_64", False),  # AVX-512 without BF16: emulated
    (X86_INFO.format(extra=""), "x86_64", False),
    (ARM_INFO.format(extra="sve bf16 i8mm"), "aarch64", True),
    (ARM_INFO.format(extra="sve i8mm"), "aarch64", False),
])
def test_cpu_flags_from_cpuinfo(tmp_path, text, machine, native):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    flags = dtypes.cpu_flags(str(path))
    assert flags is not None and {"fpu", "fp"} & flags
    assert dtypes.cpu_has_native_bf16(flags, machine) is native


def test_auto_follows_the_mocked_cpu(monkeypatch):
    monkeypatch.setattr(dtypes.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(dtypes, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"avx2", "avx512_bf16"}))
    assert dtypes.resolve_dtype("auto", "cpu") is torch.bfloat16
    assert dtypes.resolve_dtype("auto") is torch.bfloat16  # default device: CPU
    monkeypatch.setattr(dtypes, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"avx2", "avx512f"}))
    assert dtypes.resolve_dtype("auto", "cpu") is torch.float32
    assert dtypes.describe("cpu")["auto"] == "float32"
    # explicit names give what they name; bf16 on a CPU without it warns that it is emulated
    with pytest.warns(RuntimeWarning, match="no native bf16 dot products"):
        assert dtypes.resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    with pytest.warns(RuntimeWarning, match="'BF16'"):
        assert dtypes.resolve_dtype("BF16") is torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dtypes.resolve_dtype("torch.float32") is torch.float32
        assert dtypes.resolve_dtype("bfloat16", "cuda:0") is torch.bfloat16  # not a CPU
        assert dtypes.resolve_dtype(torch.bfloat16) is torch.bfloat16  # a dtype passes through
        monkeypatch.setattr(dtypes, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"avx2"}))
        assert dtypes.resolve_dtype("bfloat16", "cpu", warn=False) is torch.bfloat16  # asked quiet
        monkeypatch.setattr(dtypes, "cpu_flags",
                            lambda path="/proc/cpuinfo": frozenset({"avx512_bf16"}))
        assert dtypes.resolve_dtype("bfloat16", "cpu") is torch.bfloat16  # native: no warning


def test_unreadable_cpuinfo_falls_back_to_torch_probes(monkeypatch, tmp_path):
    assert dtypes.cpu_flags(str(tmp_path / "missing")) is None
    monkeypatch.setattr(dtypes, "cpu_flags", lambda path="/proc/cpuinfo": None)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert dtypes.resolve_dtype("auto", "cpu") is torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert dtypes.resolve_dtype("auto", "cpu") is torch.bfloat16


def test_auto_on_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []

    def bf16(including_emulation=True):
        calls.append(including_emulation)
        return supported

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16)
    supported = True
    assert dtypes.resolve_dtype("auto", "cuda") is torch.bfloat16
    supported = False
    assert dtypes.resolve_dtype("auto", torch.device("cuda", 0)) is torch.float32
    assert calls == [False, False]  # emulated bf16 does not count
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dtypes.resolve_dtype("auto", "cuda") is torch.float32
    assert dtypes.resolve_dtype("auto", "meta") is torch.float32  # unknown devices: float32


def test_dtype_passthrough_and_bad_input():
    assert dtypes.resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="dtype must be"):
        dtypes.resolve_dtype("float8")
    with pytest.raises(ValueError, match="floating"):
        dtypes.resolve_dtype(torch.int64)
    with pytest.raises(ValueError, match="dtype must be"):
        dtypes.resolve_dtype(32)
    with pytest.raises(ValueError, match="device"):
        dtypes.resolve_dtype("auto", "no-such-device")


def test_autocast_context(monkeypatch):
    assert isinstance(dtypes.autocast("float32", "cpu"), type(dtypes.contextlib.nullcontext()))
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with dtypes.autocast("bfloat16", "cpu"):
        y = lin(x)
    assert y.dtype is torch.bfloat16 and lin.weight.dtype is torch.float32  # fp32 master weights
    y.float().sum().backward()
    assert lin.weight.grad.dtype is torch.float32
