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

and the Fashion-MNIST C-space (the self-supervised teacher, then the aligned VAE and its plain
twin; times and figures in ``docs/fashion.md``) with

    OMP_NUM_THREADS=1 cspace train teacher --data fashion --out cspace/weights/fashion_teacher \
        --epochs 6 --seed 0
    OMP_NUM_THREADS=1 cspace train vae --data fashion --out cspace/weights/fashion_vae_aligned \
        --vf-weight 0.1 --teacher fashion --steps 7000 --seed 0 --no-resume
    OMP_NUM_THREADS=1 cspace train vae --data fashion --out cspace/weights/fashion_vae_plain \
        --vf-weight 0 --steps 7000 --seed 0 --no-resume

and the generators in their latents with ``cspace train pipeline`` (the commands and their
settings are in ``docs/fashion.md``, "The generator"). ``--data DIR`` for the judge,
``--data-dir DIR`` for the teacher, the VAEs and the pipelines, when the IDX files are not in
Debian's ``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cspace.cli.args import nonneg_float, positive_int, seed

__all__ = ["register"]

_METRIC_ORDER = (
    "test_accuracy",
    "test_confidence",
    "heldout_accuracy",
    "train_accuracy",
    "heldout_mse",
    "heldout_psnr",
    "test_mse",
    "test_psnr",
    "knn_accuracy",
    "linear_probe_accuracy",
    "heldout_knn_accuracy",
    "heldout_linear_probe_accuracy",
    "test_knn_accuracy",
    "test_linear_probe_accuracy",
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


def _only_with(args: argparse.Namespace, data: str, options: dict[str, str]) -> None:
    """Refuse options that belong to the other data set."""
    for dest, flag in options.items():
        if getattr(args, dest) is not None:
            raise ValueError(
                f"{flag} applies only to --data {data}; got --data {args.data}"
                + ("" if data == "digits" else f" (pass --data {data})")
            )


def _cmd_teacher(args: argparse.Namespace) -> int:
    if args.data == "fashion":
        from cspace.models.simclr import train_fashion_teacher

        _only_with(args, "digits", {"steps": "--steps"})
        report = train_fashion_teacher(
            args.out or "cspace-fashion-teacher",
            data=args.data_dir,
            epochs=args.epochs or 6,
            seed=args.seed,
            batch_size=args.batch_size or 256,
            progress=not args.no_progress,
        )
    else:
        from cspace.models.teachers import train_teacher

        _only_with(
            args,
            "fashion",
            {"epochs": "--epochs", "batch_size": "--batch-size", "data_dir": "--data-dir"},
        )
        report = train_teacher(
            args.out or "cspace-teacher",
            steps=args.steps or 1500,
            seed=args.seed,
            progress=not args.no_progress,
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
    from cspace.models.vae import fashion_vae_config, train_vae

    fashion = args.data == "fashion"
    if not fashion:
        _only_with(args, "fashion", {"data_dir": "--data-dir"})
    report = train_vae(
        args.out or ("cspace-fashion-vae" if fashion else "cspace-vae"),
        vf_weight=args.vf_weight,
        teacher=args.teacher or args.data,
        teacher_weights=args.teacher_weights,
        steps=args.steps or (1000 if fashion else 2000),
        batch_size=args.batch_size,
        seed=args.seed,
        resume=not args.no_resume,
        progress=not args.no_progress,
        cfg=fashion_vae_config() if fashion else None,
        data=args.data,
        data_dir=args.data_dir,
    )
    _print_report(report, args.json)
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from cspace.models.latent_pipeline import train_latent_flow

    ckpt = Path(args.checkpoint) if args.checkpoint else None
    report = train_latent_flow(
        args.out,
        vae=args.vae,
        data=args.data_dir,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress,
        ema=args.ema,
        width=args.width,
        checkpoint=ckpt,
        resume=ckpt if ckpt is not None and ckpt.is_file() else None,
        vae_kind=args.space,
    )
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True, default=str))
    else:
        print(f"{'final_loss':>22}: {report['final_loss']:.4f}")
        print(f"{'wall_s':>22}: {report['wall_s']:.1f}")
        print(f"{'saved to':>22}: {report['out_dir']}")
    return 0


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="with --data fashion: folder of the Fashion-MNIST IDX files, or a torchvision root "
        "(default: Debian's /usr/share/datasets/fashion-mnist)",
    )


def register(subparsers) -> None:
    """Add ``train`` (with ``teacher`` and ``vae``) to an argparse subparsers object."""
    train = subparsers.add_parser(
        "train",
        help="train a teacher, a C-space VAE or the Fashion-MNIST judge (the shipped weights)",
        description="Train the digits teacher (the stand-in for DINOv2 at 8x8) or the "
        "self-supervised Fashion-MNIST teacher, a C-space VAE with or without VA-VAE's VF "
        "alignment loss (on the digits or the Fashion-MNIST train split), or the Fashion-MNIST "
        "judge.",
    )
    what = train.add_subparsers(dest="train_command", metavar="WHAT")
    what.required = True
    from cspace.cli.flow import add_flow_parser

    add_flow_parser(what)

    teacher = what.add_parser(
        "teacher",
        help="train the digits teacher CNN or the self-supervised Fashion-MNIST teacher",
        description="Train the digits teacher (a small CNN, 4x4 patch tokens) on the digits train "
        "split and print its heldout accuracy; or, with --data fashion, the self-supervised "
        "Fashion-MNIST teacher (a small CNN, 7x7 patch tokens, SimCLR's contrastive loss, no "
        "labels) on the Fashion-MNIST train split, and print its kNN and linear-probe accuracy "
        "on held-out images.",
    )
    teacher.add_argument(
        "--data",
        choices=("digits", "fashion"),
        default="digits",
        help="the data set (default digits)",
    )
    teacher.add_argument(
        "--out",
        default=None,
        help="output folder (default cspace-teacher, or cspace-fashion-teacher)",
    )
    teacher.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="training steps (digits only; 1500 when omitted)",
    )
    teacher.add_argument(
        "--epochs", type=positive_int, default=None, help="epochs (fashion only; 6 when omitted)"
    )
    teacher.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="batch size (fashion only; 256 when omitted)",
    )
    _data_dir_option(teacher)
    teacher.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    teacher.add_argument("--no-progress", action="store_true", help="no progress bar")
    teacher.add_argument("--json", action="store_true", help="print the report as JSON")
    teacher.set_defaults(func=_cmd_teacher)

    vae = what.add_parser(
        "vae",
        help="train a C-space VAE (VF-aligned, or plain with --vf-weight 0)",
        description="Train the digits (or, with --data fashion, the Fashion-MNIST) AutoencoderKL "
        "with reconstruction + KL + VF loss (VA-VAE); resumes from OUT/checkpoint when "
        "interrupted. Prints heldout reconstruction MSE and kNN / linear-probe accuracy of the "
        "C-space embeddings.",
    )
    vae.add_argument(
        "--data",
        choices=("digits", "fashion"),
        default="digits",
        help="the data set: digits (8x8, latents 2x4x4) or fashion (28x28, latents 4x7x7) "
        "(default digits)",
    )
    _data_dir_option(vae)
    vae.add_argument(
        "--out", default=None, help="output folder (default cspace-vae, or cspace-fashion-vae)"
    )
    vae.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="training steps (when omitted: 2000 for digits, 1000 for fashion)",
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
        default=None,
        help="'digits' or 'fashion' (the shipped teachers), a teacher folder, or a DINOv2 name "
        "such as vit_large_patch14_dinov2.lvd142m (default: the --data set's teacher)",
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

    pipe = what.add_parser(
        "pipeline",
        help="train the Fashion-MNIST latent flow pipeline (a diffusers folder)",
        description="Train a diffusers UNet2DModel with flow matching on the Fashion-MNIST "
        "train split's latents under the aligned VAE (or its plain twin, --space plain, or your "
        "VAE folder, --vae), and save it with the VAE and a FlowMatchEulerDiscreteScheduler as a "
        "LatentFlowPipeline folder (save_pretrained).",
    )
    pipe.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    pipe.add_argument(
        "--vae",
        default=None,
        metavar="DIR",
        help="VAE folder (default: the shipped Fashion-MNIST VAE that --space names)",
    )
    _data_dir_option(pipe)
    pipe.add_argument(
        "--steps", type=positive_int, default=2000, help="training steps (default 2000)"
    )
    pipe.add_argument(
        "--batch-size", type=positive_int, default=128, help="batch size (default 128)"
    )
    pipe.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    pipe.add_argument(
        "--space",
        choices=("aligned", "plain"),
        default="aligned",
        help="which shipped Fashion-MNIST VAE's latents to train in when --vae is not given "
        "(default aligned; plain: the twin trained without the VF loss)",
    )
    pipe.add_argument(
        "--ema",
        type=float,
        default=0.999,
        help="decay of the weights' moving average that the pipeline keeps (default 0.999; "
        "0 keeps the raw weights)",
    )
    pipe.add_argument(
        "--width",
        type=positive_int,
        default=64,
        help="channels of the UNet's one level (default 64; a multiple of 32 from 32 up, "
        "since its group norm has 32 groups)",
    )
    pipe.add_argument(
        "--checkpoint",
        default=None,
        metavar="FILE",
        help="write a training checkpoint here every 1000 steps (outside --out); if FILE "
        "exists, resume from it (same settings and latents)",
    )
    pipe.add_argument("--no-progress", action="store_true", help="no progress bar")
    pipe.add_argument("--json", action="store_true", help="print the report as JSON")
    pipe.set_defaults(func=_cmd_pipeline)

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
