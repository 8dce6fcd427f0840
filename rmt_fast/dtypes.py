"""``dtype="auto"``: the one place that decides between bfloat16 and float32.

:func:`resolve_dtype` maps ``"auto" | "float32" | "bfloat16" | "float16" | torch.dtype`` and a
device to a ``torch.dtype``. ``"auto"`` is bfloat16 only where the hardware computes it natively,
decided at run time on the machine that runs the code:

* CPU: the flags the kernel reports in ``/proc/cpuinfo`` (x86: ``avx512_bf16`` or ``amx_bf16``;
  aarch64: ``bf16``), or, where that file cannot be read, torch's own CPUID probes
  (``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``). Without them bf16
  matrix products are emulated through float32 and run slower than float32 itself, so ``auto``
  is float32 there. ``torch.backends.cpu.get_cpu_capability()`` (``"AVX512"``, ``"AVX2"``, ...)
  names the vector ISA ATen dispatched to but not the bf16 dot-product instructions, so it is
  recorded by :func:`describe` and not used for the decision.
* CUDA/ROCm: ``torch.cuda.is_bf16_supported(including_emulation=False)`` (compute capability
  8.0+ on NVIDIA). XPU: ``torch.xpu.is_bf16_supported()``. Any other device: float32.

How it is meant to be used:

* Inference: cast the model once, ``model.to(resolve_dtype(dtype, device))``; the recurrent
  memory, the XL cache and every activation follow the parameters' dtype.
  ``StreamingReader(model.to(dtype))`` reads in that dtype.
* Training: keep float32 master weights and optimizer state, and run forward (and the loss)
  under :func:`autocast` (``torch.autocast`` with bf16 when the resolved dtype is bf16, a no-op
  for float32); call ``loss.backward()`` and ``optimizer.step()`` outside it. Segment
  checkpointing (:func:`rmt_fast.checkpoint.segment_bptt`) records the autocast state and
  replays it when it recomputes a segment in backward. bf16 has float32's exponent range, so no
  loss scaling is needed (float16 would need ``torch.amp.GradScaler``).

``rmt-fast bench --dtype {auto,float32,bfloat16}`` uses exactly this function.
"""

from __future__ import annotations

import contextlib
import platform
import warnings

import torch

#: accepted names -> dtypes (the CLI offers ``auto``, ``float32`` and ``bfloat16``)
NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
         "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
CHOICES = ("auto", "float32", "bfloat16")
#: /proc/cpuinfo flags meaning native bf16 dot products (x86: AVX512-BF16, AMX-BF16; Arm: BF16)
X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
ARM_BF16_FLAGS = frozenset({"bf16"})
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The first ``flags`` (x86) or ``Features`` (aarch64) line of ``path`` as a set, or None
    when the file cannot be read or has no such line (macOS, Windows, some containers)."""
    try:
        with open(path) as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def _torch_probe() -> bool:
    """torch's CPUID probes (x86 only; private API, absent in some builds: False then)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for name in probes:
        fn = getattr(torch.cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # a probe that fails means "not known to be native"
            continue
    return False


def cpu_has_native_bf16(flags: frozenset[str] | None = None, machine: str | None = None) -> bool:
    """True when this CPU has bf16 dot-product instructions (AVX512-BF16, AMX-BF16, Arm BF16).

    Args:
        flags: the CPU's flags (default: read from ``/proc/cpuinfo`` now).
        machine: ``platform.machine()`` (default: this machine's).
    """
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    if flags is None:
        return _torch_probe()
    if machine in ("aarch64", "arm64"):
        return bool(flags & ARM_BF16_FLAGS)
    return bool(flags & X86_BF16_FLAGS)


def gpu_has_native_bf16(device: torch.device) -> bool:
    """bf16 in hardware on ``device`` (CUDA/ROCm: not counting emulation; XPU)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch: no including_emulation argument
            major, _ = torch.cuda.get_device_capability(device)
            return major >= 8
    if device.type == "xpu":
        xpu = getattr(torch, "xpu", None)
        return bool(xpu is not None and xpu.is_available() and xpu.is_bf16_supported())
    return False


def _as_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch.device or a device string such as 'cpu' or "
                         f"'cuda:0', got {device!r}") from e


def auto_dtype(device=None) -> torch.dtype:
    """bf16 where ``device`` computes it natively, float32 elsewhere."""
    dev = _as_device(device)
    native = cpu_has_native_bf16() if dev.type == "cpu" else gpu_has_native_bf16(dev)
    return torch.bfloat16 if native else torch.float32


def resolve_dtype(dtype: str | torch.dtype = "auto", device=None, *,
                  warn: bool = True) -> torch.dtype:
    """The ``torch.dtype`` to run in.

    Args:
        dtype: ``"auto"``, a name (``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``,
            ``"float16"``/``"fp16"``) or a floating ``torch.dtype`` (returned as is).
        device: where the model runs (``torch.device``, ``"cpu"``, ``"cuda:0"``; default CPU);
            only ``"auto"`` looks at it.
        warn: give the emulated-bf16 warning below (False: a caller that measures emulated bf16
            on purpose, or whose parent process warned already).

    Returns:
        ``torch.bfloat16`` or ``torch.float32`` for ``"auto"``; the named dtype otherwise.

    Raises:
        ValueError: an unknown name, a non-floating dtype, or a bad device.

    Warns:
        RuntimeWarning: bfloat16 asked for by name on a CPU without native bf16 dot products,
            where ATen emulates its bf16 matrix products (0.3-1 GFLOP/s against 85-93 in
            float32 on an AVX2 AMD EPYC, bench/README.md, 2026-12-07).
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be a floating torch.dtype {_FLOAT_DTYPES}, got {dtype}")
        return dtype
    if not isinstance(dtype, str):
        raise ValueError(f"dtype must be 'auto', one of {sorted(NAMES)} or a torch.dtype, got "
                         f"{type(dtype).__name__} {dtype!r}")
    name = dtype.strip().lower().removeprefix("torch.")
    if name == "auto":
        return auto_dtype(device)
    if name not in NAMES:
        raise ValueError(f"dtype must be 'auto', one of {sorted(NAMES)} or a torch.dtype, got "
                         f"{dtype!r}")
    dev = _as_device(device)
    if warn and NAMES[name] == torch.bfloat16 and dev.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(f"dtype {dtype!r}: this CPU has no native bf16 dot products (no "
                      "avx512_bf16/amx_bf16 or Arm bf16 flag), so bf16 matrix products are "
                      "emulated and can run far slower than float32 (0.3-1 against 85-93 GFLOP/s "
                      "on an AVX2 AMD EPYC); dtype='auto' picks float32 here",
                      RuntimeWarning, stacklevel=2)
    return NAMES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def autocast(dtype: str | torch.dtype = "auto", device=None):
    """Training context: ``torch.autocast(device.type, dtype)`` for bf16/fp16, a no-op for float32.

    Keep the model's parameters in float32 (master weights) and run forward + loss inside it::

        with rmt_fast.dtypes.autocast("auto", "cpu"):
            loss = model(ids, labels=ids).loss
        loss.backward(); opt.step()
    """
    dev = _as_device(device)
    resolved = resolve_dtype(dtype, dev)
    if resolved in (torch.float32, torch.float64):
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=resolved)


def describe(device=None) -> dict:
    """What the decision was based on (for logs and benchmark JSON)."""
    dev = _as_device(device)
    out = {"device": str(dev), "auto": dtype_name(auto_dtype(dev))}
    if dev.type == "cpu":
        flags = cpu_flags()
        out.update(machine=platform.machine(),
                   cpu_capability=torch.backends.cpu.get_cpu_capability(),
                   bf16_flags=None if flags is None else
                   sorted(flags & (X86_BF16_FLAGS | ARM_BF16_FLAGS | {"amx_tile"})),
                   native_bf16=cpu_has_native_bf16(flags))
    else:
        out["native_bf16"] = gpu_has_native_bf16(dev)
        if dev.type == "cuda" and torch.cuda.is_available():
            out["name"] = torch.cuda.get_device_name(dev)
    return out
