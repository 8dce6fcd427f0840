"""Data-parallel training helpers for :mod:`rmt_fast.train` (``torchrun`` / ``torch.distributed``).

Why not ``torch.nn.parallel.DistributedDataParallel``'s reducer: with
``checkpoint_segments=True`` the loss of an RMT comes from :func:`rmt_fast.checkpoint.segment_bptt`,
whose backward *recomputes* every segment and calls ``torch.autograd.backward`` once per segment.
Each parameter's gradient is therefore accumulated ``N`` times (``N`` = segments) during one outer
``loss.backward()``. DDP's reducer expects every parameter to become ready exactly once per
backward (with checkpointed segments it raises "Expected to mark a variable ready only once");
``static_graph=True`` ran in a 2-process probe (segments 2, 2, 3, the same batch on both ranks)
but relies on the reducer's per-parameter hook bookkeeping, and was not checked with ranks
holding different numbers of segments. So the gradients are synchronised here *after* backward,
which does not depend on how often autograd touches a parameter: :class:`GradientSync`
all-reduces the flattened ``.grad`` of all
parameters in fixed-size buckets, the same buckets in the same order on every rank no matter how
many segments each rank ran, so recomputation adds no collectives and a rank with fewer segments
cannot deadlock the others. The parameters start identical (:func:`broadcast_module` from rank
0) and stay identical because every rank applies the same optimizer step to the same gradient.

Loss weighting: the model's loss is the mean cross-entropy over the target positions of its own
(micro-)batch. Each rank scales its loss by ``local_targets / global_targets`` (the global count
is one all-reduce of a scalar per optimizer step, done before the forward) and the gradients are
*summed*, so the result is the mean over every target position of the global batch: exactly the
gradient of one process given the whole global batch, also with gradient accumulation and with
ranks holding different numbers of segments or targets.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEFAULT_BUCKET_MB = 25.0


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its global ``rank``, the ``world_size`` and its ``local_rank``
    on the node. ``world_size == 1`` without a process group means plain single-process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether collectives are needed (a process group with more than one process)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: writes checkpoints, metrics and the progress bar."""
        return self.rank == 0


def env_from_environ(environ: dict[str, str] | None = None) -> DistEnv | None:
    """The :class:`DistEnv` described by torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
    variables, or None when they are absent. Raises ValueError on inconsistent values."""
    environ = os.environ if environ is None else environ
    present = [k for k in ENV_VARS if k in environ]
    if not present:
        return None
    if "WORLD_SIZE" not in environ or "RANK" not in environ:
        raise ValueError(f"torch.distributed environment is incomplete: found {present}, need RANK and "
                         "WORLD_SIZE (and LOCAL_RANK); launch with torchrun")
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be ints, got "
                         f"{ {k: environ.get(k) for k in ENV_VARS} }") from exc
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"invalid torch.distributed environment: RANK={rank}, WORLD_SIZE={world}, "
                         f"LOCAL_RANK={local}")
    return DistEnv(rank, world, local)


def current_env() -> DistEnv:
    """The :class:`DistEnv` of the initialised default process group (world 1 if none)."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistEnv(dist.get_rank(), dist.get_world_size(), local)
    return DistEnv()


def default_device(env: DistEnv | None = None) -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    env = env or env_from_environ() or DistEnv()
    if torch.cuda.is_available():
        if env.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={env.local_rank} but only {torch.cuda.device_count()} "
                               "CUDA devices are visible; use --nproc_per_node <= the GPU count")
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def init_distributed(device: torch.device | str | None = None, backend: str | None = None,
                     timeout_s: float = 1800.0) -> DistEnv:
    """Initialise the default process group from torchrun's environment, if it describes more
    than one process and no group exists yet. The backend is NCCL for a CUDA ``device`` and
    gloo otherwise (override with ``backend``). Returns the resulting :class:`DistEnv`
    (``world_size == 1`` when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return current_env()
    env = env_from_environ()
    if env is None or env.world_size == 1:
        return DistEnv()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    device = torch.device(device) if device is not None else default_device(env)
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={env.world_size} but {var} is not set; launch with torchrun")
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return env


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op without a multi-process group); returns ``tensor``."""
    if current_env().enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (no-op when not distributed)."""
    if not current_env().enabled:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


class GradientSync:
    """Sum the ``.grad`` of ``params`` over all ranks, after backward, in buckets.

    Parameters are packed in a fixed order into buckets of at most ``bucket_mb`` MiB (per dtype
    and device); one ``dist.all_reduce`` per bucket. A parameter whose ``.grad`` is None (unused
    on this rank in this step) contributes zeros, so every rank issues exactly the same
    collectives (:attr:`num_buckets` per call, plus none for ``extra``, which rides in the last
    bucket).
    """

    def __init__(self, params: Iterable[nn.Parameter], bucket_mb: float = DEFAULT_BUCKET_MB) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("GradientSync: no parameter requires grad")
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        limit = int(bucket_mb * 2**20)
        self.buckets: list[list[nn.Parameter]] = []
        size, key = 0, None
        for p in self.params:
            nbytes = p.numel() * p.element_size()
            k = (p.dtype, p.device)
            if not self.buckets or k != key or (size + nbytes > limit and size > 0):
                self.buckets.append([])
                size, key = 0, k
            self.buckets[-1].append(p)
            size += nbytes

    @property
    def num_buckets(self) -> int:
        """All-reduces issued per :meth:`__call__` in a multi-process group."""
        return len(self.buckets)

    @torch.no_grad()
    def __call__(self, extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """Sum every gradient over ranks in place (missing grads become the sum of the others).
        ``extra`` (a small 1-D float tensor, e.g. loss statistics) is summed in the last bucket;
        returns its summed copy. Without a multi-process group only missing grads are zeroed."""
        enabled = current_env().enabled
        out = None
        for i, bucket in enumerate(self.buckets):
            for p in bucket:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad.reshape(-1) for p in bucket]
            last = i == len(self.buckets) - 1
            if last and extra is not None:
                grads.append(extra.detach().reshape(-1).to(device=bucket[0].device,
                                                            dtype=bucket[0].grad.dtype))
            flat = torch.cat(grads)
            if enabled:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in bucket:
                n = p.numel()
                p.grad.copy_(flat[offset: offset + n].view_as(p.grad))
                offset += n
            if last and extra is not None:
                out = flat[offset:].to(extra.dtype).reshape(extra.shape)
        return out


def shard(global_indices: torch.Tensor, rank: int, world_size: int, micro: int = 0,
          grad_accum: int = 1) -> torch.Tensor:
    """Rank ``rank``'s part of micro-batch ``micro`` of a global batch.

    ``global_indices`` (length ``B * world_size * grad_accum``) is split into
    ``grad_accum * world_size`` consecutive chunks of ``B``; micro-batch ``j`` of rank ``r`` is
    chunk ``j * world_size + r``. The chunks are disjoint and their union is the whole global
    batch, whatever ``world_size`` is, so a run resumed on another number of processes (with
    the per-rank batch scaled to keep the global batch) sees the same samples.
    """
    total = global_indices.shape[0]
    parts = world_size * grad_accum
    if total % parts:
        raise ValueError(f"global batch of {total} does not split into {world_size} ranks x "
                         f"{grad_accum} micro-batches")
    if not (0 <= rank < world_size and 0 <= micro < grad_accum):
        raise ValueError(f"rank {rank} / micro-batch {micro} out of range ({world_size}, {grad_accum})")
    b = total // parts
    chunk = micro * world_size + rank
    return global_indices[chunk * b: (chunk + 1) * b]


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if current_env().enabled:
        dist.barrier()


def destroy() -> None:
    """Tear down the default process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def split_evenly(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, end)`` of part ``index`` when ``range(n)`` is cut into ``parts`` contiguous
    pieces whose sizes differ by at most one."""
    base, rem = divmod(n, parts)
    start = index * base + min(index, rem)
    return start, start + base + (1 if index < rem else 0)


__all__: Sequence[str] = ("DistEnv", "GradientSync", "all_reduce_sum", "barrier", "broadcast_module",
                          "current_env", "default_device", "destroy", "env_from_environ",
                          "init_distributed", "shard", "split_evenly")
