"""Diagonal (wavefront) executor for layer-memory models: ARMT inference over anti-diagonals.

In ARMT the step (layer ``l``, segment ``t``) needs only (``l - 1``, ``t``) (its input) and
(``l``, ``t - 1``) (the layer's associative state), so every step on one anti-diagonal
``l + t = s`` can run at once: ``n_layers + n_segments - 1`` sequential steps instead of
``n_layers * n_segments`` ("Diagonal Batching", Sivtsov et al., arXiv 2506.05229). Each step is
one grouped call over the layers ``l0..l1`` on the diagonal, whose weights are stacked
``[n_layers, ...]`` at construction (a snapshot; the paper uses CUTLASS grouped GEMMs, here they
are ``torch.bmm``/``baddbmm`` over the stacked slice, and the attention is one
:func:`rmt_fast.memory_attention` call over ``G * B`` rows). The associative read and write of
the whole diagonal are single calls too (batch ``G * B``).

Grouped blocks exist for GPT-2 (``GPT2Block``) and Llama (``LlamaDecoderLayer``); other
architectures run the same diagonal schedule with one call per block (``grouped=False`` forces
that path everywhere). Segments of different lengths (a short last segment) are separate groups.

Inference only (no autograd, no dropout, no padding): the outputs equal the sequential order of
:class:`rmt_fast.models.armt.ARMTForCausalLM` to float rounding (tested).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from rmt_fast.attention import memory_attention
from rmt_fast.integrations.transformers import MemoryLayout, memory_layout
from rmt_fast.models.armt import (
    ARMTForCausalLM,
    ARMTOutput,
    ARMTState,
    associative_options,
    clip_read,
    value_input,
    write_options,
)
from rmt_fast.models.segmenting import segment_bounds
from rmt_fast.ops.associative_memory import associative_read, associative_write

FINAL_NORMS = ("ln_f", "norm", "final_layer_norm", "final_layernorm")


class _Captured(Exception):
    def __init__(self, args, kwargs):
        super().__init__("captured")
        self.args, self.kwargs = args, kwargs


def _stack(tensors) -> torch.Tensor:
    return torch.stack([t.detach() for t in tensors]).contiguous()


class _GPT2Stack:
    """GPT-2 blocks ``l0..l1`` as one call: ``H`` ``[G, B, L, d]`` -> ``[G, B, L, d]``."""

    def __init__(self, layers, config):
        if getattr(config, "add_cross_attention", False) or \
                getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise TypeError("grouped GPT-2 blocks need no cross-attention and one attention scale")
        a = layers[0]
        self.eps1, self.eps2 = a.ln_1.eps, a.ln_2.eps
        self.heads, self.hd, self.scale = a.attn.num_heads, a.attn.head_dim, a.attn.scaling
        self.act = a.mlp.act
        self.ln1_w, self.ln1_b = _stack(x.ln_1.weight for x in layers), _stack(x.ln_1.bias for x in layers)
        self.ln2_w, self.ln2_b = _stack(x.ln_2.weight for x in layers), _stack(x.ln_2.bias for x in layers)
        # Conv1D weights are [in, out]: y = x @ W + b
        self.qkv_w, self.qkv_b = _stack(x.attn.c_attn.weight for x in layers), \
            _stack(x.attn.c_attn.bias for x in layers)
        self.o_w, self.o_b = _stack(x.attn.c_proj.weight for x in layers), \
            _stack(x.attn.c_proj.bias for x in layers)
        self.fc_w, self.fc_b = _stack(x.mlp.c_fc.weight for x in layers), \
            _stack(x.mlp.c_fc.bias for x in layers)
        self.pr_w, self.pr_b = _stack(x.mlp.c_proj.weight for x in layers), \
            _stack(x.mlp.c_proj.bias for x in layers)

    @staticmethod
    def _ln(x, w, b, eps):
        d = x.shape[-1]
        return F.layer_norm(x, (d,), eps=eps) * w[:, None, None] + b[:, None, None]

    def __call__(self, sl: slice, H: torch.Tensor, extras) -> torch.Tensor:
        G, B, L, d = H.shape
        x = self._ln(H, self.ln1_w[sl], self.ln1_b[sl], self.eps1).reshape(G, B * L, d)
        qkv = torch.baddbmm(self.qkv_b[sl, None], x, self.qkv_w[sl])
        q, k, v = (t.reshape(G * B, L, self.heads, self.hd).transpose(1, 2) for t in qkv.split(d, -1))
        o = memory_attention(q, k, v, mask="causal", scale=self.scale)
        o = o.transpose(1, 2).reshape(G, B * L, d)
        h = H + torch.baddbmm(self.o_b[sl, None], o, self.o_w[sl]).reshape(G, B, L, d)
        x = self._ln(h, self.ln2_w[sl], self.ln2_b[sl], self.eps2).reshape(G, B * L, d)
        f = self.act(torch.baddbmm(self.fc_b[sl, None], x, self.fc_w[sl]))
        return h + torch.baddbmm(self.pr_b[sl, None], f, self.pr_w[sl]).reshape(G, B, L, d)


class _LlamaStack:
    """Llama blocks (GQA, rotary) ``l0..l1`` as one call; ``extras`` is the captured
    ``position_embeddings`` ``(cos, sin)`` of the segment length."""

    def __init__(self, layers, config):
        a = layers[0]
        att = a.self_attn
        self.hq, self.hkv = config.num_attention_heads, config.num_key_value_heads
        self.hd, self.scale = att.head_dim, att.scaling
        self.eps1, self.eps2 = a.input_layernorm.variance_epsilon, a.post_attention_layernorm.variance_epsilon
        self.act = a.mlp.act_fn
        self.rotary = sys.modules[type(a).__module__].apply_rotary_pos_emb

        def t(get):  # nn.Linear weights [out, in] -> stacked [n, in, out]
            return _stack(get(x).weight.t() for x in layers)

        def b(get):
            return None if get(a).bias is None else _stack(get(x).bias for x in layers)

        self.in_w = _stack(x.input_layernorm.weight for x in layers)
        self.post_w = _stack(x.post_attention_layernorm.weight for x in layers)
        self.q_w, self.q_b = t(lambda x: x.self_attn.q_proj), b(lambda x: x.self_attn.q_proj)
        self.k_w, self.k_b = t(lambda x: x.self_attn.k_proj), b(lambda x: x.self_attn.k_proj)
        self.v_w, self.v_b = t(lambda x: x.self_attn.v_proj), b(lambda x: x.self_attn.v_proj)
        self.o_w, self.o_b = t(lambda x: x.self_attn.o_proj), b(lambda x: x.self_attn.o_proj)
        self.g_w, self.g_b = t(lambda x: x.mlp.gate_proj), b(lambda x: x.mlp.gate_proj)
        self.u_w, self.u_b = t(lambda x: x.mlp.up_proj), b(lambda x: x.mlp.up_proj)
        self.d_w, self.d_b = t(lambda x: x.mlp.down_proj), b(lambda x: x.mlp.down_proj)

    @staticmethod
    def _rms(x, w, eps):
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return w[:, None, None] * x32.to(dtype)

    @staticmethod
    def _lin(x, w, b, sl):
        if b is None:
            return torch.bmm(x, w[sl])
        return torch.baddbmm(b[sl, None], x, w[sl])

    def __call__(self, sl: slice, H: torch.Tensor, extras) -> torch.Tensor:
        G, B, L, d = H.shape
        cos, sin = extras
        x = self._rms(H, self.in_w[sl], self.eps1).reshape(G, B * L, d)
        q = self._lin(x, self.q_w, self.q_b, sl).reshape(G * B, L, self.hq, self.hd).transpose(1, 2)
        k = self._lin(x, self.k_w, self.k_b, sl).reshape(G * B, L, self.hkv, self.hd).transpose(1, 2)
        v = self._lin(x, self.v_w, self.v_b, sl).reshape(G * B, L, self.hkv, self.hd).transpose(1, 2)
        q, k = self.rotary(q, k, cos, sin)
        o = memory_attention(q, k, v, mask="causal", scale=self.scale)
        o = o.transpose(1, 2).reshape(G, B * L, self.hq * self.hd)
        h = H + self._lin(o, self.o_w, self.o_b, sl).reshape(G, B, L, d)
        x = self._rms(h, self.post_w[sl], self.eps2).reshape(G, B * L, d)
        f = self.act(self._lin(x, self.g_w, self.g_b, sl)) * self._lin(x, self.u_w, self.u_b, sl)
        return h + self._lin(f, self.d_w, self.d_b, sl).reshape(G, B, L, d)


GROUPED_BLOCKS = {"GPT2Block": _GPT2Stack, "LlamaDecoderLayer": _LlamaStack}


class DiagonalExecutor:
    """Run an :class:`ARMTForCausalLM` over anti-diagonals of (layer, segment) steps.

    Args:
        model: the ARMT model (its weights are stacked once here; rebuild after changing them).
        grouped: one batched call per diagonal for supported blocks (GPT-2, Llama); False runs
            one call per block, in the same diagonal order.

    ``executor(input_ids [B, T], state=None)`` returns an :class:`ARMTOutput` (logits
    ``[B, T, V]`` and the final :class:`ARMTState`), as ``model(input_ids, state=state)`` in eval
    mode would.
    """

    def __init__(self, model: ARMTForCausalLM, grouped: bool = True):
        if not isinstance(model, ARMTForCausalLM):
            raise TypeError(f"model must be an ARMTForCausalLM, got {type(model).__name__}")
        self.model = model
        self.layers = list(model.layers)
        self.n = len(self.layers)
        name = type(self.layers[0]).__name__
        self.blocks = None
        if grouped and name in GROUPED_BLOCKS:
            self.blocks = GROUPED_BLOCKS[name](self.layers, model.base.config)
        self.final_norm = next((getattr(model.base.base_model, n) for n in FINAL_NORMS
                                if isinstance(getattr(model.base.base_model, n, None), nn.Module)), None)
        if self.final_norm is None:
            raise TypeError(f"cannot find the final norm of {type(model.base.base_model).__name__} "
                            f"(looked for {FINAL_NORMS})")
        a = model.assoc
        self.Wq = _stack(m.W_mq.weight.t() for m in a)  # [n, d, d_mem]
        self.Wk = _stack(m.W_mk.weight.t() for m in a)
        self.Wv = _stack(m.W_mv.weight.t() for m in a)  # [n, d, d]
        self.Wb = _stack(m.W_mb.weight.t() for m in a)  # [n, d, 1]
        self.bb = _stack(m.W_mb.bias for m in a)[:, None]  # [n, 1, 1]
        self.Wa = self.ba = None  # the learnt decay's (ARMTConfig.decay_gate)
        if a[0].W_ma is not None:
            self.Wa = _stack(m.W_ma.weight.t() for m in a)  # [n, d, 1]
            self.ba = _stack(m.W_ma.bias for m in a)[:, None]  # [n, 1, 1]
            self.decay_max = a[0].decay_max

    @property
    def grouped(self) -> bool:
        return self.blocks is not None

    def _block_inputs(self, ids: torch.Tensor):
        """``(hidden [B, L, d], args, kwargs)`` that the base model gives its first block for the
        segment ``ids`` followed by the memory tokens (captured, then the forward is aborted)."""
        model = self.model
        embeds = model.base.get_input_embeddings()(ids)
        embeds = torch.cat([embeds, model.expand_memory(ids.shape[0]).to(embeds.dtype)], dim=1)

        def capture(_module, args, kwargs):
            raise _Captured(args, kwargs)

        handle = self.layers[0].register_forward_pre_hook(capture, with_kwargs=True, prepend=True)
        try:
            model.base.base_model(inputs_embeds=embeds, use_cache=False,
                                  position_ids=model._position_ids(None, ids.shape[1], True, ids.device))
        except _Captured as c:
            args, kwargs = c.args, c.kwargs
        else:  # pragma: no cover - every block-based model reaches its first block
            raise RuntimeError("the base model never called its first block")
        finally:
            handle.remove()
        if args:
            return args[0], args[1:], kwargs
        kwargs = dict(kwargs)
        return kwargs.pop("hidden_states"), (), kwargs

    def _step(self, l0: int, l1: int, H: torch.Tensor, fresh: torch.Tensor, A_all, z_all, call):
        """Layers ``l0..l1`` on their cells: read, block, write. ``H`` ``[G, B, L, d]``."""
        sl = slice(l0, l1 + 1)
        G, B, L, d = H.shape
        sd, cfg = self.Wq.dtype, self.model.rmt_config
        opts = associative_options(cfg)
        A = A_all[sl].reshape(G * B, *A_all.shape[2:])
        z = z_all[sl].reshape(G * B, z_all.shape[-1])
        x = torch.bmm(H.reshape(G, B * L, d).to(sd), self.Wq[sl]).reshape(G * B, L, -1)
        # fresh cells hold a zero state, where the read is exactly 0 (as skipping it)
        read = associative_read(x, A, z, **opts).reshape(G, B, L, d).to(H.dtype)
        H = H + clip_read(read, H, cfg.read_clip)
        out = call(sl, H)
        m = cfg.num_mem_tokens
        mem = out[:, :, -m:].reshape(G, B * m, d).to(sd)
        km = torch.bmm(mem, self.Wk[sl]).reshape(G * B, m, -1)
        v = torch.bmm(value_input(mem, cfg.value_norm), self.Wv[sl]).reshape(G * B, m, d)
        beta = torch.sigmoid(torch.baddbmm(self.bb[sl], mem, self.Wb[sl])).reshape(G * B, m)
        opts = write_options(cfg)
        if self.Wa is not None:  # learnt_decay's formula, batched over the diagonal's layers
            mean = mem.reshape(G, B, m, d).mean(2)
            opts["decay"] = self.decay_max * torch.sigmoid(
                torch.baddbmm(self.ba[sl], mean, self.Wa[sl])).reshape(G * B)
        A2, z2 = associative_write(km, v, beta, A, z, first=fresh.repeat_interleave(B), **opts)
        A_all[sl] = A2.reshape(A_all[sl].shape)
        z_all[sl] = z2.reshape(z_all[sl].shape)
        return out

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, state: ARMTState | None = None,
                 return_logits: bool = True) -> ARMTOutput:
        model = self.model
        model._check_inputs(input_ids, None, None, None, state)
        cfg = model.rmt_config
        batch = input_ids.shape[0]
        bounds = segment_bounds(input_ids.shape[1], cfg.segment_size, cfg.segment_alignment)
        n_seg = len(bounds)
        if state is None:
            state = model.init_state(batch)
        A_all = torch.stack(state.A)  # [n_layers, B, d_key, d]
        z_all = torch.stack(state.z)
        fresh0 = state.fresh
        pending: dict[int, torch.Tensor] = {}  # layer -> input of its cell on this diagonal
        block_args: dict[int, tuple] = {}  # segment length -> (args, kwargs) of the blocks
        logits: list[torch.Tensor | None] = [None] * n_seg
        layout = MemoryLayout(num_read=0, num_write=cfg.num_mem_tokens, mask="causal")
        for s in range(self.n + n_seg - 1):
            if s < n_seg:
                st, en = bounds[s]
                h0, args, kwargs = self._block_inputs(input_ids[:, st:en])
                pending[0] = h0
                block_args.setdefault(h0.shape[1], (args, kwargs))
            # cells on this diagonal, grouped into runs of consecutive layers of one length
            runs: list[list[int]] = []
            for layer in sorted(pending):
                if runs and pending[runs[-1][-1]].shape[1] == pending[layer].shape[1]:
                    runs[-1].append(layer)
                else:
                    runs.append([layer])
            nxt: dict[int, torch.Tensor] = {}
            for run in runs:
                H = torch.stack([pending[layer] for layer in run])
                args, kwargs = block_args[H.shape[2]]
                fresh = torch.tensor([fresh0 and s - layer == 0 for layer in run], device=H.device)
                out = self._step(run[0], run[-1], H, fresh, A_all, z_all,
                                 self._caller(args, kwargs, layout))
                for g, layer in enumerate(run):
                    t = s - layer
                    if layer == self.n - 1:
                        if return_logits:
                            seg_len = bounds[t][1] - bounds[t][0]
                            logits[t] = model.logits(self.final_norm(out[g][:, :seg_len]))
                    else:
                        nxt[layer + 1] = out[g]
            pending = nxt
        new = ARMTState(tuple(A_all.unbind(0)), tuple(z_all.unbind(0)), state.segments + n_seg)
        return ARMTOutput(logits=torch.cat(logits, dim=1) if return_logits else None, state=new)

    def _caller(self, args, kwargs, layout):
        """``call(slice, H [G, B, L, d])`` for one group: grouped, or block by block."""
        if self.blocks is not None:
            extras = kwargs.get("position_embeddings")
            return lambda sl, H: self.blocks(sl, H, extras)

        def block(layer, h):
            out = self.layers[layer](h, *args, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        def per_block(sl, H):
            with memory_layout(layout):
                return torch.stack([block(layer, H[g])
                                    for g, layer in enumerate(range(sl.start, sl.stop))])

        return per_block

    def sequential_steps(self, n_segments: int) -> tuple[int, int]:
        """``(diagonal steps, sequential steps)`` for ``n_segments``: ``n + T - 1`` vs ``n T``."""
        return self.n + n_segments - 1, self.n * n_segments
