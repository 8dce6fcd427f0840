"""CPU timings for ARMT, side by side in one process.

``ops``: the associative read (forward + backward) of the row-chunked PyTorch path
(``backend="torch"``) against the dense path that materialises the ``[B, L, d_key]`` features
(``backend="reference"``): wall time, and the bytes autograd keeps for the backward (counted with
``torch.autograd.graph.saved_tensors_hooks``, each storage once).

``delta``: the delta rule's write of ``M`` memory rows (forward + backward), one row after
another (a read and an update per row, how ``associative_write`` ran it before 2026-12-06, written
out here) against the UT form it runs now (one read, one ``[M, M]`` triangular solve, one update),
after checking the two agree.

``diagonal``: ARMT inference (no grad) in the sequential order (``model(ids)``) against the
:class:`rmt_fast.models.diagonal.DiagonalExecutor` (grouped blocks, and one call per block),
after checking the logits agree.

Runs are interleaved (A, B, C, A, B, C, ...); the tables give the median and the minimum of the
wall time and the median of the process CPU time (``time.process_time``, all threads), which is
the steadier figure on a shared machine (``--threads`` sets torch's intra-op threads).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - informational only
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, " \
           f"{torch.get_num_threads()} threads"


def interleaved(fns: dict, reps: int) -> tuple[dict, dict]:
    """``(wall seconds, CPU seconds)`` per function, ``reps`` interleaved runs each."""
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return wall, cpu


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves during ``fn()`` (each storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def table(columns: list[str], values, case, args) -> None:
    """A markdown table: the header, then ``case(value, args)`` prints one or more rows per value."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for value in values:
        case(value, args)


def run_ops(args) -> None:
    table(["d_mem", "d_key", "B x L x d", "backend", "fwd+bwd wall median s", "wall min s",
           "CPU median s", "saved for backward"], args.d_mems, _ops_case, args)


def _ops_case(dm: int, args) -> None:
    from rmt_fast.ops.associative_memory import associative_read

    torch.manual_seed(0)
    b, length, d = args.batch, args.length, args.d_model
    k = 6 * dm
    x = torch.randn(b, length, dm, requires_grad=True)
    A = (torch.randn(b, k, d) * 0.1).requires_grad_()
    z = (torch.rand(b, k) + 0.5).requires_grad_()
    g = torch.randn(b, length, d)

    def step(backend):
        out = associative_read(x, A, z, backend=backend)
        torch.autograd.backward(out, g)

    ref = associative_read(x, A, z, backend="reference")
    got = associative_read(x, A, z, backend="torch")
    assert (ref - got).abs().max() < 1e-3 * ref.abs().max()
    fns = {bk: (lambda bk=bk: step(bk)) for bk in ("torch", "reference")}
    fns["torch"]()  # warm-up
    fns["reference"]()
    wall, cpu = interleaved(fns, args.reps)
    for bk in fns:
        nbytes, _ = saved_bytes(lambda bk=bk: associative_read(x, A, z, backend=bk))
        ts = wall[bk]
        name = "torch (chunked)" if bk == "torch" else "reference (dense)"
        print(f"| {dm} | {k} | {b} x {length} x {d} | {name} | {statistics.median(ts):.4f} | "
              f"{min(ts):.4f} | {statistics.median(cpu[bk]):.4f} | {nbytes / 2**20:.1f} MiB |")


def run_delta(args) -> None:
    table(["B x M x d_mem x d", "write", "fwd+bwd wall median ms", "wall min ms", "CPU median ms",
           "speed-up (wall median)"], args.mems, _delta_case, args)


def _delta_case(m: int, args) -> None:
    from rmt_fast.ops.associative_memory import associative_write
    from rmt_fast.ops.associative_memory.chunked import stat_dtype
    from rmt_fast.ops.associative_memory.function import assoc_read, assoc_update

    torch.manual_seed(0)
    b, dm, d = args.batch, args.d_mem, args.d_model
    km = torch.randn(b, m, dm, requires_grad=True)
    v = torch.randn(b, m, d, requires_grad=True)
    beta = torch.rand(b, m).requires_grad_()
    A = (torch.randn(b, 6 * dm, d) * 0.1).requires_grad_()
    z = torch.zeros(b, 6 * dm)
    gA = torch.randn(b, 6 * dm, d)

    def rows():  # the former implementation: a read and an update per memory row
        A2, zero = A, torch.zeros_like(z)
        gamma = torch.zeros(b, 1, dtype=stat_dtype(km.dtype))
        for j in range(m):
            kj = km[:, j:j + 1].contiguous()
            v_bar = assoc_read(kj, A2, zero, 3, True, 1.0, "torch")[0]
            u = beta[:, j:j + 1, None] * (v[:, j:j + 1] - v_bar)
            A2 = assoc_update(kj, u.contiguous(), gamma, A2, z, 3, True, "torch")[0]
        return A2

    def ut():
        return associative_write(km, v, beta, A, z, first=False, normalize=True, rule="delta",
                                 backend="torch")[0]

    err = (rows() - ut()).abs().max().item()
    assert err < 1e-4, f"UT form differs from the row loop by {err}"
    fns = {"one row at a time": lambda: torch.autograd.backward(rows(), gA),
           "UT form": lambda: torch.autograd.backward(ut(), gA)}
    for fn in fns.values():
        fn()
    wall, cpu = interleaved(fns, args.reps)
    base = statistics.median(wall["one row at a time"])
    for k, ts in wall.items():
        med = statistics.median(ts)
        print(f"| {b} x {m} x {dm} x {d} | {k} | {1e3 * med:.3f} | {1e3 * min(ts):.3f} | "
              f"{1e3 * statistics.median(cpu[k]):.3f} | {base / med:.2f}x |")


def build_model(kind: str, args):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from rmt_fast.models.armt import ARMTForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        base = GPT2LMHeadModel(GPT2Config(vocab_size=args.vocab, n_positions=1024,
                                          n_embd=args.d_model, n_layer=args.layers,
                                          n_head=args.heads, bos_token_id=0, eos_token_id=0))
    else:
        base = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model,
                                            intermediate_size=4 * args.d_model,
                                            num_hidden_layers=args.layers,
                                            num_attention_heads=args.heads,
                                            num_key_value_heads=max(1, args.heads // 2),
                                            max_position_embeddings=1024, bos_token_id=0,
                                            eos_token_id=0))
    model = ARMTForCausalLM(base.eval(), num_mem_tokens=args.mem, d_mem=args.d_mem,
                            segment_size=args.segment).eval()
    with torch.no_grad():
        for a in model.assoc:
            a.W_mv.weight.normal_(0, 0.02)
    return model


def run_diagonal(args) -> None:
    table(["model", "layers x segments", "B x tokens", "order", "steps", "wall median s",
           "wall min s", "CPU median s", "speed-up (wall median)", "speed-up (CPU)"], args.models,
          _diagonal_case, args)


def _diagonal_case(kind: str, args) -> None:
    model = build_model(kind, args)
    tokens = args.segment * args.segments
    ids = torch.randint(0, args.vocab, (args.batch, tokens))
    grouped, per_block = model.diagonal(grouped=True), model.diagonal(grouped=False)
    with torch.no_grad():
        seq_logits = model(ids).logits
    for ex in (grouped, per_block):
        err = (ex(ids).logits - seq_logits).abs().max().item()
        assert err < 1e-4, f"diagonal differs from sequential by {err}"
    fns = {"sequential": lambda: model(ids, return_logits=True),
           "diagonal (grouped)": lambda: grouped(ids),
           "diagonal (per block)": lambda: per_block(ids)}
    with torch.no_grad():
        wall, cpu = interleaved(fns, args.reps)
    n, t = args.layers, args.segments
    steps = {"sequential": n * t, "diagonal (grouped)": n + t - 1,
             "diagonal (per block)": n + t - 1}
    base, base_cpu = statistics.median(wall["sequential"]), statistics.median(cpu["sequential"])
    for k, ts in wall.items():
        med, cmed = statistics.median(ts), statistics.median(cpu[k])
        print(f"| {kind} d={args.d_model} | {n} x {t} | {args.batch} x {tokens} | {k} | "
              f"{steps[k]} | {med:.3f} | {min(ts):.3f} | {cmed:.3f} | {base / med:.2f}x | "
              f"{base_cpu / cmed:.2f}x |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["ops", "delta", "diagonal"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=2064, help="ops: rows per read")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-mems", type=int, nargs="+", default=[64, 512], help="ops")
    p.add_argument("--models", nargs="+", default=["gpt2", "llama"], help="diagonal")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--mem", type=int, default=16)
    p.add_argument("--d-mem", type=int, default=32)
    p.add_argument("--mems", type=int, nargs="+", default=[8, 16, 32], help="delta: memory rows")
    p.add_argument("--segment", type=int, default=128)
    p.add_argument("--segments", type=int, default=16)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"`python scripts/armt_timing.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
    print(f"machine: {machine()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print()
    {"ops": run_ops, "delta": run_delta, "diagonal": run_diagonal}[args.what](args)


if __name__ == "__main__":
    main()
