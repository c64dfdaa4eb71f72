"""``cspace obstacles``: build obstacle sets from images, inspect them, train preference classifiers.

Subcommands::

    cspace obstacles build IMAGES_OR_DIRS... --out SET [--label L] [--q-star auto|FLOAT]
                           [--eta F] [--radius F] [--encoder digits|digits-plain|fashion|fashion-plain|PATH]
                           [--size N|HxW] [--resize] [--append | --overwrite]
    cspace obstacles info PATH [--json]            (an obstacle set or a classifier folder)
    cspace obstacles classifier --good DIR... --bad DIR... --out DIR [--encoder ...]
    cspace obstacles classifier --unlabelled DIR... --bad DIR... --out DIR   (positive-unlabelled)
                           [--threshold 0.5] [--q-star auto|FLOAT] [--eta F] [--C 1] [--holdout 0.25]

The image size is the encoder's own (its config's ``sample_size``: 8 x 8 for the digits VAEs)
unless ``--size`` says otherwise (refused for the digits VAEs, which take 8 x 8 only); images of
another size are refused with both sizes named, or resized with ``--resize`` (said in a note).
``build`` prints the demo's parameters for the same images beside its own defaults (the demo
uses Q* = 1.5 x auto and radius = auto; the command's defaults are Q* = auto, radius = 0.5 x Q*).

Every failure raises a ``ValueError`` subclass or an ``OSError``, which ``cspace.cli.main``
prints as ``cspace obstacles: error: <message>`` with exit code 2. Image input is all-or-nothing: every file
is checked before anything is encoded, and nothing is written unless everything succeeded.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

from cspace.cli.args import positive_int, seed

__all__ = ["register"]


class ObstaclesCommandError(ValueError):
    """A bad ``cspace obstacles`` invocation (the message says what to change)."""


# ---------------------------------------------------------------------- value parsing
def _number(text, flag: str, *, strict: bool) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise ObstaclesCommandError(f"{flag} expects a number; got {text!r}") from None
    ok = v > 0 if strict else v >= 0
    if not (math.isfinite(v) and ok):
        raise ObstaclesCommandError(
            f"{flag} must be a finite number {'> 0' if strict else '>= 0'}; got {text!r}"
        )
    return v


def _q_star(text) -> float | str:
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return _number(text, "--q-star", strict=True)
    except ObstaclesCommandError:
        raise ObstaclesCommandError(
            f"--q-star must be 'auto' or a finite number > 0; got {text!r}"
        ) from None


def _size(text) -> tuple[int, int]:
    parts = str(text).lower().split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) not in (1, 2) or min(vals, default=0) < 1:
        raise ObstaclesCommandError(f"--size expects N or HxW with positive integers; got {text!r}")
    return (vals[0], vals[-1])


def _check_out(out: Path, marker, kind: str) -> bool:
    """Whether ``out`` already holds a ``kind``; refuses anything that would be clobbered."""
    if not out.exists():
        from cspace.io.checks import check_output_folder

        check_output_folder(out, "--out")  # a folder under a file, no permission: now
        return False
    if not out.is_dir():
        raise ObstaclesCommandError(f"--out {out} exists and is not a folder; choose another --out")
    if marker(out):
        return True
    if any(out.iterdir()):
        raise ObstaclesCommandError(
            f"--out {out} is a non-empty folder that is not {kind}; refusing to overwrite it"
        )
    return False


def _stats(values) -> dict | None:
    """``{"min", "median", "max"}`` of ``values`` as numbers (None when there are none)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return None
    return {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}


def _range(values) -> str:
    """``values`` (or their :func:`_stats`) as ``lo .. hi``, one number when they are equal."""
    st = values if isinstance(values, dict) or values is None else _stats(values)
    if st is None:
        return "-"
    lo, hi = st["min"], st["max"]
    return f"{lo:.4g}" if lo == hi else f"{lo:.4g} .. {hi:.4g}"


def _encoder_on(spec: str, device: str):
    from cspace.models.devices import resolve_device
    from cspace.models.encoders import load_encoder

    try:
        dev = resolve_device(device)
    except ValueError as err:
        raise ObstaclesCommandError(str(err)) from err
    try:
        enc = load_encoder(spec)
    except ValueError as err:
        raise ObstaclesCommandError(str(err)) from err
    try:
        enc.vae.to(dev)
    except (RuntimeError, AssertionError) as err:
        raise ObstaclesCommandError(f"--device {device!r} cannot be used: {err}") from err
    return enc


# ---------------------------------------------------------------------- commands
def _cmd_build(args: argparse.Namespace) -> int:
    from obstacles import ObstacleSet
    from obstacles.from_images import add_images, build_from_images, image_size_for
    from obstacles.obstacle_set import is_obstacle_set

    q_star = _q_star(args.q_star)
    eta = _number(args.eta, "--eta", strict=False)
    radius = None if args.radius is None else _number(args.radius, "--radius", strict=False)
    size = None if args.size is None else _size(args.size)
    out = Path(args.out)
    exists = _check_out(out, is_obstacle_set, "an obstacle set")
    if exists and not (args.append or args.overwrite):
        raise ObstaclesCommandError(
            f"{out} already holds an obstacle set; pass --append to add these images to it or "
            "--overwrite to replace it"
        )
    if args.append and not exists:
        raise ObstaclesCommandError(f"--append: {out} is not an obstacle set yet; drop --append")
    sharded = args.shard_size is not None or args.keep_sharded is not None or _launched()
    if sharded:
        _join()  # before the encoder: under NCCL this selects the rank's GPU (LOCAL_RANK)
    encoder = _encoder_on(args.encoder, args.device)
    size, size_note = image_size_for(encoder, size)
    kw = dict(q_star=q_star, eta=eta, radius=radius, label=args.label, size=size)
    kw.update(resize=args.resize)
    if sharded:  # rank 0 reports each shard
        return _build_sharded(args, encoder, out, kw)
    kw.update(progress=not args.no_progress)
    adopted = False
    if args.append:
        oset = ObstacleSet.load(out)
        adopted = oset.space is None  # a set saved before spaces: it takes this encoder's
        added = len(add_images(oset, args.inputs, encoder, batch_size=args.batch_size, **kw))
    else:
        oset = build_from_images(args.inputs, encoder, batch_size=args.batch_size, **kw)
        added = len(oset)
    oset.save(out)
    new = slice(len(oset) - added, len(oset))  # added obstacles come last
    print(f"added {added} obstacles ({len(oset)} in the set), d={oset.dim}")
    print(f"encoder: {args.encoder} ({encoder.name}), images {size[1]}x{size[0]}")
    if size_note:
        print(f"note: {size_note}")
    if adopted and oset.space is not None:
        print(
            f"note: {out} recorded no C-space (saved before spaces were recorded); it now "
            f"records this encoder's: {oset.space.describe()}"
        )
    print(f"q_star: {_range(oset.q_star[new])}{' (auto)' if q_star == 'auto' else ''}")
    half = " (0.5 x Q*)" if radius is None else ""
    print(f"eta: {_range(oset.eta[new])}, radius: {_range(oset.radius[new])}{half}")
    if q_star == "auto" and added:
        from cspace.experiments.demo import DemoSettings

        d = DemoSettings()
        auto = float(oset.q_star[new][0])
        q_demo, r_demo = d.q_star_scale * auto, d.radius_scale * auto
        print(
            f"the demo's parameters for these images: Q* = {d.q_star_scale:g} x auto = "
            f"{q_demo:.4g}, radius = {'' if d.radius_scale == 1 else f'{d.radius_scale:g} x '}"
            f"auto = {r_demo:.4g}, strength {d.strength:g} (to build the same: --q-star "
            f"{q_demo:.6g} --radius {r_demo:.6g})"
        )
    print(f"saved: {out}")
    return 0


def _launched() -> bool:
    from guidance.distributed import launched

    return launched()


def _join() -> None:
    from guidance.distributed import init_from_env

    init_from_env()


def _build_sharded(args: argparse.Namespace, encoder, out: Path, kw: dict) -> int:
    from cspace.experiments.sharded_build import build_sharded

    if args.append:
        raise ObstaclesCommandError(
            "--append cannot be combined with a sharded build (torchrun, --shard-size, "
            "--keep-sharded): build a new set"
        )
    rep = build_sharded(
        args.inputs, encoder, out, batch_size=args.batch_size,
        shard_size=args.shard_size or 4096, keep_sharded=args.keep_sharded,
        log=lambda m: print(m, flush=True), **kw,
    )  # fmt: skip
    if "count" not in rep:  # not rank 0
        return 0
    print(
        f"built {rep['count']} obstacles, d={rep['dim']}, from {rep['shards']} shards on "
        f"{rep['ranks']} processes ({rep['skipped']} shards of rank 0 finished before)"
    )
    print(f"embeddings sha256: {rep['embeddings_sha256']}")
    print(f"q_star: {rep['q_star_min']:.4g} .. {rep['q_star_max']:.4g}")
    kept = f" ({args.keep_sharded} shards)" if args.keep_sharded else ""
    print(f"saved: {out}{kept} in {rep['seconds']:.1f} s")
    return 0


def _describe_space(space) -> str:
    if space is None:
        return (
            "unknown (saved before C-spaces were recorded: it is accepted with every encoder; "
            "see cspace.models.space)"
        )
    return space.describe()


def _set_summary(path: Path) -> dict:
    from obstacles import ObstacleSet

    oset = ObstacleSet.load(path)
    manifest = json.loads((path / "manifest.json").read_text())
    return {
        "kind": "obstacle set",
        "path": str(path),
        "format": manifest["format"],
        "format_version": manifest["format_version"],
        "dim": oset.dim,
        "count": len(oset),
        "labels": dict(sorted(Counter(oset.labels).items())),
        "q_star": _stats(oset.q_star),
        "eta": _stats(oset.eta),
        "radius": _stats(oset.radius),
        "history": len(oset.history),
        "space": None if oset.space is None else oset.space.to_json(),
        "space_description": _describe_space(oset.space),
    }


def _classifier_summary(path: Path) -> dict:
    from obstacles.classifier import PreferenceClassifier

    clf = PreferenceClassifier.load(path)
    manifest = json.loads((path / "manifest.json").read_text())
    return {
        "kind": "classifier",
        "path": str(path),
        "format": manifest["format"],
        "format_version": manifest["format_version"],
        "dim": clf.dim,
        "threshold": clf.threshold,
        "q_star": clf.q_star,
        "eta": clf.eta,
        "heldout_accuracy": clf.accuracy,
        "train_accuracy": clf.train_accuracy,
        "counts": clf.info.get("counts"),
        "positive_unlabelled": "unlabelled" in (clf.info.get("counts") or {}),
        "c": clf.info.get("c"),
        "example_recall": clf.info.get("example_recall"),
        "encoder": clf.info.get("encoder"),
        "space": None if clf.space is None else clf.space.to_json(),
        "space_description": _describe_space(clf.space),
    }


def _cmd_info(args: argparse.Namespace) -> int:
    from obstacles.classifier import is_classifier_folder
    from obstacles.obstacle_set import is_obstacle_set

    path = Path(args.path)
    if not path.exists():
        raise ObstaclesCommandError(f"{path} does not exist")
    if is_obstacle_set(path):
        info = _set_summary(path)
    elif is_classifier_folder(path):
        info = _classifier_summary(path)
    else:
        raise ObstaclesCommandError(
            f"{path} is neither an obstacle set nor a classifier (no manifest.json with a cspace "
            "format); build one with `cspace obstacles build` or `cspace obstacles classifier`"
        )
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{info['kind']}: {info['path']}")
    print(f"format: {info['format']} v{info['format_version']}")
    print(f"d: {info['dim']}")
    print(f"space: {info['space_description']}")
    if info["kind"] == "obstacle set":
        print(f"count: {info['count']}")
        labels = ", ".join(f"{k or '(none)'}: {v}" for k, v in info["labels"].items())
        print(f"labels: {labels or '-'}")
        print(f"q_star: {_range(info['q_star'])}")
        print(f"eta: {_range(info['eta'])}")
        print(f"radius: {_range(info['radius'])}")
        print(f"history: {info['history']} entries")
    else:
        acc = info["heldout_accuracy"]
        counts = info["counts"] or {}
        print(f"threshold: {info['threshold']:.6g}")
        print(f"q_star: {info['q_star']:.4g}")
        print(f"eta: {info['eta']:.4g}")
        if info["positive_unlabelled"]:
            print(
                f"positive-unlabelled: {counts.get('examples')} bad and {counts.get('unlabelled')} "
                f"unlabelled images; Elkan and Noto's c = {info['c']:.3f}, threshold c / 2; bad "
                f"examples inside out of fold: {100 * info['example_recall']:.1f}%"
            )
        else:
            print(f"held-out accuracy: {'n/a' if acc is None else f'{acc:.3f}'}")
            if counts:
                print(f"examples: {counts.get('good')} good, {counts.get('bad')} bad")
        if info["encoder"]:
            print(f"encoder: {info['encoder']}")
    return 0


def _cmd_classifier(args: argparse.Namespace) -> int:
    from obstacles.classifier import is_classifier_folder
    from obstacles.from_images import classifier_from_images, image_size_for

    pu = args.unlabelled is not None
    if pu == (args.good is not None):
        raise ObstaclesCommandError(
            "give --good DIR... (wanted images) or --unlabelled DIR... (unlabelled images, say "
            "the model's own samples: positive-unlabelled), one of the two"
        )
    if pu and args.threshold is not None:
        raise ObstaclesCommandError(
            "--threshold does not apply with --unlabelled: the threshold is c / 2, c Elkan and "
            "Noto's constant measured on the images; drop it"
        )
    if pu and args.holdout is not None:
        raise ObstaclesCommandError(
            "--holdout does not apply with --unlabelled: there are no labelled good images to "
            "hold out (c is measured out of fold instead, --folds); drop it"
        )
    if args.folds is not None and args.folds < 2:
        raise ObstaclesCommandError(f"--folds must be at least 2; got {args.folds}")
    q_star = _q_star(args.q_star)
    eta = _number(args.eta, "--eta", strict=False)
    # --unlabelled without --C: fit_positive_unlabelled's default, PU_CN / n
    c = _number(args.C, "--C", strict=True) if args.C is not None else (None if pu else 1.0)
    fit = dict(C=c, seed=args.seed, q_star=q_star, eta=eta)
    if pu:
        fit["folds"] = 5 if args.folds is None else args.folds
    elif args.folds is not None:
        raise ObstaclesCommandError(
            "--folds applies to --unlabelled only (the folds that estimate Elkan and Noto's c); "
            "drop it"
        )
    if not pu:
        threshold = _number(args.threshold or "0.5", "--threshold", strict=True)
        if not threshold < 1:
            raise ObstaclesCommandError(
                f"--threshold must be a probability in (0, 1); got {threshold}"
            )
        holdout = _number(args.holdout or "0.25", "--holdout", strict=False)
        if not holdout < 1:
            raise ObstaclesCommandError(f"--holdout must be in [0, 1); got {holdout}")
        fit.update(threshold=threshold, holdout=holdout)
    size = None if args.size is None else _size(args.size)
    out = Path(args.out)
    if _check_out(out, is_classifier_folder, "a cspace classifier") and not args.overwrite:
        raise ObstaclesCommandError(
            f"{out} already holds a classifier; pass --overwrite to replace it"
        )
    encoder = _encoder_on(args.encoder, args.device)
    size, size_note = image_size_for(encoder, size)
    clf = classifier_from_images(
        args.good, args.bad, encoder, unlabelled=args.unlabelled, size=size,
        batch_size=args.batch_size, resize=args.resize, progress=not args.no_progress, **fit,
    )  # fmt: skip
    clf.info["encoder"] = f"{args.encoder} ({encoder.name})"
    clf.save(out)
    counts = clf.info["counts"]
    if pu:
        print(
            f"trained on {counts['examples']} bad and {counts['unlabelled']} unlabelled images "
            f"(positive-unlabelled), d={clf.dim}"
        )
    else:
        print(f"trained on {counts['good']} good and {counts['bad']} bad images, d={clf.dim}")
    print(f"encoder: {args.encoder} ({encoder.name}), images {size[1]}x{size[0]}")
    if size_note:
        print(f"note: {size_note}")
    if pu:
        print(
            f"Elkan and Noto's c = {clf.info['c']:.3f} (out of fold); bad examples inside: "
            f"{100 * clf.info['example_recall']:.1f}%, unlabelled inside: "
            f"{100 * clf.info['unlabelled_inside']:.1f}%"
        )
    else:
        acc = "n/a (--holdout 0)" if clf.accuracy is None else f"{clf.accuracy:.3f}"
        print(f"held-out accuracy: {acc} (training accuracy {clf.train_accuracy:.3f})")
    auto = " (auto)" if q_star == "auto" else ""
    print(f"threshold: {clf.threshold}, q_star: {clf.q_star:.4g}{auto}, eta: {clf.eta:.4g}")
    print(f"saved: {out}")
    return 0


# ---------------------------------------------------------------------- parser
def _encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--encoder",
        default="digits",
        metavar="digits|digits-plain|fashion|fashion-plain|PATH",
        help="the C-space: the shipped aligned digits VAE (digits), the plain one (digits-plain), "
        "the shipped Fashion-MNIST VAEs (fashion, fashion-plain: 28x28 images, the latents of "
        "cspace/weights/fashion_pipeline and fashion_pipeline_plain), or a folder with a cspace aligned VAE, a diffusers AutoencoderKL or a diffusers pipeline "
        "(its vae/) (default digits)",
    )
    p.add_argument(
        "--size",
        default=None,
        metavar="N|HxW",
        help="image size (default: the encoder's, its config's sample_size: 8 for the digits "
        "VAEs); another size is refused for the digits VAEs",
    )
    p.add_argument(
        "--resize",
        action="store_true",
        help="resize images of another size to the image size (bilinear, antialiased; the "
        "output says how many) instead of refusing them",
    )
    p.add_argument("--device", default="cpu", help="torch device for encoding (default cpu)")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar while encoding (shown when the images take more than one batch)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=256,
        help="images per encoder batch (default 256)",
    )


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``obstacles`` command (with ``build``, ``info``, ``classifier``) to ``subparsers``."""
    obs = subparsers.add_parser(
        "obstacles",
        help="build obstacle sets from images, inspect them, train preference classifiers",
        description="Obstacle sets and preference classifiers in the C-space of a VAE.",
    )
    sub = obs.add_subparsers(dest="obstacles_command", metavar="SUBCOMMAND")
    sub.required = True

    build = sub.add_parser(
        "build",
        help="an obstacle set from image files and folders",
        description="Encode images into the C-space and save them as an obstacle set. Every file "
        "is checked first; one bad file stops everything and nothing is written.",
    )
    build.add_argument(
        "inputs", nargs="+", metavar="IMAGES_OR_DIRS", help="PNG/JPEG files, folders"
    )
    build.add_argument("--out", required=True, metavar="SET", help="obstacle set folder to write")
    build.add_argument("--label", default=None, help="label of all images (default: folder name)")
    build.add_argument(
        "--q-star",
        default="auto",
        metavar="auto|FLOAT",
        help="influence range Q*; auto: the median distance of each example to its 5th nearest "
        "other example (default auto; the demo uses 1.5 x auto, printed beside it)",
    )
    build.add_argument("--eta", default="1.0", help="strength eta (default 1)")
    build.add_argument(
        "--radius",
        default=None,
        help="hard collision radius (default: 0.5 x Q*; the demo uses auto, printed beside it)",
    )
    build.add_argument(
        "--shard-size",
        type=positive_int,
        default=None,
        help="images per shard; giving it makes the build sharded (4096 per shard when not "
        "given; a build under torchrun is always sharded: the ranks encode the shards, rank 0 "
        "merges; a rerun resumes)",
    )
    build.add_argument(
        "--keep-sharded",
        type=positive_int,
        default=None,
        metavar="S",
        help="save the set as S shards on disk, to be loaded shard-per-rank",
    )
    mode = build.add_mutually_exclusive_group()
    mode.add_argument("--append", action="store_true", help="add the images to an existing set")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing set")
    _encoder_args(build)
    build.set_defaults(func=_cmd_build)

    info = sub.add_parser(
        "info",
        help="describe an obstacle set or a classifier folder",
        description="Verify and describe an obstacle set or a preference classifier.",
    )
    info.add_argument("path", metavar="SET", help="obstacle set or classifier folder")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_cmd_info)

    clf = sub.add_parser(
        "classifier",
        help="train a preference classifier (good vs bad, or bad vs unlabelled images) as an "
        "obstacle",
        description="Train a logistic-regression preference classifier on C-space embeddings of "
        "good and bad images (prints its held-out accuracy), or of bad images against unlabelled "
        "ones such as the model's own samples (--unlabelled: positive-unlabelled, Elkan and "
        "Noto's threshold), and save it.",
    )
    clf.add_argument("--good", nargs="+", metavar="DIR", help="wanted images")
    clf.add_argument("--bad", nargs="+", required=True, metavar="DIR", help="images to avoid")
    clf.add_argument(
        "--unlabelled",
        nargs="+",
        metavar="DIR",
        help="instead of --good: unlabelled images (e.g. samples of the model, which hold some "
        "bad ones); the bad region is g(x) >= c / 2, c Elkan and Noto's constant",
    )
    clf.add_argument("--out", required=True, metavar="DIR", help="classifier folder to write")
    clf.add_argument(
        "--folds",
        type=positive_int,
        default=None,
        help="with --unlabelled: the folds that estimate c out of fold (5 when not given; at most "
        "the number of bad images and of unlabelled images)",
    )
    clf.add_argument(
        "--threshold",
        default=None,
        help="p(bad) threshold of the bad region (0.5 when not given; with --unlabelled it is "
        "c / 2 and cannot be set)",
    )
    clf.add_argument(
        "--q-star",
        default="auto",
        metavar="auto|FLOAT",
        help="influence range; auto: the median distance of the good examples (with --unlabelled: "
        "of the unlabelled images) on the good side to the boundary (default auto)",
    )
    clf.add_argument("--eta", default="1.0", help="strength eta (default 1)")
    clf.add_argument(
        "--C",
        default=None,
        help="inverse L2 regularisation (1 when not given; with --unlabelled 31.2 / the number of "
        "images, obstacles.classifier.PU_CN)",
    )
    clf.add_argument(
        "--holdout",
        default=None,
        help="held-out fraction for the accuracy (0.25 when not given; not with --unlabelled)",
    )
    clf.add_argument("--seed", type=seed, default=0, help="split seed (default 0)")
    clf.add_argument("--overwrite", action="store_true", help="replace an existing classifier")
    _encoder_args(clf)
    clf.set_defaults(func=_cmd_classifier)
    return obs
