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
# "dp": replicated parameters, gradients summed by GradientSync; "fsdp": gradients and optimizer
# state sharded by torch.distributed.fsdp.fully_shard, the model as one unit; "fsdp-blocks":
# also one unit per transformer block (see fully_shard_model).
PARALLEL_MODES = ("dp", "fsdp", "fsdp-blocks")


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


def check_parallel(parallel: str, checkpoint_segments: bool) -> None:
    """Raise ValueError unless ``parallel`` is one of :data:`PARALLEL_MODES` and fits a model
    with ``checkpoint_segments`` (``"fsdp-blocks"`` cannot recompute checkpointed segments
    inside the backward; see :func:`fully_shard_model`)."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    if parallel == "fsdp-blocks" and checkpoint_segments:
        raise ValueError("parallel='fsdp-blocks' does not support checkpoint_segments=True (segments "
                         "recomputed inside the backward); use parallel='fsdp' or no checkpointing")


def fully_shard_model(model: nn.Module, blocks: bool = False) -> nn.Module:
    """Shard ``model`` over the ranks with FSDP2 (:func:`torch.distributed.fsdp.fully_shard`), in
    place; build the optimizer afterwards (it must see the sharded parameters).

    ``blocks=False``: the whole RMT wrapper is *one* FSDP unit, kept unsharded from its forward
    to the end of its backward (``reshard_after_forward=False``): one all-gather per forward and
    one reduce-scatter per backward whatever the number of segments, so it works with
    checkpointed segments and with ranks holding different numbers of segments. Gradients and
    optimizer state (for AdamW two thirds of the training state) live sharded, 1/world_size per
    rank, between steps; the parameters are whole on every rank while a batch runs.

    ``blocks=True``: additionally one unit per transformer block (the base model's
    ``_no_split_modules``), gathered for each use and resharded after it, so only one block's
    parameters are whole at a time: for models whose parameters do not fit one device. An RMT
    runs every block once per segment, so each block issues one all-gather per segment in the
    forward and again in the backward, and one reduce-scatter per segment. Hence two conditions,
    both met by :func:`rmt_fast.train.train`: every rank runs the same number of segments
    (different numbers issue different collectives: a 2-process probe with 1 and 3 segments
    failed with a gloo size mismatch), and no ``checkpoint_segments`` (recomputing segments
    inside the backward gave wrong gradients in the probe, max error 0.17; torch 2.13, gloo).

    Gradients are *summed* over ranks (the trainer weights each rank's loss by its share of the
    global target count), with plain SUM collectives (gloo has no PREMUL_SUM).
    """
    from torch.distributed.fsdp import fully_shard

    if not current_env().enabled:
        raise RuntimeError("fully_shard_model needs an initialised multi-process group "
                           "(launch with torchrun, then call init_distributed)")
    units = []
    if blocks:
        cfg = getattr(model, "rmt_config", None)
        check_parallel("fsdp-blocks", cfg is not None and cfg.checkpoint_segments)
        base = getattr(model, "base", model)
        names = set(getattr(base, "_no_split_modules", None) or ())
        units = [m for m in model.modules() if type(m).__name__ in names]
        if not units:
            raise ValueError(f"per-block FSDP: found no transformer blocks in {type(base).__name__} "
                             f"(its _no_split_modules: {sorted(names)})")
        for block in units:
            fully_shard(block, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=False)
    for unit in [*units, model]:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return model


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units inside ``model`` (the model itself included); empty when not sharded."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def unshard_all(model: nn.Module) -> None:
    """Gather every FSDP unit's parameters (one all-gather per unit, on every rank), e.g. before
    an evaluation in which ranks run different numbers of forwards."""
    for unit in fsdp_units(model):
        unit.unshard()


def reshard_all(model: nn.Module) -> None:
    """Back to the sharded parameters in every unit (local, no collective)."""
    for unit in fsdp_units(model):
        unit.reshard()


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` went through :func:`fully_shard_model` (an FSDP2 module)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict | None]:
    """``(model_state, optimizer_state)`` as whole CPU tensors, the optimizer state keyed by
    parameter name (loadable into any number of ranks, sharded or not, by
    :func:`load_full_state_dicts`). Under FSDP a collective: every rank must call it; only rank
    0 gets the tensors (the other ranks get empty dicts)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    reshard_all(model)  # the modules must hold the sharded parameters the optimizer steps
    # a fresh optimizer (no step yet) has nothing to save: None (the state API would run a
    # zero-lr step to create its state)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer.state else None
    if is_sharded(model):
        return get_model_state_dict(model, options=options), optim_state
    return model.state_dict(), optim_state


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                          model_state: dict | None, optimizer_state: dict | None) -> None:
    """Inverse of :func:`full_state_dicts` on every rank (each passes the whole dicts; under
    FSDP each rank keeps its shard). ``None`` skips that part. Raises ValueError when the
    model's keys differ from the state's."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    if model_state is not None:
        expected = set(model.state_dict())
        if set(model_state) != expected:
            raise ValueError(f"state does not fit the model: missing {sorted(expected - set(model_state))}, "
                             f"unexpected {sorted(set(model_state) - expected)}")
        if is_sharded(model):
            set_model_state_dict(model, model_state, options=options)
        else:
            model.load_state_dict(model_state)
    if optimizer_state is not None:
        # strict=False: a parameter that never had a gradient (e.g. cut off by truncated BPTT)
        # has no state, as in torch.optim's own state_dict
        set_optimizer_state_dict(model, optimizer, optimizer_state,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        # the loader creates every state with a zero-lr step first: a parameter without saved
        # state must start fresh (step 0), as it would have without the interruption
        for name, param in model.named_parameters():
            if name not in optimizer_state["state"]:
                optimizer.state.pop(param, None)


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


__all__: Sequence[str] = ("PARALLEL_MODES", "DistEnv", "GradientSync", "all_reduce_sum", "barrier",
                          "broadcast_module", "check_parallel", "current_env", "default_device", "destroy",
                          "env_from_environ", "fsdp_units", "full_state_dicts", "fully_shard_model",
                          "init_distributed", "is_sharded", "load_full_state_dicts", "reshard_all",
                          "shard", "split_evenly", "unshard_all")
