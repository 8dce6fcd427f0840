"""Bits per byte of a decoder RMT over whole documents, each read as one long stream.

:func:`stream_nll` reads every document as ``[BOS, b0, b1, ..., b_{n-1}]`` segment by segment
(left-aligned segments of ``segment_size`` tokens, the last one short), with the memory and the
Transformer-XL cache carried from segment to segment exactly as the model's ``forward`` carries
them in training: the document starts from the learned memory and an empty cache, segment
``t + 1`` reads the memory segment ``t`` wrote and the keys/values of its last ``xl_cache``
tokens. Every byte is predicted once, from everything before it in its document: ``BOS``
predicts ``b0`` (the first byte is scored given only the document start), ``b_i`` predicts
``b_{i+1}`` (within a segment, and across a segment boundary through memory and cache);
nothing is scored after the last byte. Bits per byte = total NLL (nats) / ln 2 / total bytes.

Batching: ``batch_size`` lanes read documents side by side (longest first). RMT: a lane whose
document ends takes the next one, starting from the learned memory with its cache cleared
(masked out), so all lanes stay busy. ARMT (:class:`rmt_fast.models.ARMTForCausalLM`, whose
state marks a fresh start for the whole batch, not per row): lanes take documents in waves, the
next wave when every lane's document has ended; a lane that is done idles on padding. A
document's last segment is padded (key padding mask); padding positions count as nothing and
padded rows keep their state, so each document gets the numbers it would get alone (tested
against the model's full-sequence forward).

:func:`report`: bits per byte next to the recurrent state each row carries across segments.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rmt_fast.models.armt import ARMTForCausalLM
from rmt_fast.models.decoder import RecurrentState, RMTForCausalLM
from rmt_fast.tasks.text_corpus import BOS

LM_MODELS = (RMTForCausalLM, ARMTForCausalLM)


@dataclass
class StreamResult:
    """``nll``: summed NLL in nats per document ``[n_docs]`` float64, ``bytes`` ``[n_docs]``;
    ``segments``: segment forwards run (lanes x steps, padding included); ``seconds``;
    ``position_nll`` / ``position_bytes`` ``[segment_size]``: the same sums by the predicting
    token's position within its segment (position 0 reads the segment before only through
    memory and cache); ``index_nll`` / ``index_bytes`` ``[longest document's segments]``: by the
    segment's index in its document (how the recurrence holds up as documents go on)."""

    nll: np.ndarray
    bytes: np.ndarray
    segments: int
    seconds: float
    position_nll: np.ndarray | None = None
    position_bytes: np.ndarray | None = None
    index_nll: np.ndarray | None = None
    index_bytes: np.ndarray | None = None

    @property
    def bits_per_byte_by_position(self) -> np.ndarray:
        """``[segment_size]`` bits per byte of the bytes predicted from each segment position."""
        return self.position_nll / math.log(2) / np.maximum(self.position_bytes, 1)

    @property
    def bits_per_byte(self) -> float:
        return float(self.nll.sum() / math.log(2) / self.bytes.sum())

    @property
    def total_bytes(self) -> int:
        return int(self.bytes.sum())


def _as_tokens(doc) -> torch.Tensor:
    """``[BOS] + doc`` (``doc`` as it is when it already starts with ``BOS``)."""
    t = torch.as_tensor(np.asarray(doc)).to(torch.int64).flatten()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > BOS):
        raise ValueError(f"documents must hold byte values 0..255 (and {BOS} = BOS where a "
                         "document starts inside a stream)")
    return t if t.numel() and int(t[0]) == BOS else torch.cat([torch.tensor([BOS]), t])


def long_streams(split, streams: int, tokens: int) -> list[torch.Tensor]:
    """``streams`` pieces of ``tokens`` tokens ``[tokens]`` int64 cut one after the other from
    ``split``'s ``[BOS] doc0 [BOS] doc1 ...`` (:meth:`CorpusSplit.stream`): streams far longer
    than any document, for :func:`stream_nll` (how the recurrence holds up over many segments
    on text like the training windows', which also cross document starts)."""
    stream = split.stream()
    if not isinstance(streams, int) or not isinstance(tokens, int) or streams < 1 or tokens < 2:
        raise ValueError(f"streams must be an int >= 1 and tokens an int >= 2, got {streams!r}, {tokens!r}")
    if streams * tokens > len(stream):
        raise ValueError(f"{streams} streams of {tokens:,} tokens need {streams * tokens:,} tokens; "
                         f"the {split.name} split has {len(stream):,}")
    return [stream[i * tokens: (i + 1) * tokens] for i in range(streams)]


class _Lanes:
    """The recurrent state of the lanes and one segment step, for either model kind.
    ``per_lane``: lanes may start new documents one at a time (RMT); else only all together."""

    def __init__(self, model, lanes: int):
        self.model, self.lanes = model, lanes
        self.per_lane = isinstance(model, RMTForCausalLM)
        self.init = model.memory.detach() if self.per_lane else None
        self.xl: RecurrentState | None = None
        self.state = None

    def reset(self, rows: torch.Tensor) -> None:
        """Fresh state for the lanes ``rows`` ``[lanes]`` bool (all of them unless per_lane)."""
        if not self.per_lane:
            self.state = self.model.init_state(self.lanes)
            return
        if self.state is None:
            self.state = self.model.expand_memory(self.lanes).detach().clone()
        r = rows.to(self.state.device)
        self.state = torch.where(r[:, None, None], self.init.to(self.state.dtype), self.state)
        if self.xl is not None:
            self.xl = RecurrentState(self.xl.kv, self.xl.padding & ~r[:, None])

    def step(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Hidden states ``[lanes, S, d]`` of one segment; the state moves on."""
        if self.per_lane:
            hidden, self.state, self.xl = self.model.segment_forward(self.state, ids, mask, self.xl)
        else:
            hidden, self.state = self.model.segment_forward(self.state, ids, mask)
        return hidden


@torch.no_grad()
def stream_nll(model: RMTForCausalLM | ARMTForCausalLM, documents: Sequence, batch_size: int = 8, *,
               amp: str | None = None, progress: bool = False) -> StreamResult:
    """Summed next-byte NLL of each document read as one stream (see the module docstring).

    Args:
        model: an :class:`RMTForCausalLM` (any ``num_mem_tokens``, ``xl_cache``, mask) or an
            :class:`ARMTForCausalLM`; it is put in eval mode for the call and restored after.
        documents: sequences of byte values (``bytes``, uint8 arrays, 1-D tensors); empty ones
            score nothing. Integer arrays/tensors may hold ``BOS`` where another document starts
            inside one stream (:func:`long_streams`): read through with the state carried, as in
            training windows; nothing predicts ``BOS``, so only bytes are scored and counted.
        batch_size: lanes read side by side.
        amp: ``"bf16"``: run under ``torch.autocast(<device>, bfloat16)`` (the NLL is taken in
            float32).
    """
    if not isinstance(model, LM_MODELS):
        raise TypeError(f"model must be an RMTForCausalLM or ARMTForCausalLM, got {type(model).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if amp not in (None, "bf16"):
        raise ValueError(f"amp must be None or 'bf16', got {amp!r}")
    vocab = model.base.get_output_embeddings().weight.shape[0]
    if vocab <= BOS:
        raise ValueError(f"the model's vocabulary ({vocab}) has no BOS id {BOS}: build it with "
                         "vocab_size >= 257")
    tokens = [_as_tokens(d) for d in documents]
    n_docs = len(tokens)
    nll = np.zeros(n_docs, dtype=np.float64)
    seg = model.rmt_config.segment_size
    device = model.device
    pos_nll = torch.zeros(seg, dtype=torch.float64, device=device)  # accumulated where computed,
    pos_bytes = torch.zeros(seg, dtype=torch.int64, device=device)  # read back once at the end
    idx_nll: list[float] = []
    idx_bytes: list[int] = []
    sizes = np.array([int((t[1:] != BOS).sum()) for t in tokens], dtype=np.int64)  # bytes scored
    queue = sorted((i for i in range(n_docs) if sizes[i] > 0), key=lambda i: (-sizes[i], i))
    lanes = min(batch_size, max(len(queue), 1))
    lane_doc = [-1] * lanes
    lane_pos = [0] * lanes
    state = _Lanes(model, lanes)
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(sizes.sum()), unit="B", unit_scale=True, desc="bits/byte", dynamic_ncols=True)
    t0, steps = time.perf_counter(), 0
    try:
        while True:
            reset = torch.zeros(lanes, dtype=torch.bool)
            done = [lane_doc[j] < 0 or lane_pos[j] >= len(tokens[lane_doc[j]]) - 1 for j in range(lanes)]
            # ARMT: a wave's finished lanes idle on padding until every lane is done
            refill = state.per_lane or all(done)
            for j in range(lanes):
                if done[j]:
                    lane_doc[j] = (queue.pop(0) if queue else -1) if refill else -1
                    lane_pos[j] = 0
                    reset[j] = refill
            if all(d < 0 for d in lane_doc):
                break
            ids = torch.zeros(lanes, seg, dtype=torch.int64)
            mask = torch.zeros(lanes, seg, dtype=torch.bool)
            targets = torch.full((lanes, seg), -100, dtype=torch.int64)
            for j, d in enumerate(lane_doc):
                if d < 0:
                    continue
                doc, pos = tokens[d], lane_pos[j]
                chunk = doc[pos: pos + seg]
                ids[j, : len(chunk)] = chunk
                mask[j, : len(chunk)] = True
                nxt = doc[pos + 1: pos + 1 + seg]  # the token after each position, if any
                targets[j, : len(nxt)] = torch.where(nxt == BOS, -100, nxt)  # nothing predicts BOS
            if reset.any():
                state.reset(reset)
            with autocast:
                hidden = state.step(ids.to(device), None if bool(mask.all()) else mask.to(device))
                logits = model.logits(hidden)
            targets = targets.to(device)
            picked = targets != -100
            logp = F.log_softmax(logits.float()[picked], dim=-1)
            tok_nll = -logp.gather(1, targets[picked][:, None])[:, 0].double()
            rows = torch.arange(lanes, device=device)[:, None].expand(-1, seg)[picked]
            per_lane = torch.zeros(lanes, dtype=torch.float64, device=device).index_add_(0, rows, tok_nll)
            per_lane = per_lane.cpu()
            counted = picked.sum(1).cpu()
            cols = torch.arange(seg, device=device)[None, :].expand(lanes, -1)[picked]
            pos_nll.index_add_(0, cols, tok_nll)
            pos_bytes += picked.sum(0)
            for j, d in enumerate(lane_doc):
                if d >= 0:
                    nll[d] += float(per_lane[j])
                    t = lane_pos[j] // seg
                    if t == len(idx_nll):
                        idx_nll.append(0.0)
                        idx_bytes.append(0)
                    idx_nll[t] += float(per_lane[j])
                    idx_bytes[t] += int(counted[j])
                    lane_pos[j] += seg
            steps += 1
            if bar is not None:
                bar.update(int(counted.sum()))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return StreamResult(nll, sizes, steps * lanes, time.perf_counter() - t0, pos_nll.cpu().numpy(),
                        pos_bytes.cpu().numpy(), np.array(idx_nll), np.array(idx_bytes, dtype=np.int64))


def state_floats(model: RMTForCausalLM | ARMTForCausalLM) -> dict[str, int]:
    """Floats of recurrent state one row carries from a segment to the next: ``memory``
    ``M x d`` (ARMT: its associative state, ``layers x d_key x (d + 1)``; its memory tokens are
    learned constants), ``xl`` ``xl_cache x layers x 2 (k and v) x kv_dim`` (``kv_dim`` =
    key/value heads x head dim, ``d`` for GPT-2), ``total``."""
    cfg = model.base.config
    d = model.memory.shape[1]
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads  # GPT-2 maps these names too
    if isinstance(model, ARMTForCausalLM):
        mem = layers * model.rmt_config.d_key * (d + 1)
        return {"memory": mem, "xl": 0, "total": mem}
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    mem = model.rmt_config.num_mem_tokens * d
    xl = model.rmt_config.xl_cache * layers * 2 * kv_heads * head_dim
    return {"memory": mem, "xl": xl, "total": mem + xl}


def report(model: RMTForCausalLM | ARMTForCausalLM, result: StreamResult, bytes_per_float: int = 4) -> dict:
    """A results row: bits per byte, bytes scored, documents, and the recurrent state per row
    (:func:`state_floats`, and in bytes at ``bytes_per_float``: 4 for float32)."""
    floats = state_floats(model)
    cfg = model.rmt_config
    return {"bits_per_byte": result.bits_per_byte, "bytes": result.total_bytes,
            "documents": int((result.bytes > 0).sum()), "num_mem_tokens": cfg.num_mem_tokens,
            "xl_cache": getattr(cfg, "xl_cache", 0), "bptt_depth": cfg.bptt_depth,
            "mask": getattr(cfg, "mask", "causal"), "model": type(model).__name__,
            "segment_size": cfg.segment_size, "state_floats": floats["total"],
            "state_bytes": floats["total"] * bytes_per_float,
            "memory_state_bytes": floats["memory"] * bytes_per_float,
            "xl_state_bytes": floats["xl"] * bytes_per_float,
            "eval_seconds": round(result.seconds, 1), "segments_run": result.segments,
            "bits_per_byte_by_position": [round(float(b), 5) for b in result.bits_per_byte_by_position]}


def evaluate_split(model: RMTForCausalLM | ARMTForCausalLM, split, batch_size: int = 8, *,
                   amp: str | None = None, progress: bool = False) -> dict:
    """:func:`report` of :func:`stream_nll` over every document of a
    :class:`rmt_fast.tasks.text_corpus.CorpusSplit`."""
    result = stream_nll(model, list(split.documents()), batch_size, amp=amp, progress=progress)
    return {"split": split.name, **report(model, result)}
