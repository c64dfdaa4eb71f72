"""``cspace train flow``: train a latent flow-matching model on the digits *train* split.

:func:`add_flow_parser` adds the ``flow`` subcommand to an existing ``train`` subparsers object::

    cspace train flow [--encoder digits|digits-plain|PATH] [--out DIR] [--steps N] [--seed S]
                      [--batch-size B] [--lr LR] [--checkpoint FILE] [--threads 1] [--no-eval]
                      [--json] [--quiet]

It encodes the digits train split with the chosen VAE, trains a :class:`cspace.models.flow.VelocityNet`
by flow matching, evaluates 1,000 samples with the pixel-space judge (quality, class balance,
diversity, copy rate, beside real held-out digits) and saves ``manifest.json`` +
``model.safetensors`` (metrics and the C-space inside ``manifest.json``; see
:mod:`cspace.io.folder`).

The shipped weights are reproduced, from the repository root, by (same settings and seed for
both C-spaces; the VAEs ``cspace/weights/vae_aligned`` and ``vae_plain`` must exist)::

    cspace train flow --encoder digits --out cspace/weights/flow_aligned --steps 6000 --seed 0
    cspace train flow --encoder digits-plain --out cspace/weights/flow_plain --steps 6000 --seed 0

(6000 steps and seed 0 are the defaults; without ``--out`` the flow goes to
``cspace-flow-digits`` or ``cspace-flow-digits-plain`` in the working folder, never into the
installed package.) Without the ``cspace`` entry point wired, the same from
Python: ``cspace.experiments.flow_training.train_flow_for_encoder(Encoder.from_aligned(), "cspace/weights/
flow_aligned", steps=6000, seed=0, encoder_name="vae_aligned")``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cspace.cli.args import positive_float, positive_int, seed

__all__ = ["DEFAULT_SEED", "DEFAULT_STEPS", "add_flow_parser"]

DEFAULT_STEPS = 6000
DEFAULT_SEED = 0


def _format(meta: dict, out: Path) -> str:
    tr = meta["training"]
    lines = [
        f"flow saved to {out} (encoder {meta['encoder']}, latents {tuple(meta['latent_shape'])}, "
        f"{tr['parameters']:,} parameters)",
        f"training: {tr['steps']} steps, batch {tr['batch_size']}, seed {tr['seed']}, "
        f"{tr['wall_s']:.0f} s; loss train {tr['train_loss']:.4f}, heldout "
        f"{tr['heldout_loss']:.4f}",
    ]
    ev = meta.get("evaluation")
    if ev:
        lines.append(
            f"evaluation: {ev['n']} samples, Euler {ev['steps']} steps; judge held-out accuracy "
            f"{100 * ev['judge_heldout_accuracy']:.1f}%, copy threshold {ev['copy_threshold']:.3f}"
        )
        lines.append(
            f"{'images':<15}{'p>0.9':>8}{'conf':>8}{'max |share-0.1|':>17}{'diversity':>11}"
            f"{'copies':>8}{'NN-train':>10}"
        )
        for key in ("samples", "reconstructed", "heldout"):
            r = ev[key]
            lines.append(
                f"{key:<15}{100 * r['confident_share']:>7.1f}%{100 * r['confidence']:>7.1f}%"
                f"{r['class_share_max_dev']:>17.3f}{r['diversity']:>11.3f}"
                f"{100 * r['copy_rate']:>7.1f}%{r['median_nearest_train']:>10.3f}"
            )
    return "\n".join(lines)


def _cmd_train_flow(args: argparse.Namespace) -> int:
    from cspace.experiments.flow_training import resolve_flow_encoder, train_flow_for_encoder

    encoder, name, out = resolve_flow_encoder(args.encoder, args.out)
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    meta = train_flow_for_encoder(
        encoder,
        out,
        steps=args.steps,
        seed=args.seed,
        encoder_name=name,
        batch_size=args.batch_size,
        lr=args.lr,
        evaluate=not args.no_eval,
        progress=not args.quiet,
        checkpoint=ckpt,
        resume=ckpt if ckpt is not None and ckpt.is_file() else None,
        threads=args.threads,
    )
    if args.json:
        print(json.dumps(meta, indent=1))
    else:
        print(_format(meta, out))
        print(
            f"use it from Python: cspace.models.flow.load_flow({str(out)!r}) is a velocity for "
            "guidance.sample (the commands use the shipped flows in cspace/weights/; pass "
            "--out cspace/weights/flow_aligned to replace the aligned one)"
        )
    return 0


def add_flow_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``flow`` to the ``train`` subparsers object ``subparsers``; returns its parser."""
    p = subparsers.add_parser(
        "flow",
        help="train a latent flow-matching model on the digits train split",
        description="Encode the digits train split with a VAE, train a flow-matching velocity "
        "model on the latents, judge 1,000 samples against real held-out digits, and save "
        "manifest.json + model.safetensors.",
    )
    p.add_argument(
        "--encoder",
        default="digits",
        metavar="digits|digits-plain|PATH",
        help="the C-space: the aligned digits VAE (digits), the same VAE without the "
        "alignment loss (digits-plain), or a cspace aligned VAE folder (default digits)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default: cspace-flow-digits or cspace-flow-digits-plain in the working "
        "folder; required for a PATH); the shipped flows in cspace/weights/ change only when "
        "--out names them",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=DEFAULT_STEPS,
        help=f"training steps (default {DEFAULT_STEPS})",
    )
    p.add_argument("--seed", type=seed, default=DEFAULT_SEED, help="random seed (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="batch (default 256)")
    p.add_argument(
        "--lr", type=positive_float, default=1e-3, help="peak AdamW learning rate (default 1e-3)"
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        metavar="FILE",
        help="write a training checkpoint here every 1000 steps; if FILE exists, resume from it",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads while training (default 1); one thread is the fastest for this small "
        "model, and the setting the shipped weights were trained with",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the sample evaluation")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train_flow)
    return p
