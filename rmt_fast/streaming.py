"""Streaming long-context reading: feed any number of tokens, keep only the recurrent state.

Peak memory does not depend on the input length: each segment's activations are dropped once
its memory (and XL cache) is computed; no logits are made while reading.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from rmt_fast.models.decoder import RecurrentState, RMTForCausalLM
from rmt_fast.models.segment_loop import Segment, SegmentState


class StreamingReader:
    """Read a token stream into an :class:`RMTForCausalLM`'s memory, segment by segment.

    Args:
        model: the wrapped model (put it in eval mode yourself if it has dropout).
        batch_size: rows read in lockstep; :meth:`feed` takes ``[B, n]`` chunks when > 1.
        progress: show a tqdm bar with tokens/s.
    """

    def __init__(self, model: RMTForCausalLM, batch_size: int = 1, progress: bool = True):
        if not isinstance(model, RMTForCausalLM):
            raise TypeError(f"model must be an RMTForCausalLM, got {type(model).__name__}")
        self.model, self.batch_size, self.progress = model, batch_size, progress
        self.reset()

    def reset(self) -> None:
        self.memory = self.model.expand_memory(self.batch_size).detach().clone()
        self.xl: RecurrentState | None = None
        self.tokens_read = 0
        self._buffer = torch.empty(self.batch_size, 0, dtype=torch.long, device=self.model.device)

    # --- reading ---------------------------------------------------------------------------
    @torch.no_grad()
    def _read(self, segments: list[torch.Tensor], bar=None) -> None:
        """Read ``[B, S]`` segments in order through the model's segment loop."""
        def done(t, seg, state):
            self.memory, self.xl = state.memory, state.xl
            self.tokens_read += seg.end - seg.start
            if bar is not None:
                bar.update(seg.end - seg.start)

        start, segs = self.tokens_read, []
        for ids in segments:
            segs.append(Segment(start, start + ids.shape[1], ids))
            start += ids.shape[1]
        self.model.read_segments(SegmentState(self.memory, self.xl), segs, callback=done)

    def _chunks(self, tokens) -> Iterator[torch.Tensor]:
        if isinstance(tokens, (torch.Tensor, np.ndarray)):
            t = torch.as_tensor(np.asarray(tokens) if isinstance(tokens, np.ndarray) else tokens)
            yield t.reshape(self.batch_size, -1) if t.dim() == 1 else t
            return
        step = self.model.rmt_config.segment_size
        block: list[int] = []
        for tok in tokens:  # an iterator of ints (batch 1)
            block.append(int(tok))
            if len(block) == step:
                yield torch.tensor([block])
                block = []
        if block:
            yield torch.tensor([block])

    def feed(self, tokens: Iterable[int] | torch.Tensor | np.ndarray, total: int | None = None) -> None:
        """Read ``tokens`` (``[n]``/``[B, n]`` tensor or array, or an iterator of ints for B=1).

        Whole segments are read now; a partial tail waits in a buffer for more tokens (or
        :meth:`flush`). ``total``: length for the progress bar when ``tokens`` is an iterator.
        """
        size = self.model.rmt_config.segment_size
        if total is None and hasattr(tokens, "shape"):
            total = int(tokens.shape[-1])
        bar = tqdm(total=total, unit="tok", unit_scale=True, disable=not self.progress,
                   desc="reading", dynamic_ncols=True)
        for chunk in self._chunks(tokens):
            if chunk.shape[0] != self.batch_size:
                raise ValueError(f"tokens must have batch size {self.batch_size}, got {chunk.shape[0]}")
            chunk = chunk.to(self.model.device, torch.long)
            if self._buffer.shape[1]:
                chunk = torch.cat([self._buffer, chunk], dim=1)
            full = chunk.shape[1] // size * size
            if full:
                self._read([chunk[:, start:start + size] for start in range(0, full, size)], bar)
            self._buffer = chunk[:, full:]
        bar.close()

    def flush(self) -> None:
        """Read the buffered partial segment, if any."""
        if self._buffer.shape[1]:
            self._read([self._buffer])
            self._buffer = self._buffer[:, :0]

    def read_file(self, path: str | os.PathLike, dtype=np.int32, chunk_tokens: int = 1 << 20) -> None:
        """Stream a flat binary file of token ids (e.g. ``np.int32``/``np.uint16``) via memmap."""
        data = np.memmap(path, dtype=dtype, mode="r")
        for start in range(0, len(data), chunk_tokens):
            self.feed(torch.from_numpy(np.array(data[start:start + chunk_tokens], dtype=np.int64)))

    # --- asking ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, **generate_kwargs) -> torch.Tensor:
        """Generate after what was read: flushes the buffer, then ``model.generate`` from the
        current memory with ``prompt_ids`` ``[B, n]`` (e.g. a question) as the last segment."""
        self.flush()
        return self.model.generate(prompt_ids.to(self.model.device), memory=self.memory,
                                   **generate_kwargs)

    # --- resuming ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"memory": self.memory, "buffer": self._buffer,
                 "tokens_read": torch.tensor(self.tokens_read)}
        if self.xl is not None:
            state["xl_padding"] = self.xl.padding
            for layer, (k, v) in self.xl.kv.items():
                state[f"xl_k.{layer}"], state[f"xl_v.{layer}"] = k, v
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        want = tuple(self.memory.shape)
        if tuple(state["memory"].shape) != want:
            raise ValueError(f"saved memory is {list(state['memory'].shape)}, this reader needs "
                             f"{list(want)}")
        device = self.model.device
        self.memory = state["memory"].to(device, self.memory.dtype)
        self._buffer = state["buffer"].to(device)
        self.tokens_read = int(state["tokens_read"])
        self.xl = None
        if "xl_padding" in state:
            layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("xl_k.")})
            kv = {i: (state[f"xl_k.{i}"].to(device), state[f"xl_v.{i}"].to(device)) for i in layers}
            self.xl = RecurrentState(kv, state["xl_padding"].to(device))

    def save(self, path: str | os.PathLike) -> None:
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))

    def load(self, path: str | os.PathLike) -> None:
        self.load_state_dict(load_file(str(path)))
