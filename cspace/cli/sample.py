"""``cspace sample``: a local diffusers pipeline, guided by an obstacle set, optionally searched
(:func:`cspace.experiments.pipeline_sampling.sample_pipeline` does the work).

::

    cspace sample --pipeline LOCAL_PATH [--prompt TEXT] [--negative-prompt TEXT]
                  [--class-label C[,C...]] [--n N]
                  [--steps S] [--scheduler pipeline|heun] [--guidance-scale G]
                  [--obstacles SET] [--strength S]
                  [--search best-of-n|zero-order|paths|smc|smc-guided|backtrack --budget NFE]
                  [--seed S] [--out DIR] [--device cpu|cuda]

Without ``--search`` the pipeline runs through ``guide`` (the field at every step); with
``--search ALGO --budget NFE`` its denoiser is searched with the obstacle set's clearance as the
verifier. Writes the images, their ``grid.png``, ``latents.safetensors`` and ``record.json`` to
``--out``. Nothing is downloaded: ``--pipeline`` must be a folder with ``model_index.json``.
"""

from __future__ import annotations

import argparse
import json
import sys

from cspace.cli.args import class_labels, nonneg_float, positive_float, positive_int, seed
from cspace.cli.search import ALGOS as SEARCHES

__all__ = ["register"]


def _cmd_sample(args: argparse.Namespace) -> int:
    from cspace.experiments.pipeline_sampling import GRID_IMAGES, sample_pipeline

    if not args.no_progress:
        what = f"searching with {args.search} on {args.budget} NFE" if args.search else "sampling"
        print(f"cspace sample: {what}: {args.n} images from {args.pipeline}", file=sys.stderr,
              flush=True)  # fmt: skip
    record = sample_pipeline(
        args.pipeline, obstacles=args.obstacles, n=args.n, steps=args.steps, prompt=args.prompt,
        negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale,
        strength=args.strength, search=args.search, budget=args.budget, seed=args.seed,
        device=args.device, out_dir=args.out, progress=not args.no_progress, blocks=args.blocks,
        scheduler=args.scheduler, class_labels=args.class_label,
    )  # fmt: skip
    if "ranks" in record and not _rank0():
        return 0
    print(json.dumps({k: record[k] for k in ("pipeline_class", "nfe")}))
    shown = f"the first {GRID_IMAGES} in " if args.n > GRID_IMAGES else ""
    print(f"{args.n} image{'s' * (args.n != 1)} ({shown}grid.png) and record.json in {args.out}")
    return 0


def _rank0() -> bool:
    from guidance.distributed import current

    return current().rank == 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sample",
        help="sample a local diffusers pipeline, guided by obstacles, optionally searched",
        description="Run a local diffusers pipeline guided by an obstacle set (the field at every "
        "step), or search its denoiser on an NFE budget with the set's clearance as the verifier; "
        "writes the images, the final latents and record.json. Nothing is downloaded.",
    )
    p.add_argument(
        "--pipeline",
        required=True,
        metavar="DIR",
        help="local pipeline folder (with model_index.json; nothing is downloaded)",
    )
    p.add_argument(
        "--prompt", default=None, help="text prompt, for pipelines that take one (SD, SD3)"
    )
    p.add_argument(
        "--negative-prompt",
        default=None,
        help="negative prompt for classifier-free guidance (default: none)",
    )
    p.add_argument(
        "--class-label",
        type=class_labels,
        default=None,
        metavar="C[,C...]",
        help="classes of the images for class-conditional pipelines (DiT), taken in turn: "
        "3 for n images of class 3, 3,7 to alternate (default: none; required by DiT)",
    )
    p.add_argument(
        "--n",
        "--samples",
        dest="n",
        type=positive_int,
        default=4,
        help="images (default 4; under torchrun write --samples: torchrun reads --n as an "
        "abbreviation of its own options)",
    )
    p.add_argument("--steps", type=positive_int, default=28, help="denoising steps (default 28)")
    p.add_argument(
        "--scheduler",
        choices=("pipeline", "heun"),
        default="pipeline",
        help="pipeline: the folder's own scheduler; heun: diffusers' "
        "FlowMatchHeunDiscreteScheduler from the flow-matching scheduler's config, 2 x --steps - 1 "
        "model calls per image, what the shipped Fashion-MNIST pipelines are measured with "
        "(default pipeline)",
    )
    p.add_argument(
        "--guidance-scale",
        type=positive_float,
        default=None,
        help="classifier-free guidance scale of prompt pipelines (7 when not given) and of "
        "class-conditional ones (the pipeline's own when not given: 4 for DiT); 1 turns it off; "
        "refused for unconditional pipelines",
    )
    p.add_argument(
        "--obstacles",
        default=None,
        metavar="SET",
        help="obstacle set in the pipeline's latent space (build it with `cspace obstacles build "
        "IMAGES --encoder DIR`, DIR the pipeline folder)",
    )
    p.add_argument("--strength", type=nonneg_float, default=1.0, help="field strength (default 1)")
    p.add_argument(
        "--search",
        choices=SEARCHES,
        default=None,
        help="search the denoiser with this algorithm on --budget NFE, the set's clearance as the "
        "verifier (default: no search, the guided pipeline)",
    )
    p.add_argument(
        "--budget", type=positive_int, default=None, help="total NFE of the search (all images)"
    )
    p.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--out",
        default="cspace-samples",
        metavar="DIR",
        help="output folder for the images, grid.png, latents.safetensors and record.json "
        "(default cspace-samples)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    p.add_argument(
        "--blocks",
        type=positive_int,
        default=None,
        help="split the images into this many independently seeded blocks; under torchrun the "
        "ranks share them (default: one per rank) and rank 0 writes every file",
    )
    p.set_defaults(func=_cmd_sample)
