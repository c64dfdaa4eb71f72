"""``cspace sample``: a local diffusers pipeline, guided by an obstacle set, optionally searched.

::

    cspace sample --pipeline LOCAL_PATH [--prompt TEXT] [--negative-prompt TEXT] [--n N]
                  [--steps S] [--guidance-scale G] [--obstacles SET] [--strength S]
                  [--search best-of-n|zero-order|paths|smc|smc-guided|backtrack --budget NFE]
                  [--seed S] [--out DIR] [--device cpu|cuda]

* Without ``--search``: the pipeline itself, called through
  :func:`guidance.integrations.diffusers.guide` when ``--obstacles`` is given (the field at every
  step, ``--strength``); NFE = steps per image (x2 model passes with classifier-free guidance,
  counted as one step each, as diffusers does).
* With ``--search ALGO --budget NFE``: the pipeline's denoiser as a velocity
  (:class:`guidance.integrations.velocity.DiffusersVelocity`; unconditional UNet pipelines,
  Stable Diffusion 1.x/2.x and SD3), the search algorithm of :mod:`guidance.search` on the total
  budget, the obstacle set's clearance as the verifier, then the pipeline's VAE to decode.

Writes ``DIR/image_XXX.png``, ``DIR/latents.safetensors`` (the final latents, (n, C, H, W)) and
``DIR/record.json`` (pipeline, settings, seed, NFE, the search's verifier scores and calls, and
per image the distance to the nearest obstacle and whether it collided). Nothing is downloaded:
``--pipeline`` must be a folder with ``model_index.json`` (``pipe.save_pretrained(DIR)`` or
``huggingface-cli download REPO --local-dir DIR`` on a machine with network).
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

from cspace.cli.args import nonneg_float, positive_float, positive_int
from cspace.cli.search import ALGOS as SEARCHES

__all__ = ["register"]


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from cspace.io.files import write_file_atomic
    from guidance import RepulsiveField
    from guidance.integrations.diffusers import guide
    from guidance.integrations.pipelines import decode, load_pipeline, pipeline_denoiser, to_pil
    from obstacles import ObstacleSet

    if args.search and args.budget is None:
        raise ValueError("--search needs --budget NFE (the total over all images)")
    if args.search and args.obstacles is None:
        raise ValueError(
            "--search scores candidates by the obstacle set's clearance: pass --obstacles SET"
        )
    pipe = load_pipeline(args.pipeline, args.device)
    field = RepulsiveField(ObstacleSet.load(args.obstacles)) if args.obstacles else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "pipeline": str(args.pipeline),
        "pipeline_class": type(pipe).__name__,
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
    }
    if not args.search:
        params = inspect.signature(pipe.__call__).parameters
        kw = {
            "num_inference_steps": args.steps,
            "generator": torch.Generator().manual_seed(args.seed),
        }
        if "prompt" in params:
            if args.prompt is None:
                raise ValueError(f"{type(pipe).__name__} needs --prompt")
            kw.update(prompt=[args.prompt] * args.n, guidance_scale=args.guidance_scale)
            if args.negative_prompt is not None:
                kw["negative_prompt"] = [args.negative_prompt] * args.n
        else:
            kw["batch_size"] = args.n
        runner = guide(pipe, field, strength=args.strength)  # field None: records only
        result = runner(**kw)
        images = to_pil(result.images)
        latents = runner.stats.last_latents[: args.n]
        record["nfe"] = runner.stats.steps * args.n
        record["guided_steps"] = runner.stats.guided_steps
    else:
        from guidance.integrations.velocity import DiffusersVelocity
        from guidance.search import ALGORITHMS, ClearanceVerifier

        den, shape = pipeline_denoiser(pipe, args.prompt, args.negative_prompt, args.guidance_scale)
        vel = DiffusersVelocity(den, pipe.scheduler)
        algo = ALGORITHMS[args.search]
        kwargs = algo.keywords(field=field)  # the field where the algorithm takes one
        res = algo(
            vel, shape, ClearanceVerifier(field), int(args.budget), n_return=args.n,
            steps=args.steps, generator=torch.Generator().manual_seed(args.seed), **kwargs,
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
    for i, img in enumerate(images):
        img.save(out / f"image_{i:03d}.png")
    from safetensors.torch import save_file

    save_file({"latents": latents.float().contiguous().cpu()}, str(out / "latents.safetensors"))
    write_file_atomic(out / "record.json", json.dumps(record, indent=1))
    print(json.dumps({k: record[k] for k in ("pipeline_class", "nfe")}))
    print(f"{len(images)} images and record.json in {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sample",
        help="sample a local diffusers pipeline, guided by obstacles, optionally searched",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--pipeline", required=True, help="local pipeline folder (model_index.json)")
    p.add_argument("--prompt", default=None)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--n", type=positive_int, default=4, help="images (default 4)")
    p.add_argument("--steps", type=positive_int, default=28, help="denoising steps (default 28)")
    p.add_argument("--guidance-scale", type=positive_float, default=7.0)
    p.add_argument("--obstacles", default=None, help="obstacle set in the pipeline's latent space")
    p.add_argument("--strength", type=nonneg_float, default=1.0, help="field strength (default 1)")
    p.add_argument("--search", choices=SEARCHES, default=None)
    p.add_argument("--budget", type=positive_int, default=None, help="total NFE of the search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="cspace-samples")
    p.set_defaults(func=_cmd_sample)
