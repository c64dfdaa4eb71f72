"""A local diffusers pipeline, guided by an obstacle set, optionally searched: what
``cspace sample`` runs.

* Without ``search``: the pipeline itself, called through
  :func:`guidance.integrations.diffusers.guide` (the field at every step, ``strength``; without
  obstacles the wrapper only records the final latents); NFE = steps per image (x2 model passes
  with classifier-free guidance, counted as one step each, as diffusers does).
* With ``search=ALGO`` and ``budget=NFE``: the pipeline's denoiser as a velocity
  (:class:`guidance.integrations.velocity.DiffusersVelocity`; unconditional UNet pipelines,
  Stable Diffusion 1.x/2.x and SD3), the search algorithm of :mod:`guidance.search` on the total
  budget, the obstacle set's clearance as the verifier, then the pipeline's VAE to decode.

:func:`sample_pipeline` writes ``OUT/image_XXX.png``, ``OUT/latents.safetensors`` (the final
latents, (n, C, H, W)) and ``OUT/record.json`` (pipeline, settings, seed, NFE, the search's
verifier scores and calls, and per image the distance to the nearest obstacle and whether it
collided) and ``OUT/grid.png`` (the first :data:`GRID_IMAGES` images, ``ceil(sqrt(k))`` a
row), each file atomically; images ``image_XXX.png`` of an earlier run beyond this run's n are
removed (after the record is written), so the folder holds one run. ``guidance_scale`` is for
prompt pipelines (None: 7) and class-conditional ones (DiT; None: the pipeline's own default);
the record's is None for an unconditional pipeline. Nothing
is downloaded: ``pipeline`` must be a folder with ``model_index.json``.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import re
from pathlib import Path

import torch

from cspace.io.checks import check_output_folder
from cspace.io.files import write_file_atomic
from cspace.io.images import save_grid_png
from cspace.models.devices import resolve_device
from guidance import RepulsiveField
from guidance.distributed import barrier, init_from_env
from guidance.integrations.diffusers import check_pipeline_space, guide
from guidance.integrations.pipelines import (
    decode,
    heun_scheduler,
    load_pipeline,
    pipeline_denoiser,
    to_pil,
)
from guidance.integrations.velocity import DiffusersVelocity
from guidance.search import ALGORITHMS, ClearanceVerifier
from obstacles import ObstacleSet

__all__ = ["GRID_IMAGES", "sample_pipeline"]

#: the classifier-free guidance scale of prompt pipelines when none is given
DEFAULT_GUIDANCE_SCALE = 7.0

#: images drawn in ``grid.png`` at most (8 x 8: 4105 x 4105 pixels for 512 x 512 images)
GRID_IMAGES = 64


def sample_pipeline(
    pipeline: str | os.PathLike,
    *,
    obstacles: str | os.PathLike | None = None,
    n: int = 4,
    steps: int = 28,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    guidance_scale: float | None = None,
    strength: float = 1.0,
    search: str | None = None,
    budget: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    out_dir: str | os.PathLike = "cspace-samples",
    progress: bool = False,
    blocks: int | None = None,
    scheduler: str = "pipeline",
    class_labels: list[int] | None = None,
) -> dict:
    """Sample ``n`` images of the local pipeline folder ``pipeline`` (module docstring) into
    ``out_dir``; returns the record (also written to ``out_dir/record.json``). ``progress``:
    the pipeline's own progress bar (diffusers', on stderr) while it samples.

    Under ``torchrun`` (or with ``blocks``) the n images are split into ``blocks`` blocks
    (default: one per rank) shared among the ranks, block k seeded ``block_seed(seed, k)``
    (:mod:`guidance.distributed.search`): the union does not depend on the number of ranks,
    equals one process run with the same ``blocks``, and ``blocks=1`` is the plain run. Rank 0
    writes the files (each atomically) after every rank finished; ``record`` gains ``blocks``
    and ``ranks``, with ``nfe``, ``guided_steps`` and ``verifier_calls`` summed over blocks.

    ``scheduler``: ``"pipeline"`` (the folder's own) or ``"heun"``: diffusers'
    ``FlowMatchHeunDiscreteScheduler`` made from the flow-matching scheduler's config
    (``steps`` steps are ``2 steps - 1`` model calls: Heun steps and a last Euler step), the
    sampler the shipped Fashion-MNIST pipelines meet their targets with; not with a search,
    which integrates with its own solver.

    ``class_labels``: for class-conditional pipelines (``DiTPipeline``: a ``class_labels``
    argument), the classes of the images, taken in turn (image i gets
    ``class_labels[i % len(class_labels)]``, whatever the blocks); ``guidance_scale`` is then the
    pipeline's classifier-free guidance scale (its own default when None: 4 for DiT). Not with a
    search (:func:`guidance.integrations.pipelines.pipeline_denoiser` has no class-conditional
    denoiser).

    Raises:
        ValueError: ``search`` without ``budget`` or without ``obstacles``, an unknown
            algorithm, a prompt pipeline without ``prompt``, a ``prompt`` or
            ``negative_prompt`` for a pipeline that takes none, ``scheduler="heun"`` with a
            search or for a pipeline whose scheduler is not flow matching; a class-conditional
            pipeline without ``class_labels``, with more labels than images, a label out of its
            range, a prompt or a search, or with ``guidance_scale > 1`` when its transformer
            does not have DiT's 1,000 classes (:data:`DIT_NULL_CLASS`); ``class_labels`` for a
            pipeline that is not class-conditional the way DiT is.
        MissingWeightsError: no pipeline at ``pipeline``.
    """
    settings = dict(
        pipeline=str(pipeline), prompt=prompt, negative_prompt=negative_prompt, n=n, steps=steps,
        guidance_scale=guidance_scale, obstacles=None if obstacles is None else str(obstacles),
        strength=strength, search=search, budget=budget, seed=seed, device=device,
        out=str(out_dir), scheduler=scheduler, class_labels=class_labels,
    )  # fmt: skip
    if scheduler not in ("pipeline", "heun"):
        raise ValueError(f"scheduler must be 'pipeline' or 'heun'; got {scheduler!r}")
    if scheduler == "heun" and search is not None:
        raise ValueError(
            "--scheduler heun changes the pipeline's own loop; a search integrates with its own "
            "solver: drop --scheduler heun or --search"
        )
    if search is not None:
        if search not in ALGORITHMS:
            raise ValueError(f"unknown search {search!r}; choose one of {tuple(ALGORITHMS)}")
        if budget is None:
            raise ValueError("a search needs a budget in NFE (--budget, the total over all images)")
        if obstacles is None:
            raise ValueError(
                "a search scores candidates by the obstacle set's clearance: pass the obstacle "
                "set (--obstacles SET)"
            )
    g = init_from_env()  # first: under NCCL it selects this rank's GPU (LOCAL_RANK)
    device = str(resolve_device(device))
    check_output_folder(out_dir, "the output folder (--out)")
    pipe = load_pipeline(pipeline, device)
    pipe.set_progress_bar_config(disable=not progress)
    if scheduler == "heun":
        pipe.scheduler = heun_scheduler(pipe.scheduler)
    params = inspect.signature(pipe.__call__).parameters
    if _class_conditional(params):  # DiT
        guidance_scale = _check_class_labels(pipe, params, class_labels, n, prompt,
                                             negative_prompt, guidance_scale, search)  # fmt: skip
        settings["guidance_scale"] = guidance_scale
    elif class_labels is not None:
        raise ValueError(
            f"{type(pipe).__name__} is not class-conditional the way DiT is (one class label "
            "per image, the batch being the labels); drop --class-label"
        )
    elif "prompt" not in params:
        if "batch_size" not in params:
            raise ValueError(
                f"cspace sample runs unconditional, class-conditional and text-to-image "
                f"pipelines; {type(pipe).__name__} takes neither a prompt, class_labels nor "
                "batch_size: guide it from Python (guidance.integrations.diffusers.guide), "
                "called as the pipeline is"
            )
        given = [k for k, v in (("--prompt", prompt), ("--negative-prompt", negative_prompt),
                                ("--guidance-scale", guidance_scale)) if v is not None]  # fmt: skip
        if given:
            raise ValueError(
                f"{type(pipe).__name__} takes no prompt; drop {', '.join(given)} (they are for "
                "text-to-image pipelines: Stable Diffusion, SD3)"
            )
    elif guidance_scale is None:
        settings["guidance_scale"] = guidance_scale = DEFAULT_GUIDANCE_SCALE
    field = RepulsiveField(ObstacleSet.load(obstacles)) if obstacles is not None else None
    check_pipeline_space(pipe, field)  # guide() checks too; a search would not
    record = {"pipeline": str(pipeline), "pipeline_class": type(pipe).__name__}
    record["settings"] = settings
    run = dict(
        steps=steps, prompt=prompt, negative_prompt=negative_prompt,
        guidance_scale=guidance_scale, strength=strength, search=search, class_labels=class_labels,
    )  # fmt: skip
    if blocks is None and g.world == 1:
        generator = torch.Generator().manual_seed(int(seed))
        images, latents, part = _sample_block(pipe, field, n, budget, generator, **run)
    else:
        images, latents, part = _sample_blocks(
            pipe, field, n, budget, seed, blocks, g, settings, run
        )
        record["blocks"], record["ranks"] = blocks or g.world, g.world
    record.update(part)
    if field is not None:
        ev = field.evaluate(latents.float())
        record["per_image"] = [
            {"file": f"image_{i:03d}.png", "nearest_obstacle": float(d), "collided": bool(c)}
            for i, (d, c) in enumerate(zip(ev.nearest.tolist(), ev.collided.tolist(), strict=True))
        ]
    barrier(g, "the barrier before writing the images")
    if g.rank == 0:
        _write(Path(out_dir), images, latents, record)
    return record


def _class_conditional(params) -> bool:
    """Whether a pipeline's ``__call__`` parameters are DiT's: ``class_labels`` and no
    ``batch_size`` (the batch is the labels). ConsistencyModelPipeline takes both, its labels
    optional: it is called as an unconditional pipeline."""
    return "class_labels" in params and "batch_size" not in params


#: the null class of DiTPipeline's classifier-free guidance (diffusers hard-codes it: the label
#: embedding of a 1,000-class transformer has 1,001 rows, the last for "no class")
DIT_NULL_CLASS = 1000


def _check_class_labels(pipe, params, labels, n, prompt, negative_prompt, guidance_scale, search):
    """The checks of a class-conditional pipeline's settings; returns the guidance scale (the
    pipeline's own default when None)."""
    name = type(pipe).__name__
    if labels is None or len(labels) == 0:
        raise ValueError(
            f"{name} is class-conditional: give the classes of the images (--class-label 3, or "
            "--class-label 3,7 to take them in turn)"
        )
    given = [k for k, v in (("--prompt", prompt), ("--negative-prompt", negative_prompt))
             if v is not None]  # fmt: skip
    if given:
        raise ValueError(f"{name} takes class labels, not a prompt; drop {', '.join(given)}")
    if search is not None:
        raise ValueError(
            f"--search runs unconditional and text-to-image pipelines; {name} is guided without "
            "a search: drop --search and --budget"
        )
    if len(labels) > n:
        raise ValueError(
            f"{len(labels)} class labels for {n} images: the labels after the first {n} would "
            f"not be used; pass at most {n} labels or more images (--n)"
        )
    model = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    count = getattr(getattr(model, "config", None), "num_embeds_ada_norm", None)
    bad = [c for c in labels if c < 0 or (count is not None and c >= count)]
    if bad:
        raise ValueError(
            f"--class-label {bad[0]} is out of range: {name} has classes 0 to "
            f"{'...' if count is None else count - 1}"
        )
    if guidance_scale is None:
        default = params["guidance_scale"].default if "guidance_scale" in params else None
        guidance_scale = float(default) if isinstance(default, int | float) else 1.0
    if guidance_scale > 1 and count is not None and count != DIT_NULL_CLASS:
        raise ValueError(
            f"{name}'s classifier-free guidance (--guidance-scale {guidance_scale:g}) uses class "
            f"{DIT_NULL_CLASS} as its null class, but this transformer has {count} classes: pass "
            "--guidance-scale 1"
        )
    return guidance_scale


def _sample_block(
    pipe, field, n, budget, generator, *, steps, prompt, negative_prompt, guidance_scale,
    strength, search, class_labels, first=0,
):  # fmt: skip
    """``n`` images of one run from ``generator``, the first being image ``first`` of the run
    (for the class labels): (PIL images, latents (n, ...), record)."""
    part: dict = {}
    if search is None:
        kw = {"num_inference_steps": steps, "generator": generator}
        params = inspect.signature(pipe.__call__).parameters
        if "output_type" in params:  # PIL images: tensors' ranges differ between pipelines
            kw["output_type"] = "pil"
        if _class_conditional(params):
            k = len(class_labels)
            kw.update(class_labels=[class_labels[(first + i) % k] for i in range(n)],
                      guidance_scale=guidance_scale)  # fmt: skip
        elif "prompt" in params:
            if prompt is None:
                raise ValueError(f"{type(pipe).__name__} needs a prompt (--prompt)")
            kw.update(prompt=[prompt] * n, guidance_scale=guidance_scale)
            if negative_prompt is not None:
                kw["negative_prompt"] = [negative_prompt] * n
        else:
            kw["batch_size"] = n
        runner = guide(pipe, field, strength=strength)  # field None: records only
        images = to_pil(runner(**kw).images)
        latents = runner.stats.last_latents[:n]
        part["nfe"] = runner.stats.steps * n
        part["guided_steps"] = runner.stats.guided_steps
    else:
        den, shape = pipeline_denoiser(pipe, prompt, negative_prompt, guidance_scale)
        algo = ALGORITHMS[search]
        res = algo(
            DiffusersVelocity(den, pipe.scheduler), shape, ClearanceVerifier(field), int(budget),
            n_return=n, steps=steps, generator=generator, **algo.keywords(field=field),
        )  # fmt: skip
        latents = res.samples.float()
        images = to_pil(decode(pipe, latents))
        part["nfe"] = int(res.nfe)
        part["verifier_calls"] = res.verifier_calls
        part["verifier_scores"] = [float(v) for v in res.scores]
    return images, latents, part


def _sample_blocks(pipe, field, n, budget, seed, blocks, g, settings, run):
    """The n images in ``blocks`` blocks (default: one per rank) shared among the ranks, block k
    from a generator seeded ``block_seed(seed, k)`` with ``budget x n_k // n`` NFE
    (:mod:`guidance.distributed.search`); the images, latents and records gathered on every
    rank in block order."""
    import numpy as np
    from PIL import Image

    from guidance.distributed import all_gather_cat, all_reduce, check_same, check_world
    from guidance.distributed.search import block_seed, split_blocks

    check_world(int(n), "images", g, "start at most --samples processes")
    ranges = split_blocks(n, blocks or g.world)
    check_same({**settings, "blocks": len(ranges)}, "sampling settings", g)
    check_world(len(ranges), "blocks of images", g, "pass --blocks >= the number of processes")
    first, last = split_blocks(len(ranges), g.world)[g.rank]
    pixels, lat, scores = [], [], []
    counts = torch.zeros(3, dtype=torch.long)  # nfe, guided steps, verifier calls
    for k in range(first, last):
        start, stop = ranges[k]
        gen = torch.Generator().manual_seed(block_seed(int(seed), k))
        b_k = None if budget is None else int(budget) * (stop - start) // int(n)
        images, latents, part = _sample_block(
            pipe, field, stop - start, b_k, gen, first=start, **run
        )
        pixels.append(torch.from_numpy(np.stack([np.asarray(im) for im in images])))
        lat.append(latents.float().cpu())
        scores += part.get("verifier_scores", [])
        counts += torch.tensor(
            [part["nfe"], part.get("guided_steps", 0), part.get("verifier_calls", 0)]
        )
    pixels = all_gather_cat(torch.cat(pixels), g, "gathering the images")
    latents = all_gather_cat(torch.cat(lat), g, "gathering the latents")
    counts = all_reduce(counts, "sum", g, "summing the NFE")
    part = {"nfe": int(counts[0])}
    if run["search"] is None:
        part["guided_steps"] = int(counts[1])
    else:
        part["verifier_calls"] = int(counts[2])
        got = all_gather_cat(torch.tensor(scores, dtype=torch.float64), g, "gathering scores")
        part["verifier_scores"] = [float(v) for v in got]
    return [Image.fromarray(p.numpy()) for p in pixels], latents, part


def _write(out: Path, images: list, latents: torch.Tensor, record: dict) -> None:
    """The images, their grid, the latents and the record, each file written atomically."""
    import numpy as np
    from safetensors.torch import save

    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        img.save(buf, format="png")
        write_file_atomic(out / f"image_{i:03d}.png", buf.getvalue())
    pixels = [np.asarray(im.convert("L" if im.mode in ("L", "1", "I", "F") else "RGB"))
              for im in images[:GRID_IMAGES]]  # fmt: skip
    x = torch.from_numpy(np.stack(pixels)).float() / 127.5 - 1
    save_grid_png(x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2), out / "grid.png")
    write_file_atomic(
        out / "latents.safetensors", save({"latents": latents.float().contiguous().cpu()})
    )
    write_file_atomic(out / "record.json", json.dumps(record, indent=1))
    for old in out.glob("image_*.png"):  # an earlier run's images beyond this run's n
        m = re.fullmatch(r"image_(\d{3,})\.png", old.name)
        if m and int(m.group(1)) >= len(images):
            old.unlink(missing_ok=True)
