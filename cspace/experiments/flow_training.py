"""Train a latent flow model on a C-space's digits latents, and evaluate it by sampling.

* :func:`train_flow_for_encoder`: encode the digits *train* split with an
  :class:`~cspace.models.encoders.Encoder`, train (:func:`cspace.models.flow.train_flow`),
  evaluate, save;
* :func:`evaluate_flow`: sample with :func:`guidance.sample`, decode and judge
  (:mod:`cspace.models.judge`) against real digits.

The commands that rebuild the shipped flows are in :mod:`cspace.cli.flow`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cspace.io.checks import check_output_file, check_output_folder
from cspace.models.encoders import Encoder
from cspace.models.flow import FlowConfig, FlowModel, flow_matching_loss, save_flow, train_flow
from cspace.models.shipped import SPACES, WEIGHTS_DIR, shipped

__all__ = ["evaluate_flow", "resolve_flow_encoder", "train_flow_for_encoder"]


def evaluate_flow(
    flow: FlowModel,
    encoder,
    *,
    n: int = 1000,
    steps: int = 50,
    seed: int = 0,
    judge=None,
) -> dict:
    """Sample ``n`` latents with ``guidance.sample(flow, randn(n, c, h, w), steps=steps)``
    (Euler), decode them with ``encoder`` and judge them in pixel space (:mod:`cspace.models.judge`).

    Returns ``{"samples": {...}, "heldout": {...}, "reconstructed": {...}, ...}``: for the
    generated images, the real heldout digits, and the heldout digits passed through the VAE
    (its ceiling), each with ``confident_share`` (judge probability > 0.9), ``confidence``,
    ``class_shares``, ``class_share_max_dev`` (largest deviation from 0.1), ``diversity``
    (mean pairwise L2), ``copy_rate`` and ``median_nearest_train``.
    """
    from cspace.models.data import digits
    from cspace.models.judge import copy_rate, copy_threshold, default_judge
    from cspace.models.judge import nearest_train_distance as ntd
    from cspace.models.metrics import diversity
    from guidance import sample

    judge = judge if judge is not None else default_judge()
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((int(n), *flow.latent_shape), generator=g)
    latents = sample(flow, noise, steps=int(steps)).samples
    images = encoder.decode(latents).float()
    heldout = digits("heldout")[0]
    recon = encoder.decode(encoder.encode(heldout)).float()

    def summary(x: torch.Tensor) -> dict:
        r = judge.report(x)
        shares = r["class_shares"]
        return {
            "n": r["n"],
            "confident_share": round(r["confident_share"], 4),
            "confidence": round(r["confidence"], 4),
            "class_shares": [round(s, 4) for s in shares],
            "class_share_max_dev": round(max(abs(s - 0.1) for s in shares), 4),
            "diversity": round(diversity(x), 4),
            "copy_rate": round(copy_rate(x), 4),
            "median_nearest_train": round(float(ntd(x).median()), 4),
        }

    return {
        "n": int(n),
        "steps": int(steps),
        "seed": int(seed),
        "sampler": "euler",
        "judge_heldout_accuracy": round(judge.heldout_accuracy, 4),
        "copy_threshold": round(copy_threshold(), 4),
        "latent_std": round(float(latents.std()), 4),
        "samples": summary(images),
        "heldout": summary(heldout),
        "reconstructed": summary(recon),
    }


def train_flow_for_encoder(
    encoder,
    out_dir: str | os.PathLike,
    steps: int = 8000,
    seed: int = 0,
    *,
    encoder_name: str | None = None,
    batch_size: int = 256,
    lr: float = 1e-3,
    config: FlowConfig | None = None,
    evaluate: bool = True,
    eval_samples: int = 1000,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    **train_kwargs,
) -> dict:
    """Encode the digits *train* split with ``encoder`` (never judge or heldout), train a flow on
    the latents (:func:`train_flow`), optionally evaluate it (:func:`evaluate_flow`, on the
    heldout split), save it to ``out_dir`` and return the metrics (also stored in the folder's
    ``manifest.json`` under ``meta``, with ``meta["space"]``: the encoder's C-space at the
    digits' 8x8).

    ``encoder_name``: what ``meta["encoder"]`` records, the VAE folder name under
    ``cspace/weights`` (e.g. ``"vae_aligned"``) or an absolute path; default ``encoder.name``.
    """
    from cspace.models.data import digits

    check_output_folder(out_dir, "the output folder (--out)")
    if checkpoint is not None:
        check_output_file(checkpoint, "the checkpoint (--checkpoint)")
    images, _ = digits("train")
    latents = encoder.encode(images).float().cpu()
    shape = tuple(latents.shape[1:])
    cfg = config or FlowConfig(latent_shape=shape)
    net, metrics = train_flow(
        latents,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        config=cfg,
        progress=progress,
        checkpoint=checkpoint,
        resume=resume,
        **train_kwargs,
    )
    flow = FlowModel(net)
    heldout = encoder.encode(digits("heldout")[0]).float().cpu()
    metrics["heldout_loss"] = flow_matching_loss(net, heldout, seed=0)
    meta = {
        "encoder": encoder_name or getattr(encoder, "name", "unknown"),
        "encoder_scaling_factor": float(getattr(encoder, "scaling_factor", 1.0)),
        "encoder_shift_factor": float(getattr(encoder, "shift_factor", 0.0)),
        "data": "digits/train",
        "latent_shape": list(shape),
        "latent_mean": float(latents.mean()),
        "latent_std": float(latents.std()),
        "training": metrics,
    }
    space = getattr(encoder, "space", None)
    if callable(space):
        meta["space"] = space(tuple(images.shape[-2:])).to_json()
    flow.meta = dict(meta)
    if evaluate:
        meta["evaluation"] = evaluate_flow(flow, encoder, n=eval_samples, seed=0)
    save_flow(out_dir, net, meta)
    flow.meta = meta
    return meta


def resolve_flow_encoder(spec: str, out: str | None):
    """``(encoder, encoder_name, out_dir)`` for an ``--encoder`` spec.

    ``digits`` / ``digits-plain``: the shipped VAE folders ``weights/vae_aligned`` /
    ``weights/vae_plain`` (recorded by folder name), default output ``cspace-flow-digits`` /
    ``cspace-flow-digits-plain`` in the working folder (never inside the installed package: the
    shipped flows are replaced only when ``out`` names them); a PATH: a cspace aligned VAE
    folder (recorded by its absolute path, or its folder name when it lies under
    ``cspace/weights``); then ``--out`` is required.
    """
    if spec in SPACES:
        vae_name = SPACES[spec][0]
        encoder = Encoder.from_aligned(shipped(vae_name))
        return encoder, vae_name, Path(out) if out else Path(f"cspace-flow-{spec}")
    path = Path(spec).expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f"--encoder {spec!r} is neither 'digits', 'digits-plain' nor a VAE folder")
    if not out:
        raise ValueError("--out is required when --encoder is a folder")
    encoder = Encoder.from_aligned(path)
    name = path.name if path.parent == WEIGHTS_DIR.resolve() else str(path)
    return encoder, name, Path(out)
