"""The Fashion-MNIST latent flow pipeline judged by the independent judge.

    python benchmarks/fashion_generator.py PIPELINE_DIR --n 2000 --steps 20 \\
        --out benchmarks/results/fashion_generator.json --grid docs/fashion_generator_samples.png

Samples ``--n`` images (``--seed``, default 0) and reports the judge's class shares (and their largest
distance from uniform, 10%), its mean confidence beside that on the 2,000 real held-out images,
and the Frechet distance between the judge's penultimate features (128-d) of the samples and of
the held-out images, beside the same distance between 2,000 train images and the held-out ones
(needs the IDX files for that reference; skipped without them). ``reconstructions``: the same
figures for the pipeline VAE's reconstructions of the held-out images (posterior means
decoded): what a perfect generator in this latent space would score, the decoder's ceiling.

``--method M`` (one of ``guidance.METHODS``: ``euler``, ``heun``, ``sde``, ...) samples with
``guidance.sample`` instead of the pipeline's own Euler loop, the UNet as the velocity
(``DiffusersVelocity``), ``--steps`` steps of that method from the same noises; ``heun`` costs two
NFE per step, the others one.

    python benchmarks/fashion_generator.py --vae VAE_DIR [--out FILE]

reports that ceiling alone for an aligned-VAE folder (``cspace train vae --data fashion``), as
the first check of a retrained VAE before a generator is trained in its latents.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa Sb)^(1/2))`` of two feature sets (n, d).

    ``tr (Sa Sb)^(1/2)`` is the sum of the square roots of the eigenvalues of ``Sa Sb``, which
    are real and >= 0 for covariances (``Sa Sb`` is similar to ``Sa^(1/2) Sb Sa^(1/2)``); this
    needs no matrix square root, so a singular covariance (a ReLU feature that is always 0)
    gives no warning. Rounding can leave eigenvalues a little below 0 or complex: real parts
    clipped at 0."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_trace = np.sqrt(np.clip(np.linalg.eigvals(sa @ sb).real, 0.0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * root_trace)


def reconstructions(enc, judge, xh: torch.Tensor) -> dict:
    """The judge's figures on ``enc``'s reconstructions of the held-out images ``xh`` (posterior
    means decoded): class shares, their largest gap from 10%, confidence, Frechet distance."""
    from cspace.models.data import FASHION_CLASSES

    with torch.no_grad():
        rec = enc.decode(enc.encode(xh, batch_size=500), batch_size=500)
    ceiling = judge.report(rec)
    return {
        "class_shares": dict(zip(FASHION_CLASSES, ceiling["class_shares"], strict=True)),
        "max_share_gap_from_uniform": max(abs(s - 0.1) for s in ceiling["class_shares"]),
        "confidence": ceiling["confidence"],
        "frechet_vs_heldout": frechet(judge.embed(rec).numpy(), judge.embed(xh).numpy()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pipeline", nargs="?", help="a LatentFlowPipeline folder")
    ap.add_argument("--vae", default=None, help="instead: an aligned-VAE folder, its ceiling only")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument(
        "--method",
        default=None,
        help="sample with guidance.sample and this method (euler, heun, sde, ...) instead of the "
        "pipeline's own Euler loop",
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="seed of the noises (and the SDE's noise); default 0"
    )
    ap.add_argument(
        "--scheduler",
        choices=("euler", "heun"),
        default="euler",
        help="without --method: the pipeline's own loop with its FlowMatchEulerDiscreteScheduler "
        "(euler, default) or diffusers' FlowMatchHeunDiscreteScheduler made from its config "
        "(heun: 2 --steps - 1 NFE)",
    )
    ap.add_argument("--out", default=None, help="write the figures here as JSON (atomically)")
    ap.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="folder of the Fashion-MNIST IDX files, for the train-vs-held-out reference distance "
        "(default: Debian's /usr/share/datasets/fashion-mnist; without the files the reference "
        "is left out, with a note)",
    )
    ap.add_argument("--grid", default=None, help="write a 10x10 PNG grid of samples here")
    args = ap.parse_args()
    if (args.pipeline is None) == (args.vae is None):
        ap.error("give a pipeline folder or --vae VAE_DIR (one of the two)")
    torch.set_num_threads(1)
    from cspace.io.files import write_json_atomic
    from cspace.models.data import FASHION_CLASSES, fashion_heldout, fashion_mnist
    from cspace.models.encoders import Encoder
    from cspace.models.fashion_judge import default_fashion_judge
    from cspace.models.latent_pipeline import load_latent_pipeline

    if args.vae is not None:
        judge = default_fashion_judge()
        xh, _ = fashion_heldout()
        res = {"vae": args.vae, "reconstructions": reconstructions(
            Encoder.from_aligned(args.vae), judge, xh
        )}  # fmt: skip
        res["heldout_confidence"] = judge.report(xh)["confidence"]
        print(json.dumps(res, indent=1))
        if args.out:
            write_json_atomic(args.out, res)
        return
    pipe = load_latent_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    judge = default_fashion_judge()
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed)
    if args.method is None:
        if args.scheduler == "heun":
            from guidance.integrations.pipelines import heun_scheduler

            pipe.scheduler = heun_scheduler(pipe.scheduler)
        imgs = torch.cat(
            [
                pipe(
                    batch_size=min(500, args.n - s), num_inference_steps=args.steps, generator=g
                ).images
                for s in range(0, args.n, 500)
            ]
        )
    else:
        from guidance import sample
        from guidance.integrations.velocity import DiffusersVelocity, unconditional

        velocity = DiffusersVelocity(unconditional(pipe.unet.eval()), pipe.scheduler)
        vc, uc = pipe.vae.config, pipe.unet.config
        shape = (uc.in_channels, uc.sample_size, uc.sample_size)
        parts = []
        with torch.no_grad():
            for s in range(0, args.n, 500):
                noise = torch.randn(min(500, args.n - s), *shape, generator=g)
                z = sample(velocity, noise, steps=args.steps, method=args.method, generator=g,
                           progress=False).samples  # fmt: skip
                x = pipe.vae.decode(z / vc.scaling_factor + vc.shift_factor).sample
                parts.append((x.clamp(-1, 1) + 1) / 2)
        imgs = torch.cat(parts)
    x = imgs * 2 - 1  # [0, 1] -> [-1, 1]
    sample_s = time.perf_counter() - t0
    rep = judge.report(x)
    xh, _ = fashion_heldout()
    real = judge.report(xh)
    res = {
        "n": args.n,
        "steps": args.steps,
        "method": args.method or f"pipeline ({args.scheduler})",
        "seed": args.seed,
        "sample_s": round(sample_s, 1),
        "class_shares": dict(zip(FASHION_CLASSES, rep["class_shares"], strict=True)),
        "max_share_gap_from_uniform": max(abs(s - 0.1) for s in rep["class_shares"]),
        "confidence": rep["confidence"],
        "heldout_confidence": real["confidence"],
        "frechet_samples_vs_heldout": frechet(judge.embed(x).numpy(), judge.embed(xh).numpy()),
    }
    # the decoder's ceiling: the judge on the VAE's reconstructions of the held-out images
    # (posterior means decoded), which a perfect generator in this latent space would match
    enc = Encoder(pipe.vae, pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor)
    res["reconstructions"] = reconstructions(enc, judge, xh)
    res["heldout_max_share_gap_from_uniform"] = max(abs(s - 0.1) for s in real["class_shares"])
    try:
        xt, _ = fashion_mnist("train", args.data_dir)
        idx = torch.randperm(len(xt), generator=torch.Generator().manual_seed(0))[:2000]
        res["frechet_train_vs_heldout"] = frechet(
            judge.embed(xt[idx]).numpy(), judge.embed(xh).numpy()
        )
    except FileNotFoundError as e:
        print(f"note: no train-vs-held-out reference distance ({e})", file=sys.stderr)
    print(json.dumps(res, indent=1))
    if args.out:
        write_json_atomic(args.out, res)
    if args.grid:
        from PIL import Image
        from torchvision.utils import make_grid

        grid = make_grid(imgs[:100], nrow=10, padding=1, pad_value=1.0)
        arr = (grid[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.NEAREST).save(
            args.grid, optimize=True
        )


if __name__ == "__main__":
    main()
