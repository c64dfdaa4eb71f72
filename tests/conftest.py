"""What the tests share: markers, the ``cspace`` command runner, the exact toy with its field,
and the tiny digits-shaped encoder.

Markers (registered in pyproject.toml; the README's test command runs them all):

* ``slow``: more than about 10 s on 2 CPU cores (``pytest -m "not slow"`` for a quick pass);
* ``notebook``: executes a notebook;
* ``gpu``: needs a CUDA device; skipped here when there is none.
"""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config) -> None:
    """Under pytest-xdist (the default: ``-n auto`` in pyproject.toml), each worker takes an
    equal share of the CPUs for torch's threads, so that the workers do not oversubscribe the
    cores (a test that sets ``threads`` itself still gets what it asks for). The processes a
    test starts (the README's commands, notebook kernels, ``cspace`` subprocesses) inherit the
    same share through ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` unless they are set: a
    subprocess on every core beside the other worker made OpenMP's threads wait on each other
    (the README's Fashion-MNIST block took 288 s under the suite, 38 s alone)."""
    import os

    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        share = max(1, cpus // int(workers))
        torch.set_num_threads(share)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(share))


def pytest_collection_modifyitems(config, items) -> None:
    """Skip ``gpu`` tests without a CUDA device (saying so), and mark notebook runs slow."""
    no_cuda = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "notebook" in item.keywords:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def one_distributed_at_a_time(tmp_path_factory):
    """Hold an inter-process lock for the test: under pytest-xdist the tests that start several
    processes (torchrun, spawned ranks) run one at a time, whichever worker has them (two at once
    on 2 cores once ended with a rank aborted). The lock file is in the run's shared temporary
    folder (the parent of each worker's own)."""
    try:
        import fcntl
    except ImportError:  # not on a POSIX system: no lock
        yield
        return
    lock = tmp_path_factory.getbasetemp().parent / "cspace-distributed-tests.lock"
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@pytest.fixture
def run_cli(capsys):
    """``run_cli(argv) -> (exit code, stdout, stderr)``: the ``cspace`` command as a user runs it
    (:func:`cspace.cli.main`: parsing, the command, one-line errors with exit code 2)."""
    from cspace.cli import main

    def run(argv) -> tuple[int, str, str]:
        capsys.readouterr()  # drop what came before
        rc = main([str(a) for a in argv])
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run


@pytest.fixture(scope="module")
def toy():
    """The exact 2-D toy (:func:`cspace.models.toy.default_toy`): ``(mixture, balls, field)``
    with the field of :func:`cspace.experiments.toy.toy_obstacle_set` (Q* = 1.5 x radius)."""
    from cspace.experiments.toy import toy_obstacle_set
    from cspace.models.toy import default_toy
    from guidance import RepulsiveField

    mix, balls = default_toy()
    return mix, balls, RepulsiveField(toy_obstacle_set(balls))


@pytest.fixture
def tiny_encoder():
    """An encoder over :func:`cspace.models.tiny_pipelines.tiny_digits_vae` (random weights,
    grey 8 x 8 images -> latents 2 x 4 x 4), named ``tiny``."""
    from cspace.models.encoders import Encoder
    from cspace.models.tiny_pipelines import tiny_digits_vae

    return Encoder(tiny_digits_vae(), scaling_factor=1.0, shift_factor=0.0, name="tiny")
