"""Data-parallel and sharded training for :mod:`rmt_fast.train` (``torchrun`` / ``torch.distributed``).

An RMT's training step is an ordinary forward and backward: the segments run through
:func:`rmt_fast.models.segment_loop.run_segments`, with segment checkpointing done by
``torch.utils.checkpoint`` (non-reentrant), which recomputes a segment *inside* autograd's own
backward pass. Every parameter therefore becomes ready once per backward, however many segments
used it, and PyTorch's own wrappers apply:

* ``dp``: :func:`data_parallel` wraps the model in ``torch.nn.parallel.DistributedDataParallel``:
  gradients all-reduced in buckets while the backward still runs, ``no_sync`` for all but the
  last micro-batch of gradient accumulation. Ranks may hold different numbers of segments: the
  reducer's collectives depend on the buckets only.
* ``fsdp`` / ``fsdp-blocks``: :func:`fully_shard_model` shards with FSDP2
  (``torch.distributed.fsdp.fully_shard``), the model as one unit or also one unit per
  transformer block.

Loss weighting: the model's loss is the mean cross-entropy over the target positions of its own
(micro-)batch. Each rank scales its loss by ``local_targets / global_targets`` (the global count
is one all-reduce of a scalar per optimizer step, done before the forward) and the gradients are
*summed* over ranks (DDP through a summing communication hook, FSDP2 with its divide factor set
to 1), so the result is the mean over every target position of the global batch: exactly the
gradient of one process given the whole global batch, also with gradient accumulation and with
ranks holding different numbers of segments or targets.
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEFAULT_BUCKET_MB = 25.0
# "dp": replicated parameters, DistributedDataParallel (data_parallel); "fsdp": gradients and
# optimizer state sharded by torch.distributed.fsdp.fully_shard, the model as one unit;
# "fsdp-blocks": also one unit per transformer block (see fully_shard_model).
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


def _sum_hook(process_group, bucket):
    """DDP communication hook: all-reduce a gradient bucket with SUM (DDP's default hook
    divides by the world size; the trainer's losses are already weighted by their share of the
    global target count)."""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def data_parallel(model: nn.Module, bucket_mb: float = DEFAULT_BUCKET_MB,
                  find_unused_parameters: bool | None = None) -> nn.Module:
    """``model`` in ``torch.nn.parallel.DistributedDataParallel``, gradients *summed* over ranks.

    Its constructor broadcasts rank 0's parameters and buffers; buffers are not broadcast again
    at every forward (the wrappers' buffers never change in training). ``find_unused_parameters``
    (default: when ``model.rmt_config.bptt_depth >= 0``): with truncated BPTT the learned memory
    is cut off from the loss on a rank whose batch is longer than the window, and not on another,
    so the set of parameters that get a gradient differs between ranks and steps.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not current_env().enabled:
        raise RuntimeError("data_parallel needs an initialised multi-process group "
                           "(launch with torchrun, then call init_distributed)")
    if bucket_mb <= 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
    if find_unused_parameters is None:
        cfg = getattr(model, "rmt_config", None)
        find_unused_parameters = cfg is not None and cfg.bptt_depth >= 0
    device = next(model.parameters()).device
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                  bucket_cap_mb=bucket_mb, broadcast_buffers=False,
                                  find_unused_parameters=find_unused_parameters)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (``model`` itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def check_parallel(parallel: str) -> None:
    """Raise ValueError unless ``parallel`` is one of :data:`PARALLEL_MODES`."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")


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
    forward and again in the backward (and, with ``checkpoint_segments``, once more for the
    recomputation), and one reduce-scatter per segment. So every rank must run the same number
    of segments (different numbers issue different collectives); :func:`rmt_fast.train.train`
    pads a rank's shorter micro-batch with segments that are padding in every row, which change
    nothing (:func:`rmt_fast.models.segment_loop.cut_before`).

    Gradients are *summed* over ranks (the trainer weights each rank's loss by its share of the
    global target count), with plain SUM collectives (gloo has no PREMUL_SUM).
    """
    from torch.distributed.fsdp import fully_shard

    if not current_env().enabled:
        raise RuntimeError("fully_shard_model needs an initialised multi-process group "
                           "(launch with torchrun, then call init_distributed)")
    units = []
    if blocks:
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
    """Tear down the default process group if one exists, after every rank has reached this
    point (a rank that tears down while another still uses the group can abort the other's
    communication threads at exit)."""
    if dist.is_available() and dist.is_initialized():
        # wrappers no longer referenced but still in reference cycles (a DistributedDataParallel
        # inside a Trainer) are freed now, while their group exists: one freed after the group
        # was destroyed hung a rank at exit (tests/accelerate_worker.py, 3 of 12 runs)
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def split_evenly(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, end)`` of part ``index`` when ``range(n)`` is cut into ``parts`` contiguous
    pieces whose sizes differ by at most one."""
    base, rem = divmod(n, parts)
    start = index * base + min(index, rem)
    return start, start + base + (1 if index < rem else 0)


__all__: Sequence[str] = ("PARALLEL_MODES", "DistEnv", "all_reduce_sum", "barrier", "broadcast_module",
                          "check_parallel", "current_env", "data_parallel", "default_device", "destroy",
                          "env_from_environ", "fsdp_units", "full_state_dicts", "fully_shard_model",
                          "init_distributed", "is_sharded", "load_full_state_dicts", "reshard_all",
                          "shard", "split_evenly", "unshard_all", "unwrap")
