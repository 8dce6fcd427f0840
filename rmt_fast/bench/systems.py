"""The systems a sweep compares, built at a shared configuration.

* ``rmt_fast``: ours. Inference streams the input (:class:`rmt_fast.streaming.StreamingReader`,
  no logits kept); training is one forward+backward with segment checkpointing (``rmt_fast_bptt``:
  plain full-graph BPTT; ``rmt_fast_compiled``: the opt-in ``torch.compile`` of the backbone).
* ``full``: the same base model with full attention (SDPA) over the whole sequence, returning
  logits for every position (its positions table grows to the sequence length).
* ``lucidrains``: the PyPI package ``recurrent-memory-transformer-pytorch`` at matched width,
  depth, heads, segment and memory sizes (optional; ``pip install rmt_fast[peers]``).
  ``lucidrains_mrbp`` trains with its memory-replay backprop.
* ``armt``: :class:`rmt_fast.ARMTForCausalLM` around the same GPT-2 (``memory`` memory tokens,
  associative keys of width ``d_mem``); inference is ``model.read`` segment after segment
  (``armt_diagonal``: the same model through :class:`rmt_fast.DiagonalExecutor`, all (layer,
  segment) steps of an anti-diagonal in one grouped call; inference only), training plain BPTT.
* ``official``: the official Hugging Face RMT wrapper (``MemoryCell`` + ``RecurrentWrapper`` of
  ``booydar/recurrent-memory-transformer``, ``modeling_rmt/language_modeling.py``) around the
  same GPT-2 base model. It is not on PyPI and is never shipped with rmt_fast: it runs only when
  the user points the bench at a copy of that file (``rmt-fast bench --official-rmt PATH``).
  Inference is ``wrapper(input_ids=tokens)`` under ``no_grad`` (it computes and keeps the logits
  and hidden states of every position); training ``wrapper(input_ids, labels=...).loss``.

Precision (``dtype``): inference casts the whole model to the dtype; training keeps float32
weights and runs forward + loss under ``torch.autocast`` (bf16), as :mod:`rmt_fast.dtypes`
describes. :func:`point_flops` counts each system's matrix-product FLOPs.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from rmt_fast import dtypes
from rmt_fast.bench.flops import ModelShape, matmul_forward_flops


@dataclass(frozen=True)
class BenchConfig:
    """GPT-2 style base model and RMT sizes (default: what the peers were measured with)."""

    layers: int = 4
    d_model: int = 256
    heads: int = 4
    ffw: int = 1024
    vocab: int = 1000
    segment: int = 256
    memory: int = 16
    d_mem: int = 64  # ARMT's associative key width

    def as_dict(self) -> dict:
        return asdict(self)

    def shape(self) -> ModelShape:
        return ModelShape(self.layers, self.d_model, self.heads, self.ffw, self.vocab)


CONFIGS = {
    "default": BenchConfig(),
    "tiny": BenchConfig(layers=2, d_model=64, heads=2, ffw=128, vocab=100, segment=32, memory=4),
    "gpt2-small": BenchConfig(layers=12, d_model=768, heads=12, ffw=3072, vocab=50257, segment=512,
                              memory=16),
}

INFER, TRAIN = "infer", "train"


def _gpt2(cfg: BenchConfig, positions: int, attn: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=cfg.vocab, n_positions=positions, n_embd=cfg.d_model,
                        n_layer=cfg.layers, n_head=cfg.heads, n_inner=cfg.ffw, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel._from_config(config, attn_implementation=attn)


def _rmt(cfg: BenchConfig, checkpoint: bool):
    from rmt_fast.models import RMTForCausalLM

    base = _gpt2(cfg, cfg.segment + 2 * cfg.memory, "sdpa")
    return RMTForCausalLM(base, num_mem_tokens=cfg.memory, segment_size=cfg.segment,
                          checkpoint_segments=checkpoint)


def _armt(cfg: BenchConfig):
    from rmt_fast.models import ARMTForCausalLM

    base = _gpt2(cfg, cfg.segment + cfg.memory, "sdpa")
    torch.manual_seed(0)
    return ARMTForCausalLM(base, num_mem_tokens=cfg.memory, segment_size=cfg.segment,
                           d_mem=cfg.d_mem)


def load_official(path: str | os.PathLike):
    """Import the official wrapper's ``language_modeling.py`` from ``path`` (a user's copy).

    Returns the module; it must define ``MemoryCell`` and ``RecurrentWrapper``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--official-rmt: no such file {path!r} (expected a copy of "
                                "modeling_rmt/language_modeling.py of "
                                "booydar/recurrent-memory-transformer)")
    spec = importlib.util.spec_from_file_location("rmt_official_language_modeling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [n for n in ("MemoryCell", "RecurrentWrapper") if not hasattr(module, n)]
    if missing:
        raise ValueError(f"--official-rmt: {path!r} defines no {' / '.join(missing)}; expected "
                         "modeling_rmt/language_modeling.py of booydar/recurrent-memory-transformer")
    return module


def _official(cfg: BenchConfig, length: int, path):
    module = load_official(path)
    base = _gpt2(cfg, cfg.segment + 2 * cfg.memory, "sdpa")
    torch.manual_seed(0)
    cell = module.MemoryCell(base, cfg.memory)
    segments = -(-length // cfg.segment)
    return module.RecurrentWrapper(cell, segment_size=cfg.segment, max_n_segments=segments, k2=-1)


def _trainer(model, loss_fn, dtype: torch.dtype) -> Callable[[torch.Tensor], None]:
    """One step: zero grads, forward + loss under autocast (bf16: float32 master weights),
    backward outside autocast."""
    model.train()

    def train(tokens):
        model.zero_grad(set_to_none=True)
        with dtypes.autocast(dtype, "cpu"):
            loss = loss_fn(tokens)
        if loss is not None:
            loss.backward()
    return train


def _inferer(model, fn, dtype: torch.dtype) -> Callable[[torch.Tensor], None]:
    model.to(dtype).eval()

    @torch.no_grad()
    def infer(tokens):
        fn(tokens)
    return infer


def build(system: str, mode: str, cfg: BenchConfig, length: int, dtype: torch.dtype = torch.float32,
          official_rmt: str | None = None) -> Callable[[torch.Tensor], None]:
    """A callable running one inference pass or one training step (forward + backward, no
    optimizer step) on ``tokens`` ``[B, length]`` in ``dtype`` (see the module doc)."""
    if mode not in (INFER, TRAIN):
        raise ValueError(f"mode must be {INFER!r} or {TRAIN!r}, got {mode!r}")
    if system in ("rmt_fast", "rmt_fast_bptt", "rmt_fast_compiled"):
        model = _rmt(cfg, checkpoint=system != "rmt_fast_bptt")
        if system == "rmt_fast_compiled":
            model.compile_base(dynamic=False)
        if mode == INFER:
            from rmt_fast.streaming import StreamingReader

            def read(tokens):
                reader = StreamingReader(model, batch_size=tokens.shape[0], progress=False)
                reader.feed(tokens)
                reader.flush()
            return _inferer(model, read, dtype)
        return _trainer(model, lambda t: model(t, labels=t, return_logits=False).loss, dtype)
    if system in ("armt", "armt_diagonal"):
        model = _armt(cfg)
        if mode == INFER:
            if system == "armt_diagonal":
                model.to(dtype)  # the executor snapshots the weights: cast first
                executor = model.diagonal()
                return _inferer(model, lambda t: executor(t, return_logits=False), dtype)
            return _inferer(model, model.read, dtype)
        if system == "armt_diagonal":
            raise ValueError("armt_diagonal runs inference only")
        return _trainer(model, lambda t: model(t, labels=t, return_logits=False).loss, dtype)
    if system == "full":
        model = _gpt2(cfg, length, "sdpa")
        if mode == INFER:
            return _inferer(model, lambda t: model(t, use_cache=False), dtype)
        return _trainer(model, lambda t: model(t, labels=t, use_cache=False).loss, dtype)
    if system == "official":
        if official_rmt is None:
            raise ValueError("system 'official' needs the path of the official wrapper's "
                             "language_modeling.py (rmt-fast bench --official-rmt PATH)")
        wrapper = _official(cfg, length, official_rmt)
        if mode == INFER:
            return _inferer(wrapper, lambda t: wrapper(input_ids=t), dtype)
        return _trainer(wrapper, lambda t: wrapper(input_ids=t, labels=t).loss, dtype)
    if system in ("lucidrains", "lucidrains_mrbp"):
        from recurrent_memory_transformer_pytorch import (
            RecurrentMemoryTransformer,
            RecurrentMemoryTransformerWrapper,
        )

        torch.manual_seed(0)
        net = RecurrentMemoryTransformer(
            cfg.d_model, num_tokens=cfg.vocab, depth=cfg.layers, num_memory_tokens=cfg.memory,
            seq_len=cfg.segment, causal=True, dim_head=cfg.d_model // cfg.heads, heads=cfg.heads,
            ff_mult=4, use_flash_attn=True, use_xl_memories=False, num_residual_streams=1)
        wrapper = RecurrentMemoryTransformerWrapper(net)
        if mode == INFER:
            return _inferer(wrapper, wrapper, dtype)
        mrbp = system == "lucidrains_mrbp"

        def loss(tokens):
            x = torch.cat([tokens, tokens[:, :1]], dim=1)  # it predicts n tokens from n + 1
            if mrbp:
                wrapper(x, memory_replay_backprop=True)  # runs backward itself
                return None
            out = wrapper(x, return_loss=True)  # 0.7.0 returns (loss, memories)
            return out[0] if isinstance(out, tuple) else out
        return _trainer(wrapper, loss, dtype)
    raise ValueError(f"unknown system {system!r}; choose from {SYSTEMS}")


SYSTEMS = ("rmt_fast", "rmt_fast_bptt", "rmt_fast_compiled", "full", "lucidrains", "lucidrains_mrbp",
           "official", "armt", "armt_diagonal")


def unavailable(system: str, official_rmt: str | None = None, mode: str | None = None) -> str | None:
    """Why ``system`` cannot run here, in ``mode`` when given (None when it can)."""
    if system == "armt_diagonal" and mode == TRAIN:
        return "inference only"
    if system.startswith("lucidrains"):
        try:
            import recurrent_memory_transformer_pytorch  # noqa: F401
        except ImportError:
            return "not installed"
    if system == "official":
        if official_rmt is None:
            return "not run: pass --official-rmt PATH"
        if not os.path.isfile(official_rmt):
            return f"not found: {official_rmt}"
    return None


def available(system: str, official_rmt: str | None = None) -> bool:
    return unavailable(system, official_rmt) is None


def _segment_sizes(length: int, segment: int) -> list[int]:
    return [segment] * (length // segment) + ([length % segment] if length % segment else [])


def armt_layer_flops(cfg: BenchConfig, positions: int) -> float:
    """Matrix-product FLOPs of one layer's associative read (every position: the query
    projection ``d -> d_mem``, then ``phi(q) A`` with ``d_key = 6 d_mem`` and the normaliser) and
    write (the ``memory`` rows: key, value and beta projections, ``phi(k) A`` for ``v_bar`` and
    the rank-``memory`` update of ``A`` and ``z``)."""
    d, dm, m = cfg.d_model, cfg.d_mem, cfg.memory
    dk = 6 * dm
    read = positions * (2 * d * dm + 2 * dk * d + 2 * dk)
    write = m * (2 * d * dm + 2 * d * d + 2 * d + 2 * dk * d + 2 * dk * d + 2 * dk)
    return float(read + write)


def point_flops(system: str, mode: str, cfg: BenchConfig, length: int, batch: int = 1) -> float:
    """Matrix-product FLOPs of one call of :func:`build`'s callable on ``[batch, length]``.

    Per segment of ``s`` tokens the RMT systems run ``s + 2M`` positions (read memory, segment,
    write memory) with causal attention; ``full`` runs all ``length`` positions at once. Logits:
    ``rmt_fast`` inference computes none (it only reads); training computes them for the ``s``
    segment tokens; ``official`` computes them for every position (memory included), in both
    modes; ``lucidrains`` for the segment tokens; ``full`` for every token. ``rmt_fast``
    inference runs its last layer past the key/value projections for the write-memory rows only
    (``tail_rows`` of :func:`matmul_forward_flops`). Training = 3x the forward (forward +
    backward); the recomputation of segment checkpointing is not counted (model FLOPs, as in
    MFU). ``lucidrains`` is counted as the GPT-2 block of the same sizes (its GEGLU matches the
    MLP's weight count, and its memory rows see each other
    bidirectionally: a few pairs more).
    """
    shape = cfg.shape()
    if system == "full":
        fwd = matmul_forward_flops(length, shape, logit_positions=length)
    elif system.startswith("armt"):
        fwd = 0.0
        for s in _segment_sizes(length, cfg.segment):
            positions = s + cfg.memory  # [segment | write memory]
            fwd += matmul_forward_flops(positions, shape, logit_positions=s if mode == TRAIN else 0)
            fwd += cfg.layers * armt_layer_flops(cfg, positions)
    else:
        fwd = 0.0
        for s in _segment_sizes(length, cfg.segment):
            positions = s + 2 * cfg.memory
            if system == "official":
                logits = positions
            elif system.startswith("rmt_fast"):
                logits = s if mode == TRAIN else 0
            else:
                logits = s
            # our read computes the last layer past its keys/values for the write rows only
            tail = cfg.memory if system.startswith("rmt_fast") and mode != TRAIN else None
            fwd += matmul_forward_flops(positions, shape, logit_positions=logits, tail_rows=tail)
    return batch * fwd * (3.0 if mode == TRAIN else 1.0)
