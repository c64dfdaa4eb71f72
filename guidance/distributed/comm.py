r"""The process group of a distributed run: who this rank is, checks that every rank agrees, and
the collectives the distributed pieces use, each turning a failure into one clear error.

Communication is ``torch.distributed`` only (gloo on CPUs, NCCL on GPUs), started by ``torchrun``
or ``accelerate launch`` (they set ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``);
:func:`init_from_env` joins the group with a timeout. Without an initialised group every function
here acts for one process (rank 0 of 1), so the distributed pieces also run alone.

**Failures.** A collective that fails (a peer closed its connection because its process died,
or it did not answer within the group's timeout) raises :class:`DistributedError` naming this
rank, the step and the timeout, on every surviving rank; :func:`barrier` on gloo is a monitored
barrier that names the ranks that did not arrive. :func:`check_same` compares a SHA-256 digest of
each rank's settings (all-gathered as 32 bytes, never pickled) and raises the same error, naming
the ranks that differ, on every rank.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "DistributedError",
    "Group",
    "all_gather_cat",
    "all_reduce",
    "barrier",
    "check_same",
    "check_world",
    "current",
    "digest",
    "init_from_env",
    "launched",
]

#: seconds a collective waits for a peer before the run stops (the process group's timeout)
DEFAULT_TIMEOUT_S = 120.0
_joined_timeout_s: list[float] = []  # the timeout :func:`init_from_env` joined with


class DistributedError(RuntimeError):
    """A distributed run cannot go on: a rank stopped or timed out, or the ranks disagree."""


@dataclass(frozen=True)
class Group:
    """This process's place in the run: ``rank`` of ``world``; ``group`` the torch process group
    (None: the default one, or no group at all when ``world == 1``)."""

    rank: int
    world: int
    group: object = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def block(self, n: int) -> tuple[int, int]:
        """This rank's contiguous block ``[start, stop)`` of ``n`` items (``numpy.array_split``:
        the first ``n % world`` ranks get one more)."""
        return block(n, self.world, self.rank)


def block(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s block ``[start, stop)`` of ``n`` items split into ``world`` contiguous
    blocks, the first ``n % world`` of them one item longer."""
    q, r = divmod(int(n), int(world))
    start = rank * q + min(rank, r)
    return start, start + q + (1 if rank < r else 0)


def launched() -> bool:
    """Whether this process was started by a launcher for a run of several processes
    (``WORLD_SIZE`` > 1 in the environment: torchrun, accelerate launch)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> Group:
    """Join the process group a launcher described in the environment (no-op when already
    joined, or for one process): NCCL when CUDA is available, else gloo, with ``timeout_s`` as
    the group's timeout for every collective."""
    if not launched() or not dist.is_available():
        return current()
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=float(timeout_s)))
            _joined_timeout_s[:] = [float(timeout_s)]
            atexit.register(_leave)
        except (RuntimeError, ValueError) as err:
            raise DistributedError(
                f"could not join the process group ({backend}, rank {os.environ.get('RANK')} of "
                f"{os.environ.get('WORLD_SIZE')}): {err}; check MASTER_ADDR/MASTER_PORT and that "
                "every rank was started"
            ) from err
    return current()


def _leave() -> None:
    """At exit: leave the process group this process joined. A rank that exits with its gloo
    group alive (its threads still running) was once stopped with "terminate called without an
    active exception" (SIGABRT) while rank 0 was still writing the outputs."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # at exit, nothing more can be done
            pass


def current(group=None, timeout_s: float | None = None) -> Group:
    """This process's :class:`Group` (rank 0 of 1 without an initialised process group);
    ``timeout_s`` defaults to the one :func:`init_from_env` joined with."""
    if isinstance(group, Group):
        return group
    if timeout_s is None:
        timeout_s = _joined_timeout_s[0] if _joined_timeout_s else DEFAULT_TIMEOUT_S
    if not (dist.is_available() and dist.is_initialized()):
        return Group(0, 1, None, timeout_s)
    return Group(dist.get_rank(group), dist.get_world_size(group), group, timeout_s)


@contextlib.contextmanager
def _guard(g: Group, what: str):
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as err:  # torch.distributed.DistBackendError is a RuntimeError
        raise DistributedError(
            f"rank {g.rank} of {g.world}: {what} failed: another rank stopped or did not answer "
            f"within the process group's timeout ({g.timeout_s:g} s); nothing was written by "
            f"this rank. Cause: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err


def _comm_device(g: Group, like: torch.device) -> torch.device:
    """Where a collective's tensors must live: CUDA for NCCL, the CPU for gloo."""
    backend = dist.get_backend(g.group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str, g: Group | None = None, what: str = "") -> torch.Tensor:
    """``t`` reduced over the ranks with ``op`` (``"sum"``, ``"min"`` or ``"max"``); a new tensor
    on ``t``'s device (``t`` itself for one process)."""
    g = current(g)
    if not g.distributed:
        return t
    red = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    buf = t.detach().to(_comm_device(g, t.device)).clone()
    with _guard(g, what or f"all-reduce ({op})"):
        dist.all_reduce(buf, op=red, group=g.group)
    return buf.to(t.device)


def all_gather_cat(t: torch.Tensor, g: Group | None = None, what: str = "") -> torch.Tensor:
    """The ranks' tensors ``t`` (n_r, ...) concatenated in rank order along dim 0; the n_r may
    differ (the trailing shape and dtype may not)."""
    g = current(g)
    if not g.distributed:
        return t
    dev = _comm_device(g, t.device)
    with _guard(g, what or "all-gather"):
        n = torch.tensor([t.shape[0]], dtype=torch.long, device=dev)
        sizes = [torch.zeros_like(n) for _ in range(g.world)]
        dist.all_gather(sizes, n, group=g.group)
        sizes = [int(s) for s in sizes]
        top = max(sizes)
        pad = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=dev)
        pad[: t.shape[0]] = t.detach().to(dev)
        parts = [torch.empty_like(pad) for _ in range(g.world)]
        dist.all_gather(parts, pad, group=g.group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).to(t.device)


def barrier(g: Group | None = None, what: str = "barrier") -> None:
    """Wait for every rank; on gloo a monitored barrier that names the ranks that did not come
    within the timeout."""
    g = current(g)
    if not g.distributed:
        return
    with _guard(g, what):
        if dist.get_backend(g.group) == "gloo":
            dist.monitored_barrier(g.group, timeout=timedelta(seconds=g.timeout_s))
        else:
            dist.barrier(g.group)


def digest(payload) -> bytes:
    """SHA-256 of ``payload``: bytes as given, anything else as canonical JSON (sorted keys)."""
    if not isinstance(payload, bytes):
        payload = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).digest()


def check_same(payload, what: str, g: Group | None = None) -> None:
    """Raise :class:`DistributedError` on every rank unless every rank passed the same
    ``payload`` (compared by :func:`digest`); the message names the ranks that differ from
    rank 0 and ``what`` they disagree on."""
    g = current(g)
    if not g.distributed:
        return
    mine = torch.frombuffer(bytearray(digest(payload)), dtype=torch.uint8)
    every = all_gather_cat(mine[None], g, f"checking that every rank has the same {what}")
    differ = [r for r in range(g.world) if not torch.equal(every[r], every[0])]
    if differ:
        raise DistributedError(
            f"rank {g.rank} of {g.world}: the ranks disagree on {what}: ranks {differ} differ "
            "from rank 0 (SHA-256 of the settings); start every rank with the same arguments "
            "and the same files"
        )


def check_world(n: int, what: str, g: Group | None = None, fix: str = "") -> None:
    """Raise :class:`DistributedError` when there are more ranks than ``n`` ``what`` to split
    (a rank would get none); every rank computes the same, so every rank raises."""
    g = current(g)
    if g.world > int(n):
        raise DistributedError(
            f"rank {g.rank} of {g.world}: {g.world} ranks but only {int(n)} {what} to split "
            f"among them; {fix or 'start at most ' + str(int(n)) + ' processes'}"
        )
