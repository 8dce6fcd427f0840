"""Dense reference for ``memory_attention``: obviously correct, float64-capable, used by the tests."""

from __future__ import annotations

import torch

from rmt_fast.masks import dense_visibility


def reference_memory_attention(
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
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise the scores and the mask; return ``(out [B, Hq, L, D], lse [B, Hq, L] float32)``.

    ``attn_mask`` (bool, broadcastable to ``[B, Hq, L, P + L]``, True = attend) replaces the mode
    mask when given. ``upcast`` computes in float64. Rows that see nothing return zeros and an
    LSE of ``-inf``.
    """
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
        vis = dense_visibility(
            length, past_length, num_read=num_read, num_write=num_write, mask=mask,
            past_visible_to_read=past_visible_to_read, key_padding_mask=key_padding_mask,
            device=q.device,
        )
        vis = vis[:, None] if vis.dim() == 3 else vis  # [B, 1, L, Lk] or [L, Lk]
    else:
        vis = attn_mask.to(torch.bool)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    probs = probs.masked_fill(~vis, 0.0)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out = probs @ v
    return out.to(dtype), lse.float()
