"""Attention whose scores carry more than ``q k^T``, the backend's two ways, one thread, CPU:
gpt-oss's sink logit per head (``--terms sinks``) and Gemma 2's logit soft-cap
(``--terms softcap``).

``exact``: transformers' eager formula on dense scores (what ``attn_implementation="rmt_fast"``
ran for every call with either term before, and still runs for T5's position bias).
``fused``: sinks as ``memory_attention(..., return_lse=True)`` and ``out * sigmoid(lse - sink)``
(:func:`rmt_fast.integrations.transformers._with_sinks`); the soft-cap as
``memory_attention(..., softcap=c)``, capped tile by tile in the kernel. Causal self-attention
``[1, H, L, D]`` with GQA; timing as :mod:`rmt_fast.bench.two_ways`; ``max |diff|`` compares
the two outputs.

``--model``: the whole model instead, a 2-layer Gemma 2 (softcap) or gpt-oss (sinks, one
sliding and one full layer) with the attention shape given, built from its config with
``attn_implementation="eager"`` (``exact``) and ``"rmt_fast"`` (``fused``), same weights; one
sequence of ``L`` tokens, a loss on the float32 square of the logits for the backward.

``python -m rmt_fast.bench.scored --terms sinks --dtype float32 bfloat16 --lengths 1024 4096``
``python -m rmt_fast.bench.scored --terms softcap --heads 8 --kv-heads 4 --dim 256`` (Gemma 2 2B)
"""

from __future__ import annotations

import argparse
import copy

import torch

from rmt_fast import memory_attention
from rmt_fast.bench.two_ways import sweep, time_ways
from rmt_fast.integrations.transformers import _exact_attention, _with_sinks

#: Gemma 2's ``attn_logit_softcapping``
GEMMA2_SOFTCAP = 50.0


def run(term: str, dtype: torch.dtype, length: int, heads: int = 8, kv_heads: int = 2,
        dim: int = 64, rounds: int = 5) -> dict:
    """One case: ``{"exact fwd": ms, "exact fwd+bwd": ms, "fused ...": ..., "max_diff": x}``.
    ``term``: ``"sinks"`` or ``"softcap"``."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, length, dim, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(1, kv_heads, length, dim, generator=g).to(dtype).requires_grad_()
            for _ in range(2))
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    scale = dim ** -0.5
    if term == "sinks":
        sinks = torch.randn(heads, generator=g).to(dtype).requires_grad_()
        ways = {
            "exact": lambda: _exact_attention(q, k, v, mask, scale, 0.0, None, sinks, None),
            "fused": lambda: _with_sinks(memory_attention(q, k, v, mask="causal", scale=scale,
                                                          return_lse=True), sinks),
        }
    elif term == "softcap":
        cap = GEMMA2_SOFTCAP
        ways = {
            "exact": lambda: _exact_attention(q, k, v, mask, scale, 0.0, cap, None, None),
            "fused": lambda: memory_attention(q, k, v, mask="causal", scale=scale, softcap=cap),
        }
    else:
        raise ValueError(f"term must be 'sinks' or 'softcap', got {term!r}")
    return time_ways(ways, rounds)


def run_model(term: str, dtype: torch.dtype, length: int, heads: int = 8, kv_heads: int = 2,
              dim: int = 64, rounds: int = 3) -> dict:
    """:func:`run` on a whole 2-layer model (see the module docstring), hidden size
    ``heads * dim``, MLP 4x, vocabulary 1000, no window that cuts ``length`` keys."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, GptOssConfig, GptOssForCausalLM

    shape = dict(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=dim,
                 hidden_size=heads * dim, intermediate_size=4 * heads * dim, num_hidden_layers=2,
                 max_position_embeddings=length, vocab_size=1000)
    if term == "softcap":
        cls, cfg = Gemma2ForCausalLM, Gemma2Config(attn_logit_softcapping=GEMMA2_SOFTCAP,
                                                   sliding_window=length, **shape)
    elif term == "sinks":
        cls, cfg = GptOssForCausalLM, GptOssConfig(
            num_local_experts=2, num_experts_per_tok=1, sliding_window=length,
            layer_types=["sliding_attention", "full_attention"], **shape)
    else:
        raise ValueError(f"term must be 'sinks' or 'softcap', got {term!r}")
    models = []
    for impl in ("eager", "rmt_fast"):
        torch.manual_seed(0)
        # a config each: a model reads its attention implementation from its config per call
        models.append(cls._from_config(copy.deepcopy(cfg), attn_implementation=impl)
                      .to(dtype).train())
    assert models[0].config._attn_implementation == "eager"
    ids = torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(1))
    ways = {name: (lambda m=m: m(input_ids=ids).logits)
            for name, m in zip(("exact", "fused"), models, strict=True)}
    return time_ways(ways, rounds)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--terms", nargs="+", choices=["sinks", "softcap"], default=["sinks", "softcap"])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--model", action="store_true", help="time a whole 2-layer model")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    fn = run_model if args.model else run
    return sweep(dict(term=args.terms, dtype=args.dtype, L=args.lengths),
                 lambda term, dtype, L: fn(term, getattr(torch, dtype), L, args.heads,
                                           args.kv_heads, args.dim, rounds=args.rounds),
                 "exact", "fused")

if __name__ == "__main__":
    main()
