r"""``cspace obstacles build`` under ``torchrun``: the images encoded in shards by every rank,
then merged into one set (or kept sharded on disk).

1. Every rank lists the same images (:func:`cspace.io.images.list_images`) and the ranks check,
   by a digest all-gathered at start, that they have the same list and settings.
2. The list is cut into S shards of ``shard_size`` images (contiguous, in order); rank r of W
   takes the shards ``split(S, W)[r]``. A shard is encoded in batches streamed by a
   ``torch.utils.data.DataLoader`` (each batch's files checked and read when it is loaded) and
   written into the work folder ``.<out name>.shards-<digest>`` beside ``out``: the float32
   embeddings as ``shard-<k>.safetensors`` (atomic), then ``shard-<k>.json`` (count, d, the
   embeddings file's SHA-256, the sources) last, atomically: a shard with its JSON is finished.
   Rank 0 reports progress.
3. A monitored barrier waits for every rank (a rank that died or hangs stops the others with a
   clear error naming it; nothing is merged, ``out`` is untouched).
4. Rank 0 merges: every shard's embeddings are read back and checked against their SHA-256,
   concatenated in order; Q* (``"auto"``: the whole set's rule), eta and radius are set on the
   whole set, which is saved as one set (:meth:`ObstacleSet.save`: crash-safe) or, with
   ``keep_sharded``, as a sharded set (:func:`obstacles.sharded.save_sharded`). The work folder
   is removed after the set is saved.

**Resuming.** The work folder's name carries the digest of the image list and the settings, and
the shards do not depend on W: a rerun after a crash (with any number of ranks) finds the
finished shards, checks them and encodes only the others.

The merged set equals a one-process :func:`obstacles.from_images.build_from_images` of the same
images and settings (same embeddings, so the same SHA-256 of ``embeddings.safetensors``), as
long as both use the same ``batch_size`` and the same number of CPU threads per process (tested
with the shipped digits encoder: its float32 embeddings move by about 1e-6 between batches of 8
and of 256, or between 1 and 2 threads, where the CPU picks another kernel, but not with which
images share a batch).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cspace.io.files import save_safetensors_atomic, sha256_hex, write_json_atomic
from cspace.io.images import list_images, load_images
from cspace.io.untrusted import FormatError, check_safetensors, parse_json
from guidance.distributed import barrier, check_same, check_world, current, init_from_env
from guidance.distributed.comm import digest
from obstacles import ObstacleSet, ObstacleSetError
from obstacles.from_images import _labels, _parameters, _size, _space
from obstacles.sharded import save_sharded, split

__all__ = ["build_sharded", "work_folder"]


def work_folder(out: str | Path, settings_digest: str) -> Path:
    """Where the shards of a build of ``out`` with these settings are kept until the merge."""
    out = Path(out)
    return out.parent / f".{out.name}.shards-{settings_digest[:16]}"


def _finished(work: Path, k: int, count: int, dim: int | None) -> np.ndarray | None:
    """Shard k's embeddings when its JSON and checksum say it is whole, else None."""
    meta_path, emb_path = work / f"shard-{k:06d}.json", work / f"shard-{k:06d}.safetensors"
    if not (meta_path.is_file() and emb_path.is_file()):
        return None
    try:
        meta = parse_json(meta_path.read_bytes(), max_bytes=1 << 16)
        data = emb_path.read_bytes()
        if meta.get("count") != count or sha256_hex(data) != meta.get("sha256"):
            return None
        d = int(meta["dim"])
        if dim is not None and d != dim:
            return None
        check_safetensors(data, {"embeddings": ("F32", (count, d))})
        from safetensors.numpy import load

        return load(data)["embeddings"]
    except (FormatError, ValueError, KeyError, TypeError, OSError):
        return None


def build_sharded(
    inputs,
    encoder,
    out: str | Path,
    *,
    q_star: float | str = "auto",
    eta: float = 1.0,
    radius: float | None = None,
    label=None,
    size=(8, 8),
    resize: bool = False,
    batch_size: int = 256,
    shard_size: int = 4096,
    keep_sharded: int | None = None,
    group=None,
    log: Callable[[str], None] | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> dict:
    """Build the obstacle set of ``inputs`` into ``out`` with every rank of ``group`` (module
    docstring). ``keep_sharded``: save as a sharded set of that many shards instead of one set.
    ``resize``: resize images of another size to ``size`` instead of refusing them (as
    :func:`obstacles.build_from_images`). ``on_shard(k)`` is called after shard k is written. Returns (on every rank) a report:
    ``count``, ``dim``, ``shards``, ``encoded`` and ``skipped`` shards of this rank,
    ``embeddings_sha256`` (rank 0: SHA-256 of the float32 embeddings, row-major), ``seconds``.
    """
    g = init_from_env() if group is None else current(group)
    say = log if (log is not None and g.rank == 0) else (lambda m: None)
    t0 = time.perf_counter()
    size = _size(size)
    files = list_images([inputs] if isinstance(inputs, str | Path) else inputs)
    settings = dict(
        files=[str(f) for f in files], encoder=getattr(encoder, "name", type(encoder).__name__),
        q_star=q_star, eta=eta, radius=radius, label=label, size=size, resize=bool(resize),
        batch_size=batch_size,
        shard_size=shard_size, keep_sharded=keep_sharded, out=str(Path(out).resolve()),
    )  # fmt: skip
    check_same(settings, "build settings and image list", g)
    check_world(len(files), "images", g, "use fewer processes than images")
    if int(shard_size) < 1:
        raise ObstacleSetError(f"shard_size must be >= 1; got {shard_size}")
    n_shards = -(-len(files) // int(shard_size))
    check_world(n_shards, f"shards of {shard_size} images", g, "lower --shard-size")
    ranges = split(len(files), n_shards)
    work = work_folder(out, digest(settings).hex())
    work.mkdir(parents=True, exist_ok=True)
    first, last = split(n_shards, g.world)[g.rank]
    encoded = skipped = 0
    channels = int(encoder.channels)
    for k in range(first, last):
        start, stop = ranges[k]
        if _finished(work, k, stop - start, None) is not None:
            skipped += 1
            say(f"shard {k + 1}/{n_shards}: finished before, skipped")
            continue
        loader = torch.utils.data.DataLoader(
            files[start:stop],
            batch_size=int(batch_size),
            collate_fn=lambda paths: (
                load_images(paths, size=size, channels=channels, resize=bool(resize)).images
            ),
        )
        parts = []
        for images in loader:
            latents = encoder.encode(images, batch_size=int(batch_size))
            parts.append(encoder.embed(latents).detach().to("cpu").float().numpy())
        emb = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
        if not np.all(np.isfinite(emb)):
            raise ObstacleSetError(f"the encoder returned NaN or Inf in shard {k} ({start}..)")
        sha = save_safetensors_atomic(
            work / f"shard-{k:06d}.safetensors", {"embeddings": torch.from_numpy(emb)}
        )
        meta = dict(count=stop - start, dim=int(emb.shape[1]), sha256=sha, start=start)
        write_json_atomic(work / f"shard-{k:06d}.json", meta)  # last: the shard is finished
        encoded += 1
        say(
            f"shard {k + 1}/{n_shards}: {stop - start} images encoded ({time.perf_counter() - t0:.1f} s)"
        )
        if on_shard is not None:
            on_shard(k)
    barrier(g, "waiting for every rank's shards")
    report = dict(shards=n_shards, encoded=encoded, skipped=skipped, ranks=g.world)
    if g.rank == 0:
        parts, dim = [], None
        for k, (start, stop) in enumerate(ranges):
            emb = _finished(work, k, stop - start, dim)
            if emb is None:
                raise ObstacleSetError(
                    f"shard {k} in {work} is missing or does not match its checksum after every "
                    "rank finished; rerun the build (finished shards are kept)"
                )
            dim = emb.shape[1]
            parts.append(emb)
        emb = np.concatenate(parts)
        q, r = _parameters(q_star, radius, emb, None)
        oset = ObstacleSet.from_embeddings(
            emb, q_star=q, eta=eta, radius=r, labels=_labels(label, files),
            sources=[str(f) for f in files], space=_space(encoder, size),
        )  # fmt: skip
        if keep_sharded:
            save_sharded(oset, out, int(keep_sharded))
        else:
            oset.save(out)
        shutil.rmtree(work, ignore_errors=True)
        report.update(
            count=len(oset), dim=oset.dim, embeddings_sha256=sha256_hex(emb.tobytes()),
            q_star_min=float(oset.q_star.min()), q_star_max=float(oset.q_star.max()),
        )  # fmt: skip
    barrier(g, "waiting for rank 0 to save the set")
    report["seconds"] = time.perf_counter() - t0
    return report
