"""Guidance across processes and GPUs with ``torch.distributed`` (gloo on CPUs, NCCL on GPUs),
launched by ``torchrun`` or ``accelerate launch``:

* :mod:`.comm`: the process group, settings checks across ranks, collectives with clear errors;
* :mod:`.field`: the repulsive field with its obstacles sharded over the ranks (exact);
* :mod:`.smc`: one SMC particle system spread over the ranks (equals the one-process run);
* :mod:`.search`: data-parallel search: best-of-N with a global top-k, blocks of samples.

See ``docs/scaling-out.md``.
"""

from guidance.distributed.comm import (
    DistributedError,
    Group,
    all_gather_cat,
    all_reduce,
    barrier,
    check_same,
    check_world,
    current,
    init_from_env,
    launched,
)
from guidance.distributed.field import ShardedRepulsiveField, from_sharded_set

__all__ = [
    "DistributedError",
    "Group",
    "ShardedRepulsiveField",
    "all_gather_cat",
    "all_reduce",
    "barrier",
    "check_same",
    "check_world",
    "current",
    "from_sharded_set",
    "init_from_env",
    "launched",
]
