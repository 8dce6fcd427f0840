"""GPU benchmark: the Triton memory attention vs PyTorch SDPA, FlexAttention and FlashAttention.

``python -m rmt_fast.bench.kernels`` prints one markdown table row per (system, mask, L, D,
mode): median time, useful TFLOP/s from :mod:`rmt_fast.bench.roofline` (visible pairs only,
the same count for every system), the fraction of the device's dense peak, minimum-bytes GB/s
and the max abs difference of the output from the first system that ran (ours).

Systems on CUDA (bf16 by default):

* ``triton``: ``memory_attention(..., backend="triton")`` (ours);
* ``sdpa_mask``: ``F.scaled_dot_product_attention`` with a dense bool mask equal to ours;
* ``sdpa_causal``: SDPA with ``is_causal=True`` (plain causal without past keys only);
* ``flex``: ``torch.compile(flex_attention)`` with a ``mask_mod`` built from
  :func:`rmt_fast.masks.current_key_visible` and ``create_block_mask(..., device=...)``;
* ``flash``: ``flash_attn.flash_attn_func`` when installed (plain causal or full, no past keys:
  it has no memory masks).

``--window W`` (a sliding window in keys, as Mistral's or Gemma 2's local layers) and
``--softcap C`` (Gemma 2's logit soft-cap ``C * tanh(s / C)`` of the scaled scores) go to every
system that can express them: ours (layout fields), SDPA (the window in the dense mask; no cap),
Flex (the window in ``mask_mod``, the cap as a ``score_mod``) and FlashAttention
(``window_size=(W - 1, 0)``, ``softcap=C``).

Without CUDA (or with ``--device cpu``) only CPU reference paths run, at tiny sizes, in float32:
``torch`` (``backend="torch"``), ``reference``, ``sdpa_mask``, ``sdpa_causal`` and ``flex``
(eager, not compiled); the output says so, and its times are CPU times, not GPU numbers.
Timing: ``triton.testing.do_bench`` (median, CUDA events) on the GPU, ``time.perf_counter``
median on the CPU. Sizes follow FlashAttention's benchmark: ``--tokens`` (16K) per batch,
``heads = --model-dim (2048) // D``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from rmt_fast import memory_attention
from rmt_fast.bench.roofline import AttentionShape, device_peak, roofline
from rmt_fast.masks import AttentionLayout, current_key_visible, dense_visibility, past_key_visible

GPU_SYSTEMS = ("triton", "sdpa_mask", "sdpa_causal", "flex", "flash")
CPU_SYSTEMS = ("torch", "reference", "sdpa_mask", "sdpa_causal", "flex")
CPU_MAX_LENGTH = 256
NO_CUDA_LINE = "no CUDA device: CPU reference paths only"
COLUMNS = ("system", "mask", "L", "D", "B", "H", "mode", "ms", "TFLOP/s", "peak%", "GB/s",
           "max_diff", "status")


@dataclass(frozen=True)
class Case:
    """One benchmark point (``past`` keys live in their own buffer for ours)."""

    mask: str
    length: int
    head_dim: int
    mode: str
    batch: int
    heads: int
    num_read: int = 0
    num_write: int = 0
    past: int = 0
    past_visible_to_read: bool = False
    window: int | None = None
    softcap: float | None = None

    def __post_init__(self) -> None:
        self.layout()  # validates window and softcap

    def layout(self) -> AttentionLayout:
        return AttentionLayout(self.num_read, self.num_write, self.mask,
                               self.past_visible_to_read, window=self.window,
                               softcap=self.softcap)

    def shape(self, dtype: torch.dtype) -> AttentionShape:
        return AttentionShape(self.batch, self.heads, self.heads, self.length, self.head_dim,
                              past=self.past, num_read=self.num_read, num_write=self.num_write,
                              mask=self.mask, past_visible_to_read=self.past_visible_to_read,
                              dtype=str(dtype).removeprefix("torch."), window=self.window)

    @property
    def plain_causal(self) -> bool:
        """Same visibility as top-left causal attention over ``L`` keys (SDPA ``is_causal``)."""
        return self.mask == "causal" and self.past == 0 and self.window is None


class Unsupported(Exception):
    """The system cannot compute this case (the reason goes into the table)."""


def compiled_flex():
    """``torch.compile(flex_attention)`` with Dynamo's caches cleared first. Every case brings a
    new ``mask_mod`` closure and new shapes, each a recompilation of the same code object; past
    Dynamo's recompile limit (8) it silently runs flex_attention eagerly, the unfused
    implementation, which the first GPU check (2026-12-04) timed at 6-11 TFLOP/s for cases
    that compile to about 365."""
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    return torch.compile(flex_attention, dynamic=False)


def mask_mod_for(case: Case) -> Callable:
    """FlexAttention ``mask_mod`` over keys ``[past P | current L]``, from our mask definition."""
    past, length = case.past, case.length
    first_row = case.layout().first_past_row()

    def mask_mod(b, h, q_idx, kv_idx):
        is_past = kv_idx < past
        past_ok = is_past & past_key_visible(q_idx, kv_idx, past, first_row, case.window)
        cur_ok = current_key_visible(q_idx, kv_idx - past, case.num_read, case.num_write, length,
                                     case.mask, case.window)
        return past_ok | (~is_past & cur_ok)

    return mask_mod


def score_mod_for(case: Case) -> Callable | None:
    """FlexAttention ``score_mod`` for the logit soft-cap (Flex passes it the scaled score), or
    None without one."""
    if case.softcap is None:
        return None
    cap = float(case.softcap)

    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return score_mod


def _inputs(case: Case, device: torch.device, dtype: torch.dtype, grad: bool):
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(n):
        t = torch.randn(case.batch, case.heads, n, case.head_dim, generator=gen)
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    q, k, v = rnd(case.length), rnd(case.length), rnd(case.length)
    pk = pv = None
    if case.past:
        pk, pv = rnd(case.past), rnd(case.past)
    return q, k, v, pk, pv


def build(system: str, case: Case, device: torch.device, dtype: torch.dtype, grad: bool):
    """``(fn, leaves)``: ``fn()`` returns the output ``[B, H, L, D]``; ``leaves`` get grads.

    Raises :class:`Unsupported` when the system cannot express the case. Inputs and masks are
    built here, outside the timed region (baselines get keys already concatenated with the past).
    """
    q, k, v, pk, pv = _inputs(case, device, dtype, grad)
    layout = dict(num_read=case.num_read, num_write=case.num_write, mask=case.mask,
                  past_visible_to_read=case.past_visible_to_read, window=case.window)
    ours = [t for t in (q, k, v, pk, pv) if t is not None]
    if system in ("triton", "torch", "reference"):
        if system == "triton" and device.type != "cuda":
            raise Unsupported("needs CUDA")
        return (lambda: memory_attention(q, k, v, past_k=pk, past_v=pv, backend=system,
                                         softcap=case.softcap, **layout)), ours
    # baselines: one key buffer [past | current]
    kk, vv = (k, v) if pk is None else (torch.cat([pk, k], 2).detach(),
                                        torch.cat([pv, v], 2).detach())
    kk.requires_grad_(grad)
    vv.requires_grad_(grad)
    leaves = [q, kk, vv]
    if system in ("sdpa_mask", "sdpa_causal") and case.softcap is not None:
        raise Unsupported("SDPA has no logit soft-cap")
    if system == "sdpa_mask":
        vis = dense_visibility(case.length, case.past, device=device, **layout)
        return (lambda: F.scaled_dot_product_attention(q, kk, vv, attn_mask=vis)), leaves
    if system == "sdpa_causal":
        if not case.plain_causal:
            raise Unsupported("is_causal is plain causal only")
        return (lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True)), leaves
    if system == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if grad and device.type != "cuda":
            raise Unsupported("flex backward needs CUDA (torch: no CPU backward)")

        block_mask = create_block_mask(mask_mod_for(case), None, None, case.length,
                                       case.past + case.length, device=device)
        if device.type == "cuda":
            flex = compiled_flex()
        else:  # eager: torch's unfused reference implementation (it warns once; fine at tiny L)
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            flex = flex_attention
        score_mod = score_mod_for(case)
        return (lambda: flex(q, kk, vv, score_mod=score_mod, block_mask=block_mask)), leaves
    if system == "flash":
        if device.type != "cuda":
            raise Unsupported("needs CUDA")
        try:
            from flash_attn import flash_attn_func
        except ImportError as e:
            raise Unsupported("flash_attn not installed") from e
        if not ((case.mask in ("causal", "full")) and case.past == 0):
            raise Unsupported("no memory masks in flash_attn")
        extra = {}
        if case.window is not None:  # row i sees keys i - (W - 1) .. i (right: 0 when causal)
            extra["window_size"] = (case.window - 1, 0 if case.mask == "causal" else -1)
        if case.softcap is not None:
            extra["softcap"] = float(case.softcap)
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(grad)
                      for t in (q, kk, vv))
        causal = case.mask == "causal"
        return (lambda: flash_attn_func(qt, kt, vt, causal=causal, **extra).transpose(1, 2)), \
            [qt, kt, vt]
    raise ValueError(f"unknown system {system!r}")


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of ``fn``: CUDA events via ``triton.testing.do_bench`` on the GPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def error_status(e: BaseException) -> str:
    """A table row's status for a case that raised: the exception's type and the first line of
    its message (at most 80 characters; none for an empty message)."""
    return f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"


def run_case(system: str, case: Case, device: torch.device, dtype: torch.dtype, repeats: int,
             warmup: int, ref_out: torch.Tensor | None, peak) -> tuple[dict, torch.Tensor | None]:
    """One table row (and the system's output, to compare the next systems against)."""
    row = dict(system=system, **asdict(case), dtype=str(dtype).removeprefix("torch."))
    grad = case.mode == "fwd+bwd"
    try:
        fn, leaves = build(system, case, device, dtype, grad)
        with torch.no_grad():
            out = fn().float()
        if grad:
            dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(
                device=device, dtype=dtype)

            def step():
                for t in leaves:
                    t.grad = None
                fn().backward(dout)

            timed = step
        else:
            def timed():
                with torch.no_grad():
                    return fn()
        if device.type == "cuda":
            timed()  # compiles (flex, Triton) happen here, outside the timed region
        seconds = time_fn(timed, device, repeats, warmup)
    except Unsupported as e:
        row.update(status=f"skipped: {e}")
        return row, None
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        row.update(status="out of memory")
        return row, None
    except Exception as e:  # a baseline failing must not stop the sweep; the table says why
        row.update(status=error_status(e))
        return row, None
    rates = roofline(case.shape(dtype), seconds, case.mode, peak)
    row.update(status="ok", seconds=seconds, **rates)
    if ref_out is not None:
        row["max_diff"] = (out - ref_out).abs().max().item()
    return row, out


def sweep(systems, masks, lengths, head_dims, modes, device, dtype, tokens, model_dim,
          num_mem, past, repeats, warmup, peak, progress: bool = True, window: int | None = None,
          softcap: float | None = None) -> list[dict]:
    rows = []
    for mask in masks:
        for hd in head_dims:
            for length in lengths:
                for mode in modes:
                    case = Case(mask, length, hd, mode, batch=max(1, tokens // length),
                                heads=max(1, model_dim // hd),
                                num_read=0 if mask in ("causal", "full") else num_mem,
                                num_write=0 if mask in ("causal", "full") else num_mem,
                                past=past, window=window, softcap=softcap)
                    ref = None
                    for system in systems:
                        row, out = run_case(system, case, device, dtype, repeats, warmup, ref,
                                            peak)
                        if ref is None and out is not None:
                            ref = out
                            row["max_diff"] = 0.0
                        rows.append(row)
                        if progress:
                            print(format_row(row), flush=True)
                    del ref
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return rows


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def format_row(r: dict) -> str:
    cells = [r["system"], r["mask"], str(r["length"]), str(r["head_dim"]), str(r["batch"]),
             str(r["heads"]), r["mode"], _fmt(r.get("seconds") and r["seconds"] * 1e3, ".3f"),
             _fmt(r.get("tflops"), ".3g"),
             _fmt(r.get("frac_peak_flops") and 100 * r["frac_peak_flops"], ".1f"),
             _fmt(r.get("gbps"), ".3g"), _fmt(r.get("max_diff"), ".1e"), r["status"]]
    return "| " + " | ".join(cells) + " |"


def header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def _versions() -> dict:
    import triton

    try:
        import flash_attn

        fa = flash_attn.__version__
    except ImportError:
        fa = "not installed"
    return dict(torch=torch.__version__, triton=triton.__version__, flash_attn=fa)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--systems", nargs="+", default=None,
                        help=f"CUDA: {GPU_SYSTEMS}; CPU: {CPU_SYSTEMS}")
    parser.add_argument("--masks", nargs="+", default=["causal", "rmt"])
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="CUDA default 1024 .. 65536 doubling; CPU default 64 128")
    parser.add_argument("--head-dims", type=int, nargs="+", default=None,
                        help="CUDA default 64 128; CPU default 16")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="CUDA default bfloat16, CPU float32")
    parser.add_argument("--tokens", type=int, default=None, help="B * L (CUDA 16384, CPU 128)")
    parser.add_argument("--model-dim", type=int, default=None,
                        help="H * D (CUDA 2048, CPU 32)")
    parser.add_argument("--num-mem", type=int, default=16,
                        help="read and write memory tokens for the memory masks")
    parser.add_argument("--past", type=int, default=0, help="past keys (own buffer for ours)")
    parser.add_argument("--window", type=int, default=None,
                        help="sliding window in keys (Mistral / Gemma 2 local layers)")
    parser.add_argument("--softcap", type=float, default=None,
                        help="logit soft-cap C: scores C * tanh(s / C) (Gemma 2: 50)")
    parser.add_argument("--repeats", type=int, default=3, help="CPU timed repeats")
    parser.add_argument("--warmup", type=int, default=1, help="CPU warm-up calls")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    device = torch.device("cuda" if cuda else "cpu")
    info = dict(device=torch.cuda.get_device_name() if cuda else "cpu", **_versions())
    if cuda:
        peak = device_peak(info["device"])
        systems = args.systems or list(GPU_SYSTEMS)
        lengths = args.lengths or [1024 * 2 ** i for i in range(7)]
        head_dims = args.head_dims or [64, 128]
        dtype = getattr(torch, args.dtype or "bfloat16")
        tokens, model_dim = args.tokens or 16384, args.model_dim or 2048
        peak_text = (f"{peak.name}, {peak.tflops(str(dtype)[6:])} TFLOP/s dense, "
                     f"{peak.hbm_gbps} GB/s" if peak else "unknown GPU: no peak fraction")
        print(f"device: {info['device']}; peak: {peak_text}")
    else:
        peak = None
        print(NO_CUDA_LINE if not torch.cuda.is_available() else
              "--device cpu: CPU reference paths only")
        print(f"(tiny sizes, L <= {CPU_MAX_LENGTH}; times are CPU times, not GPU numbers; the "
              f"Triton kernels and flash_attn are not run)")
        systems = args.systems or list(CPU_SYSTEMS)
        bad = [s for s in systems if s not in CPU_SYSTEMS]
        if bad:
            print(f"not run on CPU: {bad}")
            systems = [s for s in systems if s in CPU_SYSTEMS]
        lengths = [n for n in (args.lengths or [64, 128]) if n <= CPU_MAX_LENGTH]
        head_dims = args.head_dims or [16]
        dtype = getattr(torch, args.dtype or "float32")
        tokens, model_dim = args.tokens or 128, args.model_dim or 32
    print(f"torch {info['torch']}, triton {info['triton']}, flash_attn {info['flash_attn']}; "
          f"dtype {str(dtype)[6:]}; TFLOP/s = useful FLOPs under the mask (rmt_fast/bench/roofline.py) "
          f"/ median time; max_diff vs the first system that ran")
    print(header())
    rows = sweep(systems, args.masks, lengths, head_dims, args.modes, device, dtype, tokens,
                 model_dim, args.num_mem, args.past, args.repeats, args.warmup, peak,
                 window=args.window, softcap=args.softcap)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=info, peak=asdict(peak) if peak else None, rows=rows), f,
                      indent=1)
    return rows


if __name__ == "__main__":
    main()
