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
collided), each file atomically. Nothing is downloaded: ``pipeline`` must be a folder with
``model_index.json``.
"""

from __future__ import annotations

import inspect
import io
import json
import os
from pathlib import Path

import torch

from cspace.io.checks import check_output_folder
from cspace.io.files import write_file_atomic
from cspace.models.devices import resolve_device
from guidance import RepulsiveField
from guidance.integrations.diffusers import check_pipeline_space, guide
from guidance.integrations.pipelines import decode, load_pipeline, pipeline_denoiser, to_pil
from guidance.integrations.velocity import DiffusersVelocity
from guidance.search import ALGORITHMS, ClearanceVerifier
from obstacles import ObstacleSet

__all__ = ["sample_pipeline"]


def sample_pipeline(
    pipeline: str | os.PathLike,
    *,
    obstacles: str | os.PathLike | None = None,
    n: int = 4,
    steps: int = 28,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    guidance_scale: float = 7.0,
    strength: float = 1.0,
    search: str | None = None,
    budget: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    out_dir: str | os.PathLike = "cspace-samples",
    progress: bool = False,
) -> dict:
    """Sample ``n`` images of the local pipeline folder ``pipeline`` (module docstring) into
    ``out_dir``; returns the record (also written to ``out_dir/record.json``). ``progress``:
    the pipeline's own progress bar (diffusers', on stderr) while it samples.

    Raises:
        ValueError: ``search`` without ``budget`` or without ``obstacles``, an unknown
            algorithm, a prompt pipeline without ``prompt``.
        MissingWeightsError: no pipeline at ``pipeline``.
    """
    settings = dict(
        pipeline=str(pipeline), prompt=prompt, negative_prompt=negative_prompt, n=n, steps=steps,
        guidance_scale=guidance_scale, obstacles=None if obstacles is None else str(obstacles),
        strength=strength, search=search, budget=budget, seed=seed, device=device,
        out=str(out_dir),
    )  # fmt: skip
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
    device = str(resolve_device(device))
    check_output_folder(out_dir, "the output folder (--out)")
    pipe = load_pipeline(pipeline, device)
    pipe.set_progress_bar_config(disable=not progress)
    field = RepulsiveField(ObstacleSet.load(obstacles)) if obstacles is not None else None
    check_pipeline_space(pipe, field)  # guide() checks too; a search would not
    record = {"pipeline": str(pipeline), "pipeline_class": type(pipe).__name__}
    record["settings"] = settings
    generator = torch.Generator().manual_seed(int(seed))
    if search is None:
        kw = {"num_inference_steps": steps, "generator": generator}
        if "prompt" in inspect.signature(pipe.__call__).parameters:
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
        record["nfe"] = runner.stats.steps * n
        record["guided_steps"] = runner.stats.guided_steps
    else:
        den, shape = pipeline_denoiser(pipe, prompt, negative_prompt, guidance_scale)
        algo = ALGORITHMS[search]
        res = algo(
            DiffusersVelocity(den, pipe.scheduler), shape, ClearanceVerifier(field), int(budget),
            n_return=n, steps=steps, generator=generator, **algo.keywords(field=field),
        )  # fmt: skip
        latents = res.samples.float()
        images = to_pil(decode(pipe, latents))
        record["nfe"] = int(res.nfe)
        record["verifier_calls"] = res.verifier_calls
        record["verifier_scores"] = [float(v) for v in res.scores]
    if field is not None:
        ev = field.evaluate(latents.float())
        record["per_image"] = [
            {"file": f"image_{i:03d}.png", "nearest_obstacle": float(d), "collided": bool(c)}
            for i, (d, c) in enumerate(zip(ev.nearest.tolist(), ev.collided.tolist(), strict=True))
        ]
    _write(Path(out_dir), images, latents, record)
    return record


def _write(out: Path, images: list, latents: torch.Tensor, record: dict) -> None:
    """The images, the latents and the record, each file written atomically."""
    from safetensors.torch import save

    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        img.save(buf, format="png")
        write_file_atomic(out / f"image_{i:03d}.png", buf.getvalue())
    write_file_atomic(
        out / "latents.safetensors", save({"latents": latents.float().contiguous().cpu()})
    )
    write_file_atomic(out / "record.json", json.dumps(record, indent=1))
