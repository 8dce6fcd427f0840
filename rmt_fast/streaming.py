"""Streaming long-context reading: feed any number of tokens, keep only the recurrent state.

Peak memory does not depend on the input length: each segment's activations are dropped once
its state is computed (an RMT's memory and XL cache, an ARMT's associative state); no logits
are made while reading.

Every call is atomic: :meth:`StreamingReader.feed`, ``flush``, ``generate`` and ``load`` either
succeed or leave the reader exactly as it was (state, buffer, ``tokens_read``); input is
validated before anything is read. Reading and generation run with the model in eval mode (no
dropout, no memory noise), each submodule's mode restored afterwards.
"""

from __future__ import annotations

import json
import numbers
import os
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from rmt_fast.dtypes import resolve_dtype
from rmt_fast.manifest import model_fingerprint, reading
from rmt_fast.models.armt import ARMTForCausalLM, ARMTState
from rmt_fast.models.decoder import RecurrentState, RMTForCausalLM
from rmt_fast.models.modes import inference
from rmt_fast.models.rotary import find_rotary
from rmt_fast.models.segment_loop import Segment, SegmentState
from rmt_fast.validation import check_ids_in_range, check_token_ids

NPY_MAGIC = b"\x93NUMPY"
#: 2: XL caches of rotary models hold keys moved to the next segment's positions
STATE_FORMAT = "rmt_fast.StreamingReader/2"
BAR_DELAY_S = 1.0  # the progress bar appears once a feed has run this long


class StreamingReader:
    """Read a token stream into a recurrent-memory model's state, segment by segment.

    The state (:attr:`state`) is what the model hands from one segment to the next: for an
    :class:`RMTForCausalLM` a :class:`SegmentState` (``memory`` ``[B, M, d]`` and the XL cache,
    also as :attr:`memory` and :attr:`xl`), for an :class:`ARMTForCausalLM` an
    :class:`rmt_fast.models.armt.ARMTState` (per layer ``A`` ``[B, d_key, d]``, ``z``
    ``[B, d_key]``).

    Reading and generating use inference semantics: the model is put in eval mode for each call
    (no dropout, no memory noise) and every submodule's mode is restored afterwards. On CPU the
    base model's linear layers run through oneDNN with packed weights
    (:mod:`rmt_fast.integrations.packed_linear`; ``RMT_FAST_PACKED_LINEAR=0`` turns it off).

    Args:
        model: the wrapped model (:class:`RMTForCausalLM` or :class:`ARMTForCausalLM`).
        batch_size: rows read in lockstep (an int >= 1); :meth:`feed` takes ``[B, n]`` chunks
            when > 1.
        progress: show a tqdm bar with tokens/s for each :meth:`feed` that lasts over a second.
        dtype: None (default) reads in the model's own dtype; ``"auto"``, ``"bfloat16"`` or
            ``"float32"`` casts the model (in place, ``model.to(dtype)``) before reading;
            ``"auto"`` is bfloat16 where the hardware computes it natively
            (:func:`rmt_fast.dtypes.resolve_dtype`).
    """

    def __init__(self, model: RMTForCausalLM | ARMTForCausalLM, batch_size: int = 1,
                 progress: bool = True, dtype: str | torch.dtype | None = None):
        if not isinstance(model, (RMTForCausalLM, ARMTForCausalLM)):
            raise TypeError(f"model must be an RMTForCausalLM or an ARMTForCausalLM, got "
                            f"{type(model).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(progress, bool):
            raise ValueError(f"progress must be a bool, got {progress!r}")
        if dtype is not None:
            model.to(resolve_dtype(dtype, model.device))
        self.model, self.batch_size, self.progress = model, batch_size, progress
        self.reset()

    def reset(self) -> None:
        if self.armt:
            self.state = self.model.init_state(self.batch_size)
        else:
            self.state = SegmentState(self.model.expand_memory(self.batch_size).detach().clone())
        self.tokens_read = 0
        self._buffer = torch.empty(self.batch_size, 0, dtype=torch.long, device=self.model.device)

    @property
    def armt(self) -> bool:
        """Whether the model is an ARMT (state: :class:`ARMTState`)."""
        return isinstance(self.model, ARMTForCausalLM)

    @property
    def memory(self) -> torch.Tensor:
        """An RMT's memory ``[B, M, d]`` (an ARMT carries no memory tokens: see :attr:`state`)."""
        if self.armt:
            raise AttributeError("an ARMT reader carries no memory tokens between segments: its "
                                 "state is .state (an ARMTState)")
        return self.state.memory

    @property
    def xl(self) -> RecurrentState | None:
        """An RMT's Transformer-XL cache (None when off, before the first segment, or ARMT)."""
        return None if self.armt else self.state.xl

    @property
    def vocab_size(self) -> int:
        """Token ids must be in ``[0, vocab_size)`` (the base model's input embedding rows)."""
        return self.model.base.get_input_embeddings().weight.shape[0]

    # --- reading ---------------------------------------------------------------------------
    @torch.no_grad()
    def _read_segments(self, state, segments: list[torch.Tensor], bar=None):
        """The state after reading ``segments`` (``[B, S]`` each) in order from ``state``
        through the model's segment loop; the reader's own state is not touched (callers
        commit)."""
        segs, start = [], 0
        for ids in segments:
            segs.append(Segment(start, start + ids.shape[1], ids))
            start += ids.shape[1]
        update = None if bar is None else (lambda t, seg, state: bar.update(seg.end - seg.start))
        return self.model.read_segments(state, segs, callback=update)

    def _check_chunk(self, tokens) -> torch.Tensor:
        """A validated ``[B, n]`` long tensor on the model's device (ids in the vocabulary)."""
        if isinstance(tokens, np.ndarray):
            if tokens.dtype.kind not in "iu":
                raise ValueError(f"tokens must hold integer token ids, got a numpy array of dtype "
                                 f"{tokens.dtype}")
            tokens = torch.from_numpy(np.array(tokens, dtype=np.int64))  # a copy: memmaps are read-only
        check_token_ids("tokens", tokens, None, dims=(1, 2), allow_empty=True)
        if tokens.dim() == 1:
            if self.batch_size != 1:
                raise ValueError(f"tokens is 1-D {list(tokens.shape)} but batch_size={self.batch_size}: "
                                 f"feed [B, n] = [{self.batch_size}, n] chunks")
            tokens = tokens[None]
        if tokens.shape[0] != self.batch_size:
            raise ValueError(f"tokens must have batch size {self.batch_size} ([B, n] = "
                             f"[{self.batch_size}, n]), got {list(tokens.shape)}")
        tokens = tokens.to(self.model.device, torch.long)
        check_ids_in_range("tokens", tokens, self.vocab_size)
        return tokens

    def _chunks(self, tokens) -> Iterator[torch.Tensor]:
        if isinstance(tokens, (str, bytes, bytearray)) or not isinstance(
                tokens, (torch.Tensor, np.ndarray, Iterable)):
            raise ValueError(f"tokens must be a [n] or [B, n] tensor/array of token ids or an "
                             f"iterator of ints, got {type(tokens).__name__}")
        if isinstance(tokens, (torch.Tensor, np.ndarray)):
            yield self._check_chunk(tokens)  # the whole chunk is validated before any reading
            return
        if self.batch_size != 1:
            raise ValueError(f"an iterator of ints feeds batch_size=1 only (this reader has "
                             f"batch_size={self.batch_size}): feed [B, n] tensors")
        step = self.model.rmt_config.segment_size
        block: list[int] = []
        for i, tok in enumerate(tokens):  # an iterator of ints (batch 1), validated per segment
            if isinstance(tok, bool) or not isinstance(tok, numbers.Integral):
                raise ValueError(f"tokens must yield int token ids, got {type(tok).__name__} {tok!r} "
                                 f"at position {i}")
            block.append(int(tok))
            if len(block) == step:
                yield self._check_chunk(torch.tensor(block))
                block = []
        if block:
            yield self._check_chunk(torch.tensor(block))

    def feed(self, tokens: Iterable[int] | torch.Tensor | np.ndarray, total: int | None = None) -> None:
        """Read ``tokens``: a ``[n]`` (batch 1) or ``[B, n]`` integer tensor or array, or an
        iterator of ints (batch 1). Ids must be in ``[0, vocab_size)``.

        Whole segments are read now; a partial tail waits in a buffer for more tokens (or
        :meth:`flush`). ``total``: length for the progress bar when ``tokens`` is an iterator.
        Atomic: the state is committed only at the end, so an error (bad ids, even deep in an
        iterator, or an interrupt) leaves the reader exactly as it was.
        """
        size = self.model.rmt_config.segment_size
        if total is None and hasattr(tokens, "shape") and len(tokens.shape):
            total = int(tokens.shape[-1])
        state, buffer, read = self.state, self._buffer, self.tokens_read
        # delay: a bar only for a feed that lasts (a loop feeding small chunks prints none)
        bar = tqdm(total=total, unit="tok", unit_scale=True, disable=not self.progress,
                   desc="reading", dynamic_ncols=True, delay=BAR_DELAY_S)
        try:
            with inference(self.model):
                for chunk in self._chunks(tokens):
                    if buffer.shape[1]:
                        chunk = torch.cat([buffer, chunk], dim=1)
                    full = chunk.shape[1] // size * size
                    if full:  # the chunk's whole segments in one pass of the segment loop
                        state = self._read_segments(
                            state, [chunk[:, start:start + size] for start in range(0, full, size)],
                            bar)
                        read += full
                    buffer = chunk[:, full:]
        finally:
            bar.close()
        self.state, self._buffer, self.tokens_read = state, buffer, read

    def flush(self) -> None:
        """Read the buffered partial segment, if any."""
        if self._buffer.shape[1]:
            with inference(self.model):
                self.state = self._read_segments(self.state, [self._buffer])
            self.tokens_read += self._buffer.shape[1]
            self._buffer = self._buffer[:, :0]

    def read_file(self, path: str | os.PathLike, dtype=None, chunk_tokens: int = 1 << 20) -> None:
        """Stream a file of token ids through :meth:`feed`, ``chunk_tokens`` at a time.

        * ``.npy`` files (recognised by their header, whatever the name) are read with
          ``np.load(mmap_mode="r")``: ``[n]`` for batch 1, or ``[B, n]`` rows; ``dtype``, if
          given, must match the header's.
        * Anything else is a flat binary file of ``dtype`` ids (default ``np.int32``; e.g.
          ``np.uint16`` or ``np.int64``), batch 1, memory-mapped.

        Detected before anything is read (a ValueError naming the file; the reader unchanged):
        a size that is not a multiple of the item size, a text file, ids wider than ``dtype``
        (every second value 0: e.g. int64 ids read as int32), a non-integer ``.npy``, ids outside
        the vocabulary (one min/max per chunk over the whole file). Each chunk is then committed
        as a whole, so an interrupt leaves ``tokens_read`` at a chunk boundary.
        """
        path = os.fspath(path)
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}")
        data = self._open_tokens(path, dtype)
        n = data.shape[-1]
        vocab = self.vocab_size
        for start in range(0, n, chunk_tokens):  # validate the whole file first
            part = data[..., start:start + chunk_tokens]
            lo, hi = int(part.min()), int(part.max())
            if lo < 0 or hi >= vocab:
                bad = np.flatnonzero(((part < 0) | (part >= vocab)).reshape(-1))[0]
                raise ValueError(f"{path}: token id {int(part.reshape(-1)[bad])} at position "
                                 f"{start + int(bad) % part.shape[-1]} is outside the vocabulary "
                                 f"[0, {vocab}) (is dtype={data.dtype} right?)")
        for start in range(0, n, chunk_tokens):
            self.feed(np.asarray(data[..., start:start + chunk_tokens]))

    def _open_tokens(self, path: str, dtype) -> np.ndarray:
        """The file's ids as a (memory-mapped) ``[n]`` or ``[B, n]`` integer array, checked."""
        with open(path, "rb") as f:
            head = f.read(4096)
        if head.startswith(NPY_MAGIC):
            try:
                data = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise ValueError(f"{path}: cannot read this .npy file ({exc})") from exc
            if dtype is not None and np.dtype(dtype) != data.dtype:
                raise ValueError(f"{path} is a .npy file of {data.dtype}, not dtype={np.dtype(dtype)}: "
                                 f"leave dtype=None to use the file's")
            if data.dtype.kind not in "iu":
                raise ValueError(f"{path} is a .npy file of {data.dtype}: token ids must be integers")
            if data.ndim == 1 and self.batch_size == 1:
                return data
            if data.ndim == 2 and data.shape[0] == self.batch_size:
                return data
            raise ValueError(f"{path} is a .npy array of shape {list(data.shape)}: this reader needs "
                             f"[n] (batch_size 1) or [B, n] = [{self.batch_size}, n]")
        dtype = np.dtype(np.int32 if dtype is None else dtype)
        if dtype.kind not in "iu":
            raise ValueError(f"dtype must be an integer numpy dtype (np.int32, np.uint16, ...), got {dtype}")
        if self.batch_size != 1:
            raise ValueError(f"{path} is a flat binary file (one stream) but batch_size="
                             f"{self.batch_size}: save a [B, n] array with np.save instead")
        size = os.path.getsize(path)
        if size % dtype.itemsize:
            raise ValueError(f"{path} has {size} bytes, not a multiple of {dtype}'s item size "
                             f"{dtype.itemsize}: it does not hold {dtype} token ids (wrong dtype?)")
        if dtype.itemsize >= 2 and _looks_like_text(head):
            raise ValueError(f"{path} looks like a text file (UTF-8 without NUL bytes), not binary token "
                             f"ids: tokenize it first (read_file takes .npy files or flat binary ids "
                             f"as written by ndarray.tofile)")
        if size == 0:
            return np.zeros(0, dtype)
        data = np.memmap(path, dtype=dtype, mode="r")
        _check_not_wider(path, data)
        return data

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, **generate_kwargs) -> torch.Tensor:
        """Generate after what was read: flushes the buffer, then ``model.generate`` from the
        current state with ``prompt_ids`` ``[B, n]`` (e.g. a question) as the last segment.
        The flush is committed only when generation succeeds."""
        prompt_ids = check_token_ids("prompt_ids", prompt_ids, None)
        if prompt_ids.shape[0] != self.batch_size:
            raise ValueError(f"prompt_ids must have batch size {self.batch_size}, got "
                             f"{list(prompt_ids.shape)}")
        prompt_ids = prompt_ids.to(self.model.device)
        check_ids_in_range("prompt_ids", prompt_ids, self.vocab_size)
        state, buffer = self.state, self._buffer
        with inference(self.model):
            if buffer.shape[1]:
                state = self._read_segments(state, [buffer])
            if self.armt:  # the associative read active while generating, no writes
                out = self.model.generate(prompt_ids, state=state, **generate_kwargs)
            else:
                out = self.model.generate(prompt_ids, memory=state.memory, xl=state.xl,
                                          **generate_kwargs)
        self.state, self._buffer = state, buffer[:, :0]
        self.tokens_read += buffer.shape[1]
        return out

    # --- resuming ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The reader as tensors: ``buffer``, ``tokens_read`` and the model's state (RMT:
        ``memory`` and the XL cache ``xl_k.<layer>``/``xl_v.<layer>``/``xl_padding``; ARMT:
        ``A.<layer>``, ``z.<layer>`` and ``segments``)."""
        state = {"buffer": self._buffer, "tokens_read": torch.tensor(self.tokens_read)}
        if self.armt:
            state.update({f"A.{i}": a for i, a in enumerate(self.state.A)})
            state.update({f"z.{i}": z for i, z in enumerate(self.state.z)})
            state["segments"] = torch.tensor(self.state.segments)
            return state
        state["memory"] = self.memory
        if self.xl is not None:
            state["xl_padding"] = self.xl.padding
            for layer, (k, v) in self.xl.kv.items():
                state[f"xl_k.{layer}"], state[f"xl_v.{layer}"] = k, v
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a :meth:`state_dict`. Everything is checked before anything is assigned, so a
        bad state (missing or unknown keys, shapes, ids, XL cache) leaves the reader as it was."""
        model_state, buffer, tokens_read = self._check_state(state)
        self.state, self._buffer, self.tokens_read = model_state, buffer, tokens_read

    def _check_state(self, state: dict[str, torch.Tensor]):
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"reader state: {msg}")

        need(isinstance(state, dict), f"expected a dict of tensors, got {type(state).__name__}")
        if self.armt:
            n = len(self.state.A)
            own = {f"A.{i}" for i in range(n)} | {f"z.{i}" for i in range(n)} | {"segments"}
            xl_keys: set[str] = set()
        else:
            own = {"memory"}
            xl_keys = {k for k in state if k.startswith(("xl_k.", "xl_v.")) or k == "xl_padding"}
        missing = sorted((own | {"buffer", "tokens_read"}) - state.keys())
        need(not missing, f"missing key(s) {missing}")
        unknown = sorted(state.keys() - own - {"buffer", "tokens_read"} - xl_keys)
        need(not unknown, f"unknown key(s) {unknown}")
        need(all(isinstance(v, torch.Tensor) for v in state.values()), "every value must be a tensor")
        device = self.model.device
        if self.armt:
            model_state = self._check_armt_state(state, need)
        else:
            want = list(self.memory.shape)
            if list(state["memory"].shape) != want:
                raise ValueError(f"saved memory is {list(state['memory'].shape)}, this reader needs "
                                 f"{want}")
            need(state["memory"].is_floating_point(),
                 f"memory must be floating point, got {state['memory'].dtype}")
        buffer = state["buffer"]
        size = self.model.rmt_config.segment_size
        need(buffer.dim() == 2 and buffer.shape[0] == self.batch_size and buffer.shape[1] < size,
             f"buffer must be [B, n] = [{self.batch_size}, n < segment_size={size}], got "
             f"{list(buffer.shape)}")
        check_token_ids("buffer", buffer, self.vocab_size, dims=(2,), allow_empty=True)
        read = state["tokens_read"]
        need(read.dim() == 0 and not read.is_floating_point() and int(read) >= 0,
             f"tokens_read must be an integer scalar >= 0, got {read}")
        if self.armt:
            return model_state, buffer.to(device, torch.long), int(read)
        xl = None
        if xl_keys:
            need(self.model.rmt_config.xl_cache > 0, "it has an XL cache but the model's xl_cache is 0")
            need("xl_padding" in state, "XL keys/values without xl_padding")
            layers = sorted({k.split(".", 1)[1] for k in xl_keys if k != "xl_padding"})
            need(all(n.isdigit() for n in layers), f"bad XL layer names {layers}")
            padding = state["xl_padding"]
            need(padding.dim() == 2 and padding.shape[0] == self.batch_size
                 and padding.shape[1] <= self.model.rmt_config.xl_cache,
                 f"xl_padding must be [B, P <= xl_cache] = [{self.batch_size}, <= "
                 f"{self.model.rmt_config.xl_cache}], got {list(padding.shape)}")
            kv = {}
            for name in layers:
                k, v = state.get(f"xl_k.{name}"), state.get(f"xl_v.{name}")
                need(k is not None and v is not None, f"layer {name} needs both xl_k.{name} and xl_v.{name}")
                need(k.dim() == 4 and k.shape == v.shape and k.shape[0] == self.batch_size
                     and k.shape[2] == padding.shape[1],
                     f"xl_k.{name}/xl_v.{name} must be [B, Hkv, P, D] with B={self.batch_size}, "
                     f"P={padding.shape[1]}, got {list(k.shape)} and {list(v.shape)}")
                kv[int(name)] = (k.to(device), v.to(device))
            xl = RecurrentState(kv, padding.to(device, torch.bool))
        memory = state["memory"].to(device, self.memory.dtype)
        return SegmentState(memory, xl), buffer.to(device, torch.long), int(read)

    def _check_armt_state(self, state: dict[str, torch.Tensor], need) -> ARMTState:
        n, like = len(self.state.A), self.state
        segments = state["segments"]
        need(segments.dim() == 0 and not segments.is_floating_point() and int(segments) >= 0,
             f"segments must be an integer scalar >= 0, got {segments}")
        for name, t in state.items():
            if name.startswith(("A.", "z.")):
                need(t.is_floating_point(), f"{name} must be floating point, got {t.dtype}")
        out = ARMTState(tuple(state[f"A.{i}"].to(like.A[i].device, like.A[i].dtype) for i in range(n)),
                        tuple(state[f"z.{i}"].to(like.z[i].device, like.z[i].dtype) for i in range(n)),
                        int(segments))
        try:
            self.model._check_state(out, self.batch_size)
        except (TypeError, ValueError) as exc:
            need(False, str(exc))
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to a safetensors file (atomically: a temporary file, then a rename),
        with the model's fingerprint and RMT config in its metadata (checked by :meth:`load`)."""
        path = os.fspath(path)
        metadata = {"format": STATE_FORMAT,
                    "model_fingerprint": model_fingerprint(self.model),
                    "rmt_config": json.dumps(self.model.rmt_config.to_dict(), sort_keys=True)}
        tmp = path + ".tmp"
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, tmp, metadata=metadata)
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike, verify: bool = True) -> None:
        """Restore a state written by :meth:`save`. ``verify``: refuse a state saved by a reader
        of another model (fingerprint of the model's config, structure and weights; a warning
        when the file has none). Errors name the file; the reader is unchanged after any error."""
        path = os.fspath(path)
        with reading(path, "a StreamingReader state (safetensors)"):
            with safe_open(path, "pt") as f:
                metadata = f.metadata() or {}
            state = load_file(path)
        if verify:
            saved = metadata.get("model_fingerprint")
            if saved is None:
                warnings.warn(f"{path} has no model fingerprint (saved by an older rmt_fast): not "
                              f"verified against the model", UserWarning, stacklevel=2)
            elif saved != model_fingerprint(self.model):
                now = self.model.rmt_config.to_dict()
                try:
                    then = json.loads(metadata.get("rmt_config", "null"))
                except json.JSONDecodeError:
                    then = None
                diff = [k for k in sorted(now) if isinstance(then, dict) and then.get(k) != now[k]]
                why = (f"RMT config differs in {diff}" if diff else
                       "same RMT config, different weights or architecture")
                raise ValueError(f"{path}: this state was saved by a reader of another model ({why}); "
                                 f"pass verify=False to load it anyway")
        if (metadata.get("format") == "rmt_fast.StreamingReader/1" and "xl_padding" in state
                and find_rotary(self.model.lm) is not None):
            raise ValueError(f"{path}: its XL cache of a rotary model was saved before cached keys "
                             "were moved to their true positions (format 1): read the input again")
        try:
            self.load_state_dict(state)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc


def _looks_like_text(head: bytes) -> bool:
    """Whether a file's first bytes look like text: no NUL byte (binary ids below 2**24 in int32,
    or below 256 in uint16, always have some), valid UTF-8 and >= 95% printable."""
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the sample
            return False
        text = head[:exc.start].decode("utf-8")
    printable = sum(c.isprintable() or c in "\n\r\t" for c in text)
    return printable >= 0.95 * max(len(text), 1)


def _check_not_wider(path: str, data: np.ndarray, sample: int = 1 << 16) -> None:
    """Little-endian ids of twice ``data``'s item size read as ``data.dtype`` have a 0 in every
    second value (their high half): refuse (``len >= 64``; no real token stream looks so)."""
    n = min(len(data), sample) // 2 * 2
    if n < 64 or data.dtype.itemsize > 4:
        return
    head = np.asarray(data[:n])
    if not head[1::2].any() and head[0::2].any():
        wider = np.dtype(f"{data.dtype.kind}{2 * data.dtype.itemsize}")
        raise ValueError(f"{path}: every second {data.dtype} value is 0, as when {wider} ids are read "
                         f"as {data.dtype}: pass dtype=np.{wider.name}")
