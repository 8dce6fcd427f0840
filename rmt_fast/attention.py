"""``memory_attention``: the one attention entry point used by everything in ``rmt_fast``."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from rmt_fast.masks import AttentionLayout, layout_visibility
from rmt_fast.ops.memory_attention import cpu_kernel
from rmt_fast.ops.memory_attention.cpu_flash import cpu_flash_memory_attention
from rmt_fast.ops.memory_attention.dense import dense_sdpa
from rmt_fast.ops.memory_attention.reference import reference_memory_attention

BACKENDS = ("auto", "triton", "torch", "cpu", "reference")


def _check_inputs(q, k, v, layout: AttentionLayout, past_k, past_v, key_padding_mask, backend):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = getattr(t, "shape", type(t).__name__)
            raise ValueError(f"{name} must be a 4-D tensor [B, H, L, D], got {shape}")
    batch, hq, length, dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Hkv, L, D], got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[2] != length or k.shape[3] != dim:
        raise ValueError(f"k must be [B={batch}, Hkv, L={length}, D={dim}], got {tuple(k.shape)}")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must match q's dtype and device ({q.dtype}, {q.device}), "
                             f"got ({t.dtype}, {t.device})")
    if not q.is_floating_point():
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}")
    layout.check_length(length)
    if (past_k is None) != (past_v is None):
        raise ValueError("past_k and past_v must be given together")
    past_length = 0
    if past_k is not None:
        if past_k.dim() != 4 or past_k.shape != past_v.shape:
            raise ValueError(f"past_k and past_v must both be [B, Hkv, P, D], got "
                             f"{tuple(past_k.shape)} and {tuple(past_v.shape)}")
        if past_k.shape[0] != batch or past_k.shape[1] != hkv or past_k.shape[3] != dim:
            raise ValueError(f"past_k must be [B={batch}, Hkv={hkv}, P, D={dim}], got "
                             f"{tuple(past_k.shape)}")
        for name, t in (("past_k", past_k), ("past_v", past_v)):
            if t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"{name} must match q's dtype and device ({q.dtype}, {q.device})"
                                 f", got ({t.dtype}, {t.device})")
        past_length = past_k.shape[2]
    if key_padding_mask is not None:
        want = (batch, past_length + length)
        if key_padding_mask.dim() != 2 or tuple(key_padding_mask.shape) != want:
            raise ValueError(f"key_padding_mask must be [B, P + L] = {list(want)}, got "
                             f"{list(key_padding_mask.shape)}")
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be bool (True = real token), got "
                             f"{key_padding_mask.dtype}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on {q.device}, got "
                             f"{key_padding_mask.device}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return past_length


def memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_read: int = 0,
    num_write: int = 0,
    mask: str = "causal",
    past_k: torch.Tensor | None = None,
    past_v: torch.Tensor | None = None,
    past_visible_to_read: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    dropout_p: float = 0.0,
):
    """Attention over ``[read memory | segment | write memory]`` with optional past keys.

    Args:
        q: ``[B, Hq, L, D]``. ``k``, ``v``: ``[B, Hkv, L, D]``, ``Hq % Hkv == 0``; query head ``h``
            uses kv head ``h // (Hq // Hkv)``.
        num_read, num_write: sizes of the read block (first rows) and write block (last rows).
        mask: ``"causal"``, ``"rmt"``, ``"full"`` or ``"bottleneck"``
            (see :mod:`rmt_fast.masks` for the exact visibility table).
        past_k, past_v: ``[B, Hkv, P, D]`` keys/values in their own buffer, seen by segment and
            write rows, and by read rows when ``past_visible_to_read``.
        key_padding_mask: ``[B, P + L]`` bool, True = real token. Rows that see nothing give 0.
        scale: softmax scale, default ``D ** -0.5``.
        window: sliding window in keys (None: none): query row ``i``, at position ``P + i`` of
            the keys ``[past | current]``, also stops seeing keys ``window`` or more positions
            before it (with ``mask="causal"``: its last ``window`` keys, itself included, as
            Mistral's or gpt-oss's sliding-window layers). Runs on the Triton and fused CPU
            kernels (out-of-window key tiles are skipped); the ``"torch"`` backend builds a
            dense mask.
        softcap: logit soft-capping (Gemma 2's ``attn_logit_softcapping``; None: none): the
            scaled scores ``x`` become ``softcap * tanh(x / softcap)`` before the mask and the
            softmax (the log-sum-exp is of the capped scores). Runs on the Triton and fused CPU
            kernels; the ``"torch"`` backend computes dense scores (in float32 at least).
        return_lse: also return the float32 log-sum-exp ``[B, Hq, L]`` (``-inf`` on empty rows),
            differentiable on every backend (a loss may use it, e.g. to merge partial results
            or add a sink logit).
        backend: ``"auto"`` (Triton on CUDA; on CPU what
            :func:`rmt_fast.ops.memory_attention.cpu_kernel.auto_path` measured fastest: the
            extension's kernel, ATen's SDPA with a dense mask (bf16 inference on AMX CPUs where
            the kernel may not use the tiles) or the ``"torch"`` path), ``"triton"`` (on CPU
            tensors it runs under ``TRITON_INTERPRET=1``), ``"torch"``, ``"cpu"`` (the
            extension's fused CPU kernel; float16/float64 inputs, or a build without it, take the
            ``"torch"`` path), ``"reference"``.
        dropout_p: attention dropout (torch and reference backends; uses a dense mask).

    Returns:
        ``[B, Hq, L, D]`` in the input dtype (under ``torch.autocast``: q, k, v and the past
        keys/values are cast to the autocast dtype first, as SDPA does), and the LSE when
        ``return_lse``. Not necessarily contiguous: the CPU kernel returns a ``[B, L, Hq, D]``
        buffer seen as ``[B, Hq, L, D]`` (``out.transpose(1, 2)`` is then contiguous); use
        ``reshape``, not ``view``.
    """
    if isinstance(q, torch.Tensor) and q.is_floating_point() and torch.is_autocast_enabled(q.device.type):
        # as SDPA under autocast: compute in the autocast dtype (a rotary embedding makes q and k
        # float32 under bf16 autocast while v stays bf16)
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v, past_k, past_v = (t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point()
                                   else t for t in (q, k, v, past_k, past_v))
    layout = AttentionLayout(num_read, num_write, mask, past_visible_to_read, scale, window,
                             softcap)
    past_length = _check_inputs(q, k, v, layout, past_k, past_v, key_padding_mask, backend)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    layout = layout.with_head_dim(q.shape[-1])
    windowed = layout.cutting_window(past_length, q.shape[2]) is not None
    if layout.window is not None and not windowed:
        layout = dataclasses.replace(layout, window=None)  # a window that cuts no key
    tensors = dict(past_k=past_k, past_v=past_v, key_padding_mask=key_padding_mask)
    # plain causal attention (no past keys, no padding): SDPA's own causal mask, none built
    plain_causal = layout.mask == "causal" and past_length == 0 and key_padding_mask is None \
        and not windowed
    capped = layout.softcap is not None
    auto_sdpa = False
    if backend == "auto":
        if q.is_cuda and _triton_available():
            backend = "triton"
        elif dropout_p > 0.0:
            backend = "torch"
        elif windowed or capped:
            # the kernel skips the key tiles outside the window and caps the scores tile by
            # tile; nothing else here does either
            backend = "cpu" if cpu_kernel.supports_layout(q, layout) else "torch"
        else:
            needs_grad = torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v, past_k, past_v))
            length = q.shape[2]
            elements = 0 if plain_causal else \
                (1 if key_padding_mask is None else q.shape[0]) * length * (past_length + length)
            backend = cpu_kernel.auto_path(q, past_k, needs_grad=needs_grad, return_lse=return_lse,
                                           mask_elements=elements)
            auto_sdpa = backend == "sdpa"
            backend = "torch" if auto_sdpa else backend
    if backend in ("triton", "cpu") and dropout_p > 0.0:
        raise ValueError(f"dropout_p > 0 is not supported by the {backend} backend; use "
                         "backend='torch'")
    if backend == "cpu" and q.device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got {q.device}")
    # the cpu_flash path has no window (ATen's flash attention takes none)
    dense_needed = dropout_p > 0.0 or not _fast_cpu_ok(q) or auto_sdpa or \
        (windowed and backend == "torch")
    if backend == "reference":
        out, lse = reference_memory_attention(q, k, v, layout, dropout_p=dropout_p, **tensors)
    elif capped and backend == "torch":  # no SDPA takes a cap: dense scores, float32 at least
        out, lse = _dense_capped(q, k, v, layout, dropout_p, tensors)
    elif backend in ("torch", "cpu") and return_lse and dense_needed:
        out, lse = reference_memory_attention(q, k, v, layout, dropout_p=dropout_p, **tensors)
    elif backend == "triton":
        from rmt_fast.ops.memory_attention.triton import triton_memory_attention

        out, lse = triton_memory_attention(q, k, v, layout, **tensors)
    elif backend == "cpu" and q.shape[-1] > 0:
        out, lse = cpu_kernel.cpu_kernel_memory_attention(q, k, v, past_k, past_v,
                                                          key_padding_mask, layout)
    elif dense_needed and plain_causal and q.shape[-1] > 0:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                             scale=layout.scale, enable_gqa=q.shape[1] != k.shape[1])
        lse = None
    elif dense_needed:
        visible = layout_visibility(layout, q.shape[2], past_length, key_padding_mask, q.device)
        visible = visible[:, None] if visible.dim() == 3 else visible
        kk = k if past_k is None else torch.cat([past_k, k], dim=2)
        vv = v if past_v is None else torch.cat([past_v, v], dim=2)
        out = dense_sdpa(q, kk, vv, visible, scale=layout.scale, dropout_p=dropout_p)
        lse = None
    else:
        out, lse = cpu_flash_memory_attention(q, k, v, past_k, past_v, key_padding_mask, layout)
    if return_lse:
        return out, lse.float()
    return out


def _dense_capped(q, k, v, layout: AttentionLayout, dropout_p: float, tensors: dict):
    """:func:`reference_memory_attention` (soft-capped dense scores) computed in float32 for
    lower-precision inputs (its softmax would run in their dtype), returned in ``q``'s dtype."""
    if q.element_size() >= 4:
        return reference_memory_attention(q, k, v, layout, dropout_p=dropout_p, **tensors)
    up = {n: t.float() if n != "key_padding_mask" and t is not None else t
          for n, t in tensors.items()}
    out, lse = reference_memory_attention(q.float(), k.float(), v.float(), layout,
                                          dropout_p=dropout_p, **up)
    return out.to(q.dtype), lse


def _fast_cpu_ok(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.shape[-1] > 0


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
