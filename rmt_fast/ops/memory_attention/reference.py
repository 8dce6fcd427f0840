"""Dense reference for ``memory_attention``: obviously correct, float64-capable, used by the tests."""

from __future__ import annotations

import torch

from rmt_fast.masks import AttentionLayout, layout_from, layout_visibility


def reference_memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: AttentionLayout | None = None,
    *,
    past_k: torch.Tensor | None = None,
    past_v: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    upcast: bool = False,
    **layout_fields,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise the scores and the mask; return ``(out [B, Hq, L, D], lse [B, Hq, L] float32)``.

    ``layout``: an :class:`AttentionLayout`, or its fields as keywords (``num_read=2, ...``).
    ``attn_mask`` (bool, broadcastable to ``[B, Hq, L, P + L]``, True = attend) replaces the mode
    mask when given. ``upcast`` computes in float64. Rows that see nothing return zeros and an
    LSE of ``-inf``.
    """
    layout = layout_from(layout, layout_fields).with_head_dim(q.shape[-1])
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
        past_k = past_k.double() if past_k is not None else None
        past_v = past_v.double() if past_v is not None else None
    length, past_length = q.shape[2], 0 if past_k is None else past_k.shape[2]
    if past_k is not None:
        k = torch.cat([past_k.to(k.dtype), k], dim=2)
        v = torch.cat([past_v.to(v.dtype), v], dim=2)
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    if attn_mask is None:
        vis = layout_visibility(layout, length, past_length, key_padding_mask, q.device)
        vis = vis[:, None] if vis.dim() == 3 else vis  # [B, 1, L, Lk] or [L, Lk]
    else:
        vis = attn_mask.to(torch.bool)
    scores = (q @ k.transpose(-1, -2)) * layout.scale
    if layout.softcap is not None:
        scores = torch.tanh(scores / layout.softcap) * layout.softcap
    scores = scores.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    probs = probs.masked_fill(~vis, 0.0)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out = probs @ v
    return out.to(dtype), lse.float()
