"""Data-parallel fitting with ``torch.distributed``: the few helpers every trainer needs.

A run launched by ``torchrun`` has ``W = WORLD_SIZE`` processes ("ranks"), each with its own
device, its own copy of the guide and a shard of the data. Everything here is a no-op (or an
identity) when no process group is initialised, so single-process code calls the helpers
unconditionally or behind ``world_size() > 1`` at no cost.

Sharding (the semantics of ``torch.utils.data.DistributedSampler``): every rank draws the same
permutation of ``0..N-1`` from an identically seeded generator, pads it by wrapping around to a
multiple of ``W`` and takes the strided shard ``perm[r::W]``. The shards have equal length
``ceil(N/W)``, and the union of the rank-local mini-batches ``k`` (``b`` rows each) is the
contiguous global mini-batch ``perm[k*W*b:(k+1)*W*b]``.

Scaling of SVI (why averaging gradients is exact). Rank ``r`` evaluates, on its batch ``B_r``
of ``b`` rows out of ``N``, Pyro's subsampled-plate estimate

    L_r = beta * KL(q || p) - (N / b) * sum_{n in B_r} log p(y_n | x_n, w),

an unbiased estimate of the negative ELBO on its own. Averaging over the ``W`` ranks,

    (1/W) sum_r L_r = beta * KL - (N / (W b)) * sum_{n in B_0 u ... u B_{W-1}} log p(y_n | x_n, w),

which is exactly the single-process loss on the union batch of ``B = W b`` rows with plate
scale ``N / B``; the KL (prior) term enters every ``L_r`` once and the average keeps it once.
Gradients are linear, so the mean of the rank gradients (:func:`average_gradients`) is the
gradient of that single-process loss. This needs equal local batch sizes, which the padding
guarantees (the last batch of an epoch is equally short on every rank).

Sums over the whole data set (Laplace curvature, marginal likelihood) shard *without* padding
(``shard(..., pad=False)`` is a partition) and add the per-rank sums with :func:`all_reduce_sum`.

NCCL is used for CUDA devices, gloo for the CPU.
"""

from __future__ import annotations

import datetime
import os

import numpy as np
import torch
import torch.distributed as dist

from .errors import PyroSparseError

ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------------------- who am I
def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Rank within this node (``LOCAL_RANK`` set by torchrun; 0 otherwise): picks the GPU."""
    return int(os.environ.get("LOCAL_RANK", 0))


def env_rank() -> int:
    """The rank torchrun assigned (``RANK``; 0 when unset): valid before the process group
    exists and after it has ended."""
    try:
        return int(os.environ.get("RANK", 0))
    except ValueError:
        return 0


def is_main_process() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when the environment describes more than one process (torchrun sets it)."""
    try:
        return all(k in os.environ for k in ("RANK", "WORLD_SIZE")) and int(os.environ["WORLD_SIZE"]) > 1
    except ValueError:
        return False


# ---------------------------------------------------------------------------- setup
def rank_device(device) -> torch.device:
    """The device of this rank: an unindexed ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank())
    return device


def default_backend(device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(backend: str | None = None, device="cpu", timeout_s: float = 1800.0) -> bool:
    """Join the process group described by torchrun's environment variables.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (and ``LOCAL_RANK`` for the
    GPU). Does nothing when a group already exists or the world has one process. On CUDA the
    rank's GPU becomes the current device. Returns True if this call created the group (its
    caller should then :func:`shutdown` it).
    """
    if dist.is_available() and dist.is_initialized():
        return False
    missing = [k for k in ENV if k not in os.environ]
    if missing:
        raise PyroSparseError(
            f"distributed training needs the torchrun environment, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set; launch with "
            "`torchrun --nproc_per_node=K -m pyro_sparse fit ...`")
    try:
        world = int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise PyroSparseError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None
    if world <= 1:
        return False
    if not dist.is_available():
        raise PyroSparseError("this torch build has no torch.distributed support")
    device = rank_device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PyroSparseError(f"device {str(device)!r} requested but CUDA is not available")
        torch.cuda.set_device(device)
    backend = backend or default_backend(device)
    # binding the GPU (device_id) lets NCCL set up eagerly and barriers know their device
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return True


def shutdown():
    """Leave the process group (after a final barrier so no rank exits while others write)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def rank_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for this rank derived from ``(seed, *keys, rank)`` by NumPy's SeedSequence
    hash: independent noise streams per rank that do not depend on what ran before (so a
    resumed run draws what the uninterrupted one drew)."""
    words = np.random.SeedSequence([int(seed), *map(int, keys), rank()]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


# ---------------------------------------------------------------------------- sharding
def shard(indices: torch.Tensor, pad: bool = True, rank_: int | None = None, world: int | None = None):
    """This rank's strided shard ``indices[r::W]``.

    With ``pad`` (SGD) the index list is first extended by wrapping around to a multiple of
    ``W``, so all shards have length ``ceil(n/W)`` (up to ``W-1`` rows then appear twice in an
    epoch, as with ``DistributedSampler(drop_last=False)``). Without ``pad`` the shards
    partition the indices (for sums over the data set).
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if w == 1:
        return indices
    if pad:
        n = len(indices)
        extra = (-n) % w
        if extra:
            reps = -(-extra // n)
            indices = torch.cat([indices] + [indices] * reps)[: n + extra]
    return indices[r::w]


def shard_indices(n: int, epoch: int = 0, seed: int = 0, shuffle: bool = True, pad: bool = True,
                  rank_: int | None = None, world: int | None = None) -> torch.Tensor:
    """``DistributedSampler`` indices of one epoch: the permutation of ``range(n)`` drawn from a
    generator seeded with ``seed + epoch`` (identical on every rank), sharded by :func:`shard`."""
    if shuffle:
        g = torch.Generator().manual_seed(int(seed) + int(epoch))
        indices = torch.randperm(n, generator=g)
    else:
        indices = torch.arange(n)
    return shard(indices, pad=pad, rank_=rank_, world=world)


# ---------------------------------------------------------------------------- collectives
def all_reduce_sum(tensors):
    """Sum each tensor over the ranks, in place, with one collective; returns the tensors.

    Accepts a tensor or a list of same-dtype tensors on one device (flattened into a buffer).
    """
    single = torch.is_tensor(tensors)
    tensors = [tensors] if single else list(tensors)
    if world_size() > 1 and tensors:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))
    return tensors[0] if single else tensors


def average_gradients(params):
    """Replace each parameter's ``.grad`` by its mean over the ranks (one collective).

    Parameters without a gradient contribute zeros and stay without one; every rank must own
    the same parameters in the same order (true for guides set up from the same model).
    """
    params = list(params)
    w = world_size()
    if w == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(w)
    for p, part in zip(params, flat.split([p.numel() for p in params])):
        if p.grad is not None:
            p.grad.copy_(part.view_as(p))


@torch.no_grad()
def broadcast_parameters(params, src: int = 0):
    """Copy rank ``src``'s parameter values to every rank (identical starting points)."""
    params = list(params)
    if world_size() == 1 or not params:
        return
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    dist.broadcast(flat, src)
    for p, part in zip(params, flat.split([p.numel() for p in params])):
        p.copy_(part.view_as(p))


def on_main(fn, *args, **kwargs):
    """Run ``fn`` on rank 0 only and hand its (picklable) result to every rank.

    An error raised on rank 0 is raised on every rank (as :class:`PyroSparseError` with rank 0's
    message), so no rank is left waiting in a collective.
    """
    if world_size() == 1:
        return fn(*args, **kwargs)
    box = [None, None]
    if is_main_process():
        try:
            box[0] = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            box[1] = f"{type(e).__name__}: {e}" if not isinstance(e, PyroSparseError) else str(e)
            error = e
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        if is_main_process():
            raise error
        raise PyroSparseError(f"rank 0 failed: {box[1]}")
    return box[0]


# ---------------------------------------------------------------------------- local launches
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for a local rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_local(fn, world_size: int = 2, args: tuple = (), backend: str = "gloo", timeout_s: float = 300.0,
                 start_method: str = "spawn"):
    """Run ``fn(*args)`` in ``world_size`` fresh local processes joined in one process group,
    as ``torchrun --nproc_per_node=world_size`` would (for tests and quick checks on one machine).

    ``fn`` must be importable by name (a module-level function). Each process gets torchrun's
    environment variables, one CPU thread, and leaves the group when ``fn`` returns. An
    exception in any process is raised here (``torch.multiprocessing.ProcessRaisedException``);
    a collective that waits longer than ``timeout_s`` fails instead of hanging.
    ``start_method="forkserver"`` with ``multiprocessing.set_forkserver_preload([...])`` pays the
    imports once for several launches.
    """
    import torch.multiprocessing as mp

    mp.start_processes(_local_entry, args=(fn, world_size, free_port(), backend, tuple(args), timeout_s),
                       nprocs=world_size, join=True, start_method=start_method)


def _local_entry(rank_, fn, world, port, backend, args, timeout_s):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank_),
                       "LOCAL_RANK": str(rank_), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    init_from_env(backend, timeout_s=timeout_s)
    try:
        fn(*args)
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other ranks may be inside a collective
        raise
    shutdown()
