"""Dense-mask SDPA path: arbitrary boolean masks and attention dropout, on any device."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    *,
    scale: float | None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` with a bool ``visible`` mask broadcastable to
    ``[B, Hq, Lq, Lk]`` (True = attend). ``k``/``v``: ``[B, Hkv, Lk, D]`` (GQA without copies).
    Rows that see nothing return zeros.
    """
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=visible, dropout_p=dropout_p, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    any_visible = visible.any(dim=-1, keepdim=True)
    return out.masked_fill(~any_visible, 0.0)
