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

A sliding ``window`` (``w``) hides, from query row ``i`` (position ``P + i`` of the concatenated
keys ``[past | current]``), every key at a position ``a`` with ``P + i - a >= w``: with the
``causal`` mode each row sees its last ``w`` keys, itself included, as the sliding-window layers
of Mistral, Gemma 2/3 or gpt-oss (transformers' ``kv_idx > q_idx - sliding_window``). Keys after
the row's position are not affected.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

MASK_MODES = ("causal", "rmt", "full", "bottleneck")


def check_mask_mode(mask) -> str:
    """``mask`` if it is one of :data:`MASK_MODES`, else a ValueError naming the choices."""
    if not isinstance(mask, str) or mask not in MASK_MODES:
        raise ValueError(f"mask must be one of {MASK_MODES}, got {mask!r}")
    return mask


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


@dataclass(frozen=True)
class AttentionLayout:
    """The non-tensor structure of one attention call, validated once and shared by every
    backend (reference, dense, fused CPU, Triton).

    Attributes:
        num_read: ``R``, rows of the read block (the first rows).
        num_write: ``W``, rows of the write block (the last rows).
        mask: one of :data:`MASK_MODES` (the table in this module's docstring).
        past_visible_to_read: whether read rows see the past keys too.
        scale: softmax scale; None means ``D ** -0.5`` (see :meth:`with_head_dim`).
        window: sliding window in keys (this module's docstring), None for none.
        softcap: logit soft-capping (Gemma 2), None for none: the scaled scores ``x`` become
            ``softcap * tanh(x / softcap)`` before the mask and the softmax.
    """

    num_read: int = 0
    num_write: int = 0
    mask: str = "causal"
    past_visible_to_read: bool = False
    scale: float | None = None
    window: int | None = None
    softcap: float | None = None

    def __post_init__(self) -> None:
        _check_count("num_read", self.num_read)
        _check_count("num_write", self.num_write)
        check_mask_mode(self.mask)
        if not isinstance(self.past_visible_to_read, bool):
            raise ValueError(f"past_visible_to_read must be a bool, got {self.past_visible_to_read!r}")
        if self.scale is not None:
            if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or \
                    not math.isfinite(self.scale):
                raise ValueError(f"scale must be a finite float or None, got {self.scale!r}")
            object.__setattr__(self, "scale", float(self.scale))
        if self.window is not None and (isinstance(self.window, bool) or
                                        not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"window must be a positive int (keys) or None, got {self.window!r}")
        if self.softcap is not None:
            if isinstance(self.softcap, bool) or not isinstance(self.softcap, (int, float)) or \
                    not math.isfinite(self.softcap) or self.softcap <= 0:
                raise ValueError(f"softcap must be a positive finite float or None, got "
                                 f"{self.softcap!r}")
            object.__setattr__(self, "softcap", float(self.softcap))

    def with_head_dim(self, head_dim: int) -> AttentionLayout:
        """This layout with ``scale`` resolved (``head_dim ** -0.5`` when it is None)."""
        if self.scale is not None:
            return self
        return dataclasses.replace(self, scale=float(head_dim ** -0.5) if head_dim else 1.0)

    def cutting_window(self, past_length: int, length: int) -> int | None:
        """``window`` where it hides a key of a call with ``past_length`` past and ``length``
        current keys, else None: the farthest key is ``P + L - 1`` positions back, so a window
        of ``P + L`` keys or more cuts nothing (and the unwindowed paths give the same result)."""
        if self.window is None or self.window >= past_length + length:
            return None
        return self.window

    def first_past_row(self) -> int:
        """Rows ``>=`` this see the past keys: read rows are hidden from them unless
        ``past_visible_to_read`` (the one place this rule lives on the Python side)."""
        return 0 if self.past_visible_to_read else self.num_read

    def check_length(self, length: int) -> None:
        if self.num_read + self.num_write > length:
            raise ValueError(f"num_read + num_write ({self.num_read} + {self.num_write}) must be "
                             f"<= L ({length})")


def current_key_visible(
    qi: torch.Tensor, kj: torch.Tensor, num_read: int, num_write: int, length: int, mask: str,
    window: int | None = None,
) -> torch.Tensor:
    """Element predicate: may query row ``qi`` see current key ``kj``? Broadcasts its index tensors.

    This is the one definition of the modes on the Python side: the block plans below are
    derived from it (the Triton kernels carry their own ``@triton.jit`` copy, tested against it).
    ``window``: also hide keys with ``qi - kj >= window``.
    """
    if window is not None:
        return current_key_visible(qi, kj, num_read, num_write, length, mask) & (qi - kj < window)
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


def past_key_visible(qi: torch.Tensor, pa: torch.Tensor, past_length: int, first_row: int,
                     window: int | None = None) -> torch.Tensor:
    """Element predicate: may query row ``qi`` see past key ``pa`` (``0 <= pa < P``)? Rows before
    ``first_row`` (:meth:`AttentionLayout.first_past_row`) see none; with ``window`` the past
    key sits at position ``pa`` and row ``qi`` at ``P + qi``, hidden when ``P + qi - pa >=
    window``. Broadcasts its index tensors."""
    vis = qi >= first_row
    if window is not None:
        vis = vis & (past_length + qi - pa < window)
    return vis


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
    window: int | None = None,
) -> torch.Tensor:
    """Dense boolean visibility, True = attend.

    Returns ``[L, P + L]`` without padding, ``[B, L, P + L]`` with ``key_padding_mask`` ``[B, P + L]``.
    """
    layout = AttentionLayout(num_read, num_write, mask, past_visible_to_read, window=window)
    return layout_visibility(layout, length, past_length, key_padding_mask, device)


def layout_visibility(layout: AttentionLayout, length: int, past_length: int = 0,
                      key_padding_mask: torch.Tensor | None = None,
                      device: torch.device | str | None = None,
                      rows: range | None = None) -> torch.Tensor:
    """:func:`dense_visibility` of an :class:`AttentionLayout`; ``rows``: only these query rows
    (``[len(rows), P + L]``; e.g. to count a long call's pairs a block of rows at a time)."""
    rows = range(length) if rows is None else rows
    qi = torch.arange(rows.start, rows.stop, rows.step, device=device)[:, None]
    kj = torch.arange(length, device=device)[None, :]
    cur = current_key_visible(qi, kj, layout.num_read, layout.num_write, length, layout.mask,
                              layout.window)
    pa = torch.arange(past_length, device=device)[None, :]
    past = past_key_visible(qi, pa, past_length, layout.first_past_row(), layout.window)
    vis = torch.cat([past.expand(len(rows), past_length), cur], dim=1)
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


@functools.lru_cache(maxsize=8)
def block_table(mask: str) -> tuple[tuple[str | None, ...], ...]:
    """Kind of (row block a, key block b) over ``read | segment | write``: ``FULL``, ``DIAG``
    (causal within a diagonal block) or None (invisible), read off :func:`current_key_visible`
    on a small layout with two rows per block."""
    n = 2
    qi = torch.arange(3 * n)[:, None]
    kj = torch.arange(3 * n)[None, :]
    vis = current_key_visible(qi, kj, n, n, 3 * n, check_mask_mode(mask))
    tril = torch.ones(n, n, dtype=torch.bool).tril()
    table = []
    for a in range(3):
        row = []
        for b in range(3):
            tile = vis[a * n:(a + 1) * n, b * n:(b + 1) * n]
            if bool(tile.all()):
                row.append(FULL)
            elif not bool(tile.any()):
                row.append(None)
            elif a == b and torch.equal(tile, tril):
                row.append(DIAG)
            else:
                raise AssertionError(f"mask {mask!r}: block ({a}, {b}) is neither full, causal nor empty")
        table.append(tuple(row))
    return tuple(table)


@functools.lru_cache(maxsize=256)  # called per attention call with a handful of distinct layouts
def block_plan(length: int, past_length: int, layout: AttentionLayout) -> tuple[RowGroup, ...]:
    """Decompose the mask into row groups, each seeing a few full or causal-diagonal key ranges.
    A sliding window has no such decomposition (ValueError), nor do capped scores."""
    _plain_scores(layout)
    r0, r1, r2 = layout.num_read, length - layout.num_write, length  # read | segment | write
    spans = [(0, r0), (r0, r1), (r1, r2)]
    table = block_table(layout.mask)
    past_all = past_length == 0 or layout.first_past_row() == 0
    if layout.mask == "causal" and past_all:
        # plain causal over all L rows: one diagonal block
        groups = [(0, length, [KeyBlock("cur", 0, length, DIAG)])]
    elif layout.mask == "full" and past_all:
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
    return _add_past(groups, past_length, layout)


def _plain_scores(layout: AttentionLayout) -> None:
    """Refuses what the block plans (run on ATen's flash attention) cannot carry."""
    if layout.window is not None:
        raise ValueError("block plans do not model a sliding window (layout.window); windowed "
                         "calls run the fused CPU kernel, Triton or a dense mask")
    if layout.softcap is not None:
        raise ValueError("block plans do not model a logit soft-cap (layout.softcap); capped "
                         "calls run the fused CPU kernel, Triton or dense scores")


def _add_past(groups, past_length: int, layout: AttentionLayout) -> tuple[RowGroup, ...]:
    """Row groups with the past keys prepended as one ``full`` block where the rows see them
    (groups never straddle :meth:`AttentionLayout.first_past_row`)."""
    out = []
    for qs, qe, blocks in groups:
        if past_length > 0 and qs >= layout.first_past_row():
            blocks = [KeyBlock("past", 0, past_length, FULL), *blocks]
        out.append(RowGroup(qs, qe, tuple(blocks)))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def dense_plan(length: int, past_length: int, layout: AttentionLayout) -> tuple[RowGroup, ...]:
    """All current keys as one ``dense`` block; past keys stay a separate ``full`` block."""
    _plain_scores(layout)
    split = layout.first_past_row() if past_length else 0
    spans = [(0, split), (split, length)] if split else [(0, length)]
    return _add_past([(qs, qe, [KeyBlock("cur", 0, length, DENSE)]) for qs, qe in spans],
                     past_length, layout)


@functools.lru_cache(maxsize=64)
def structure_bias(length: int, layout: AttentionLayout,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bias [L, L] with 0 / -inf, visible [L, L] bool)`` of the current keys (CPU)."""
    vis = layout_visibility(layout, length)
    return torch.zeros(vis.shape, dtype=dtype).masked_fill_(~vis, float("-inf")), vis


def layout_from(layout: AttentionLayout | None, fields: dict) -> AttentionLayout:
    """``layout``, or one built from keyword ``fields`` (``num_read=2, mask="rmt"``), for entry
    points that accept either; giving both is an error."""
    if layout is None:
        return AttentionLayout(**fields)
    if fields:
        raise ValueError(f"pass either layout= or its fields, not both (got layout and {sorted(fields)})")
    if not isinstance(layout, AttentionLayout):
        raise ValueError(f"layout must be an AttentionLayout, got {type(layout).__name__}")
    return layout
