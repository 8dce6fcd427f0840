"""Memory-token attention masks: one definition shared by every backend.

A query block of length ``L`` is laid out as ``[read memory (R) | segment (S) | write memory (W)]``
with ``S = L - R - W``. Keys are ``[past (P) | the same L positions]``; the past keys/values
(a Transformer-XL cache or memory states) live in their own buffer.

Visibility of current key ``j`` from query row ``i`` per mode:

============  ==================  ======================  ================
mode          read rows (i < R)   segment rows            write rows
============  ==================  ======================  ================
causal        j <= i              j <= i                  j <= i
rmt           j < R               j <= i                  every j
full          every j             every j                 every j
bottleneck    every j             j < R or j >= L - W     every j
============  ==================  ======================  ================

Past keys are visible to segment and write rows always, and to read rows only when
``past_visible_to_read``. ``key_padding_mask[b, P + j]`` (True = real token) removes key ``j``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

MASK_MODES = ("causal", "rmt", "full", "bottleneck")
#: Integer codes used by the Triton kernels (``constexpr`` arguments).
MASK_CODES = {name: code for code, name in enumerate(MASK_MODES)}


def check_mask_mode(mask: str) -> int:
    if mask not in MASK_CODES:
        raise ValueError(f"mask must be one of {MASK_MODES}, got {mask!r}")
    return MASK_CODES[mask]


def current_key_visible(
    qi: torch.Tensor, kj: torch.Tensor, num_read: int, num_write: int, length: int, mask: str
) -> torch.Tensor:
    """Element predicate: may query row ``qi`` see current key ``kj``? Broadcasts its index tensors."""
    read_q = qi < num_read
    write_q = qi >= length - num_write
    causal = kj <= qi
    if mask == "causal":
        return causal & torch.ones_like(read_q)
    if mask == "full":
        return torch.ones_like(causal)
    if mask == "rmt":
        return torch.where(read_q, kj < num_read, causal | write_q)
    if mask == "bottleneck":
        mem_k = (kj < num_read) | (kj >= length - num_write)
        return mem_k | read_q | write_q
    raise ValueError(f"mask must be one of {MASK_MODES}, got {mask!r}")


def dense_visibility(
    length: int,
    past_length: int = 0,
    *,
    num_read: int = 0,
    num_write: int = 0,
    mask: str = "causal",
    past_visible_to_read: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dense boolean visibility, True = attend.

    Returns ``[L, P + L]`` without padding, ``[B, L, P + L]`` with ``key_padding_mask`` ``[B, P + L]``.
    """
    qi = torch.arange(length, device=device)[:, None]
    kj = torch.arange(length, device=device)[None, :]
    cur = current_key_visible(qi, kj, num_read, num_write, length, mask)
    past = torch.ones(length, past_length, dtype=torch.bool, device=device)
    if not past_visible_to_read:
        past[:num_read] = False
    vis = torch.cat([past, cur], dim=1)
    if key_padding_mask is not None:
        vis = vis[None] & key_padding_mask[:, None, :].to(torch.bool)
    return vis


# --- block structure (used by the fast CPU path and to plan kernel block skipping) -------------

FULL, DIAG, DENSE = "full", "diag", "dense"


@dataclass(frozen=True)
class KeyBlock:
    """A contiguous key range seen by a whole row group: ``full``, causal ``diag``, or ``dense``.

    ``source`` is ``"past"`` or ``"cur"``; a ``diag`` block starts at the row group's first row,
    so row ``r`` of the group sees keys ``[start, start + r]``; a ``dense`` block (all current
    keys) applies the mode's element mask (:func:`dense_visibility`) as a bias.
    """

    source: str
    start: int
    end: int
    kind: str


@dataclass(frozen=True)
class RowGroup:
    start: int
    end: int
    blocks: tuple[KeyBlock, ...]


@functools.lru_cache(maxsize=256)  # called per attention call with a handful of distinct layouts
def block_plan(
    length: int,
    past_length: int,
    num_read: int,
    num_write: int,
    mask: str,
    past_visible_to_read: bool,
) -> tuple[RowGroup, ...]:
    """Decompose the mask into row groups, each seeing a few full or causal-diagonal key ranges."""
    check_mask_mode(mask)
    r0, r1, r2 = num_read, length - num_write, length  # boundaries of read | segment | write
    spans = [(0, r0), (r0, r1), (r1, r2)]
    # kind of (row block a, key block b) among read/segment/write; None = invisible
    table = {
        "causal": [[DIAG, None, None], [FULL, DIAG, None], [FULL, FULL, DIAG]],
        "rmt": [[FULL, None, None], [FULL, DIAG, None], [FULL, FULL, FULL]],
        "full": [[FULL, FULL, FULL]] * 3,
        "bottleneck": [[FULL, FULL, FULL], [FULL, None, FULL], [FULL, FULL, FULL]],
    }[mask]
    past_all = past_length == 0 or past_visible_to_read or num_read == 0
    if mask == "causal" and past_all:
        # plain causal over all L rows: one diagonal block
        groups = [(0, length, [KeyBlock("cur", 0, length, DIAG)])]
    elif mask == "full" and past_all:
        groups = [(0, length, [KeyBlock("cur", 0, length, FULL)])]
    else:
        groups = []
        for a, (qs, qe) in enumerate(spans):
            if qe <= qs:
                continue
            blocks: list[KeyBlock] = []
            for b, (ks, ke) in enumerate(spans):
                kind = table[a][b]
                if kind is None or ke <= ks:
                    continue
                if kind == FULL and blocks and blocks[-1].kind == FULL and blocks[-1].end == ks:
                    blocks[-1] = KeyBlock("cur", blocks[-1].start, ke, FULL)  # coalesce
                else:
                    blocks.append(KeyBlock("cur", ks, ke, kind))
            groups.append((qs, qe, blocks))
    out = []
    for qs, qe, blocks in groups:
        sees_past = past_length > 0 and (qs >= num_read or past_visible_to_read)
        if sees_past:
            blocks = [KeyBlock("past", 0, past_length, FULL), *blocks]
        out.append(RowGroup(qs, qe, tuple(blocks)))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def dense_plan(length: int, past_length: int, num_read: int, past_visible_to_read: bool
               ) -> tuple[RowGroup, ...]:
    """All current keys as one ``dense`` block; past keys stay a separate ``full`` block."""
    cur = KeyBlock("cur", 0, length, DENSE)
    if past_length == 0:
        return (RowGroup(0, length, (cur,)),)
    past = KeyBlock("past", 0, past_length, FULL)
    if past_visible_to_read or num_read == 0:
        return (RowGroup(0, length, (past, cur)),)
    return (RowGroup(0, num_read, (cur,)), RowGroup(num_read, length, (past, cur)))


@functools.lru_cache(maxsize=64)
def structure_bias(length: int, num_read: int, num_write: int, mask: str,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bias [L, L] with 0 / -inf, visible [L, L] bool)`` of the current keys (CPU)."""
    vis = dense_visibility(length, num_read=num_read, num_write=num_write, mask=mask)
    return torch.zeros(vis.shape, dtype=dtype).masked_fill_(~vis, float("-inf")), vis
