"""The systems a sweep compares, built at a shared configuration.

* ``rmt_fast``: ours. Inference streams the input (:class:`rmt_fast.streaming.StreamingReader`,
  no logits kept); training is one forward+backward with segment checkpointing (``rmt_fast_bptt``:
  plain full-graph BPTT; ``rmt_fast_compiled``: the opt-in ``torch.compile`` of the backbone).
* ``full``: the same base model with full attention (SDPA) over the whole sequence, returning
  logits for every position (its positions table grows to the sequence length).
* ``lucidrains``: the PyPI package ``recurrent-memory-transformer-pytorch`` at matched width,
  depth, heads, segment and memory sizes (optional; ``pip install rmt_fast[peers]``).
  ``lucidrains_mrbp`` trains with its memory-replay backprop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


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

    def as_dict(self) -> dict:
        return asdict(self)


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


def build(system: str, mode: str, cfg: BenchConfig, length: int) -> Callable[[torch.Tensor], None]:
    """A callable running one inference pass or one training step (forward + backward, no
    optimizer step) on ``tokens`` ``[B, length]``."""
    if system in ("rmt_fast", "rmt_fast_bptt", "rmt_fast_compiled"):
        model = _rmt(cfg, checkpoint=system != "rmt_fast_bptt")
        if system == "rmt_fast_compiled":
            model.compile_base(dynamic=False)
        if mode == INFER:
            from rmt_fast.streaming import StreamingReader

            model.eval()

            def infer(tokens):
                reader = StreamingReader(model, batch_size=tokens.shape[0], progress=False)
                reader.feed(tokens)
                reader.flush()
            return infer
        model.train()

        def train(tokens):
            model.zero_grad(set_to_none=True)
            model(tokens, labels=tokens, return_logits=False).loss.backward()
        return train
    if system == "full":
        model = _gpt2(cfg, length, "sdpa")
        if mode == INFER:
            model.eval()

            @torch.no_grad()
            def infer(tokens):
                model(tokens, use_cache=False)
            return infer
        model.train()

        def train(tokens):
            model.zero_grad(set_to_none=True)
            model(tokens, labels=tokens, use_cache=False).loss.backward()
        return train
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
            wrapper.eval()

            @torch.no_grad()
            def infer(tokens):
                wrapper(tokens)
            return infer
        wrapper.train()
        mrbp = system == "lucidrains_mrbp"

        def train(tokens):
            wrapper.zero_grad(set_to_none=True)
            x = torch.cat([tokens, tokens[:, :1]], dim=1)  # it predicts n tokens from n + 1
            if mrbp:
                wrapper(x, memory_replay_backprop=True)
            else:
                out = wrapper(x, return_loss=True)  # 0.7.0 returns (loss, memories)
                (out[0] if isinstance(out, tuple) else out).backward()
        return train
    raise ValueError(f"unknown system {system!r}; choose from {SYSTEMS}")


SYSTEMS = ("rmt_fast", "rmt_fast_bptt", "rmt_fast_compiled", "full", "lucidrains", "lucidrains_mrbp")


def available(system: str) -> bool:
    if system.startswith("lucidrains"):
        try:
            import recurrent_memory_transformer_pytorch  # noqa: F401
        except ImportError:
            return False
    return True
