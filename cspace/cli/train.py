"""``cspace train teacher``, ``cspace train vae`` and ``cspace train judge``: train the digits
teacher, the C-space VAEs and the Fashion-MNIST judge.

The shipped weights were made with exactly these commands (from the repository root; each is
deterministic for its seed, and budgeted in steps, not seconds):

    cspace train teacher --out cspace/weights/teacher --steps 1500 --seed 0
    cspace train vae --out cspace/weights/vae_aligned --vf-weight 0.1 --teacher digits \\
        --steps 2000 --seed 0 --no-resume
    cspace train vae --out cspace/weights/vae_plain --vf-weight 0 \\
        --steps 2000 --seed 0 --no-resume

The aligned VAE depends on the teacher, so train the teacher first. ``train vae`` writes a
checkpoint every 250 steps under ``OUT/checkpoint/``; run the same command again to resume an
interrupted run (``--no-resume`` starts over). With a DINOv2 teacher
(``--teacher vit_large_patch14_dinov2.lvd142m --teacher-weights model.safetensors``) the teacher's
16x16 token grid (224 px input) is resampled to the VAE's 4x4 latent grid.

The shipped Fashion-MNIST judge (``cspace/weights/fashion_judge``; its time and figures are in
``docs/fashion.md``) was made on one thread with

    OMP_NUM_THREADS=1 cspace train judge --out cspace/weights/fashion_judge --epochs 8 --seed 0

(``--data DIR`` when the IDX files are not in Debian's ``/usr/share/datasets/fashion-mnist``).
"""

from __future__ import annotations

import argparse
import json

from cspace.cli.args import nonneg_float, positive_int, seed

__all__ = ["register"]

_METRIC_ORDER = (
    "test_accuracy",
    "test_confidence",
    "heldout_accuracy",
    "train_accuracy",
    "heldout_mse",
    "knn_accuracy",
    "linear_probe_accuracy",
    "scaling_factor",
    "shift_factor",
    "steps_run",
    "wall_s",
)


def _print_report(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=1, sort_keys=True, default=str))
        return
    for key in _METRIC_ORDER:
        if key in report:
            val = report[key]
            print(f"{key:>22}: {val:.4f}" if isinstance(val, float) else f"{key:>22}: {val}")
    print(f"{'saved to':>22}: {report['out_dir']}")


def _cmd_teacher(args: argparse.Namespace) -> int:
    from cspace.models.teachers import train_teacher

    report = train_teacher(
        args.out, steps=args.steps, seed=args.seed, progress=not args.no_progress
    )
    _print_report(report, args.json)
    return 0


def _cmd_judge(args: argparse.Namespace) -> int:
    from cspace.models.fashion_judge import train_fashion_judge

    report = train_fashion_judge(
        args.out,
        data=args.data,
        epochs=args.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    _print_report(report, args.json)
    return 0


def _cmd_vae(args: argparse.Namespace) -> int:
    from cspace.models.vae import train_vae

    report = train_vae(
        args.out,
        vf_weight=args.vf_weight,
        teacher=args.teacher,
        teacher_weights=args.teacher_weights,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        resume=not args.no_resume,
        progress=not args.no_progress,
    )
    _print_report(report, args.json)
    return 0


def register(subparsers) -> None:
    """Add ``train`` (with ``teacher`` and ``vae``) to an argparse subparsers object."""
    train = subparsers.add_parser(
        "train",
        help="train the digits teacher, a C-space VAE or the Fashion-MNIST judge (the shipped "
        "weights)",
        description="Train the digits teacher (the stand-in for DINOv2 at 8x8), the C-space VAE "
        "with or without VA-VAE's VF alignment loss (on the digits train split), or the "
        "Fashion-MNIST judge.",
    )
    what = train.add_subparsers(dest="train_command", metavar="WHAT")
    what.required = True
    from cspace.cli.flow import add_flow_parser

    add_flow_parser(what)

    teacher = what.add_parser(
        "teacher",
        help="train the digits teacher CNN",
        description="Train the digits teacher (a small CNN, 4x4 patch tokens) on the digits train "
        "split; prints its heldout accuracy.",
    )
    teacher.add_argument(
        "--out", default="cspace-teacher", help="output folder (default cspace-teacher)"
    )
    teacher.add_argument(
        "--steps", type=positive_int, default=1500, help="training steps (default 1500)"
    )
    teacher.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    teacher.add_argument("--no-progress", action="store_true", help="no progress bar")
    teacher.add_argument("--json", action="store_true", help="print the report as JSON")
    teacher.set_defaults(func=_cmd_teacher)

    vae = what.add_parser(
        "vae",
        help="train a C-space VAE (VF-aligned, or plain with --vf-weight 0)",
        description="Train the digits AutoencoderKL with reconstruction + KL + VF loss "
        "(VA-VAE); resumes from OUT/checkpoint when interrupted. Prints heldout reconstruction "
        "MSE and kNN / linear-probe accuracy of the C-space embeddings.",
    )
    vae.add_argument("--out", default="cspace-vae", help="output folder (default cspace-vae)")
    vae.add_argument(
        "--steps", type=positive_int, default=2000, help="training steps (default 2000)"
    )
    vae.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    vae.add_argument("--batch-size", type=positive_int, default=64, help="batch size (default 64)")
    vae.add_argument(
        "--vf-weight",
        type=nonneg_float,
        default=0.1,
        help="VF loss weight times the adaptive factor (default 0.1; 0: plain VAE)",
    )
    vae.add_argument(
        "--teacher",
        default="digits",
        help="'digits' (shipped teacher), a teacher folder, or a DINOv2 name such as "
        "vit_large_patch14_dinov2.lvd142m (default digits)",
    )
    vae.add_argument(
        "--teacher-weights",
        default=None,
        metavar="PATH",
        help="local model.safetensors of a DINOv2 teacher (nothing is downloaded)",
    )
    vae.add_argument(
        "--no-resume", action="store_true", help="start over instead of resuming a checkpoint"
    )
    vae.add_argument("--no-progress", action="store_true", help="no progress bar")
    vae.add_argument("--json", action="store_true", help="print the report as JSON")
    vae.set_defaults(func=_cmd_vae)

    judge = what.add_parser(
        "judge",
        help="train the Fashion-MNIST judge CNN",
        description="Train the independent Fashion-MNIST judge (a small CNN, never used for "
        "guidance) on the full train split; prints its accuracy on the full test split and on "
        "the shipped held-out slice. Needs the IDX files: Debian's dataset-fashion-mnist, "
        "--data DIR, or --data ROOT of a torchvision download.",
    )
    judge.add_argument("--out", default="cspace-judge", help="output folder (default cspace-judge)")
    judge.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="folder of the Fashion-MNIST IDX files, or a torchvision root (default: Debian's "
        "/usr/share/datasets/fashion-mnist)",
    )
    judge.add_argument("--epochs", type=positive_int, default=8, help="epochs (default 8)")
    judge.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    judge.add_argument(
        "--batch-size", type=positive_int, default=128, help="batch size (default 128)"
    )
    judge.add_argument("--no-progress", action="store_true", help="no progress bar")
    judge.add_argument("--json", action="store_true", help="print the report as JSON")
    judge.set_defaults(func=_cmd_judge)
