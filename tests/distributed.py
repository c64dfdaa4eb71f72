"""Running a function on W gloo processes from a test.

``spawn(fn, world, *args)`` starts W processes (forked from a fork server that imported torch
and the packages once per pytest worker, :data:`PRELOAD`; freshly spawned interpreters where
there is no fork server), each joins a gloo group on a free local port with
a short timeout and one thread, runs ``fn(rank, world, *args)`` and leaves the group. Workers
write what they computed as ``.npz`` files (loaded without pickles) for the test to compare.
"""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from guidance.distributed import init_from_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, timeout_s: float, fn, args, env: dict) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    init_from_env(timeout_s, backend="gloo")
    try:
        fn(rank, world, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


#: what the fork server imports once: each rank is then a fork of a process that has them,
#: instead of a new interpreter importing torch and the packages again (seconds per rank on 2
#: cores). The server never runs torch operations, so no thread pool is forked.
PRELOAD = ["numpy", "torch", "torch.distributed", "guidance", "obstacles", "tests.distributed"]


def _context():
    if "forkserver" not in mp.get_all_start_methods():  # Windows
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def spawn(
    fn, world: int, *args, timeout_s: float = 30.0, env: dict | None = None, check: bool = True
) -> list[int]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo processes and wait for all of them
    (unlike ``torch.multiprocessing.spawn``, a rank that fails does not kill the others: the
    failure tests watch how they stop). Returns the exit codes; with ``check`` raises unless
    every one is 0. A process still running after ``3 x timeout_s + 60`` s is killed."""
    ctx = _context()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, timeout_s, fn, args, dict(env or {})))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(3 * timeout_s + 60)
        if p.is_alive():
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    if check and any(codes):
        raise RuntimeError(f"ranks exited with codes {codes} (tracebacks on stderr)")
    return codes
