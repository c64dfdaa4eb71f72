r"""SimCLR: the self-supervised training of the Fashion-MNIST teacher, and its figures.

DINOv2 learns without labels; so does the teacher of the 28x28 C-space
(:class:`cspace.models.teachers.FashionTeacher`). It is trained with SimCLR's contrastive loss
(Chen et al. 2020, "A simple framework for contrastive learning of visual representations"):

* every image ``x`` of a batch of ``B`` gets two random views ``v1 = a1(x)``, ``v2 = a2(x)``
  (:func:`augment_views`: a random resized crop of 60-100% of the side with aspect ratio
  3/4..4/3, a horizontal flip with probability 1/2, a random contrast in [0.6, 1.4] and
  brightness in [-0.2, 0.2] on the [0, 1] scale, and a random 8x8 cut-out with probability 1/2);
* both go through the encoder and the projection head: ``p = head(mean token)`` (B, d),
  normalised to the unit sphere;
* the NT-Xent loss (:func:`nt_xent`) makes each view pick its partner among the other
  ``2B - 1`` views: with ``s_ij = p_i . p_j / tau``,
  ``L = -1/(2B) sum_i log( exp(s_{i,pair(i)}) / sum_{k != i} exp(s_ik) )``.

Why SimCLR rather than DINO's self-distillation: on two shared CPU cores the teacher gets a few
epochs, and SimCLR's loss learns from the first step with one network, no momentum teacher,
centring or sharpening schedule to tune (DINO's collapse-avoidance needs those and many epochs);
a batch of 256 gives 510 negatives per view, plenty for ten classes.

The figures (:func:`cspace.models.metrics.embedding_accuracy`): the embeddings (the mean patch token, (N, width)) of
the **whole train split** fit a 5-nearest-neighbour classifier (Euclidean) and a linear probe
(scikit-learn ``LogisticRegression``, lbfgs, C = 1, on features standardised with the train
split's mean and std), which then label held-out images: the shipped 2,000-image slice and the
full 10,000-image test split. The labels are used only there, never in training.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
import torch.nn.functional as F

from cspace.io.checks import check_output_folder
from cspace.io.errors import FolderError
from cspace.io.folder import check_target
from cspace.models.metrics import embedding_accuracy
from cspace.models.teachers import SSL_TEACHER_KIND, FashionTeacher, FashionTeacherConfig

__all__ = [
    "augment_views",
    "nt_xent",
    "teacher_embeddings",
    "train_fashion_teacher",
]


def augment_views(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random view of each image of ``x`` (B, C, H, W) in [-1, 1] (see the module docstring);
    the same shape, in [-1, 1]. Deterministic for the state of ``g``."""
    b, c, h, w = x.shape
    u = (x + 1.0) / 2.0  # [0, 1], background 0 (what grid_sample pads with)
    scale = 0.6 + 0.4 * torch.rand(b, generator=g)
    aspect = torch.exp((torch.rand(b, generator=g) * 2 - 1) * math.log(4 / 3))
    sx = (scale * aspect.sqrt()).clamp(max=1.0)
    sy = (scale / aspect.sqrt()).clamp(max=1.0)
    tx = (torch.rand(b, generator=g) * 2 - 1) * (1 - sx)
    ty = (torch.rand(b, generator=g) * 2 - 1) * (1 - sy)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = sx * flip
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    u = F.grid_sample(u, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = 0.6 + 0.8 * torch.rand(b, 1, 1, 1, generator=g)
    bright = (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1) * 0.2
    u = u * contrast + bright
    cut = torch.rand(b, generator=g) < 0.5
    cy = torch.randint(0, h - 7, (b,), generator=g)
    cx = torch.randint(0, w - 7, (b,), generator=g)
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    box = (
        (rows >= cy[:, None, None])
        & (rows < cy[:, None, None] + 8)
        & (cols >= cx[:, None, None])
        & (cols < cx[:, None, None] + 8)
        & cut[:, None, None]
    )
    u = u.masked_fill(box[:, None], 0.0)
    return (u.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


def nt_xent(p1: torch.Tensor, p2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's NT-Xent loss of paired projections ``p1``, ``p2`` (B, d): view ``i`` must pick
    its partner among the other ``2B - 1`` views by cosine similarity / ``temperature``."""
    if p1.shape != p2.shape or p1.ndim != 2 or p1.shape[0] < 2:
        raise ValueError(
            f"nt_xent needs two (B, d) projections with B >= 2; got {tuple(p1.shape)} and "
            f"{tuple(p2.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    b = p1.shape[0]
    z = F.normalize(torch.cat([p1, p2]), dim=1)
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return F.cross_entropy(sim, target)


@torch.no_grad()
def teacher_embeddings(
    teacher: FashionTeacher, images: torch.Tensor, batch_size: int = 1000
) -> torch.Tensor:
    """The mean patch tokens (N, width) of ``images`` (N, 1, 28, 28), in eval mode."""
    was = teacher.training
    torch.nn.Module.train(teacher, False)  # Teacher.train is a no-op (frozen teachers)
    try:
        out = [
            teacher.embed(images[s : s + batch_size]) for s in range(0, images.shape[0], batch_size)
        ]
    finally:
        torch.nn.Module.train(teacher, was)
    return torch.cat(out)


def _lr(step: int, steps: int, lr: float, warm: int) -> float:
    return lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))


def train_fashion_teacher(
    out_dir: str | os.PathLike,
    data: str | os.PathLike | None = None,
    epochs: int = 4,
    seed: int = 0,
    batch_size: int = 256,
    lr: float = 2e-3,
    temperature: float = 0.2,
    progress: bool = True,
    config: FashionTeacherConfig | None = None,
    max_images: int | None = None,
) -> dict[str, Any]:
    """Train the self-supervised Fashion-MNIST teacher with SimCLR and save it to ``out_dir``.

    ``data``: where the IDX files are (:func:`cspace.models.data.find_fashion_mnist`). The
    *train* split's images are used without their labels: AdamW (weight decay 1e-4), a cosine
    learning rate after a 5% warm-up, ``epochs`` passes over the split in batches of
    ``batch_size`` (the last partial batch of each epoch is dropped), NT-Xent at
    ``temperature``. ``max_images``: use only the first N train images (small runs and tests).
    Deterministic for a seed on one device and thread count. Then measures
    (:func:`cspace.models.metrics.embedding_accuracy`, fit on the train split) the shipped held-out slice and the
    full test split, writes the folder (format ``cspace.ssl_teacher``; ``manifest.json`` with
    the metrics) and returns the metrics with ``wall_s``, ``train_s`` and ``out_dir``.
    """
    from tqdm.auto import tqdm

    from cspace.models.data import fashion_heldout, fashion_mnist

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1; got {epochs}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (a view needs negatives); got {batch_size}")
    if max_images is not None and max_images < batch_size:
        raise ValueError(f"max_images ({max_images}) must be >= batch_size ({batch_size})")
    check_target(out_dir, SSL_TEACHER_KIND)  # before training, not after
    check_output_folder(out_dir, "the output folder (--out)")
    x, y = fashion_mnist("train", data)
    if max_images is not None:
        x, y = x[:max_images], y[:max_images]
    n = x.shape[0]
    if n < batch_size:
        raise ValueError(f"the train split holds {n} images, fewer than batch_size {batch_size}")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = FashionTeacher(config).unfreeze()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    per_epoch = n // batch_size
    steps = epochs * per_epoch
    warm = max(1, steps // 20)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps, desc="teacher (SimCLR)", disable=not progress)
    step, loss_sum, losses = 0, 0.0, []
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        loss_sum = 0.0
        for s in range(per_epoch):
            xb = x[order[s * batch_size : (s + 1) * batch_size]]
            v1, v2 = augment_views(xb, g), augment_views(xb, g)
            for group in opt.param_groups:
                group["lr"] = _lr(step, steps, lr, warm)
            p = model.project(torch.cat([v1, v2]))
            loss = nt_xent(p[: len(xb)], p[len(xb) :], temperature)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ValueError(
                    f"teacher training diverged at step {step + 1} (loss {value}); "
                    "nothing was saved. Lower the learning rate"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += value
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{value:.3f}")
        losses.append(round(loss_sum / per_epoch, 4))
    bar.close()
    model.freeze()
    train_s = time.perf_counter() - t0
    metrics: dict[str, Any] = {"epoch_losses": losses}
    tests = {}
    try:
        xh, yh = fashion_heldout()
        tests["heldout"] = (teacher_embeddings(model, xh), yh)
    except (OSError, FolderError):  # no shipped slice: the test split stands alone
        pass
    xte, yte = fashion_mnist("test", data)
    tests["test"] = (teacher_embeddings(model, xte), yte)
    metrics.update(embedding_accuracy(teacher_embeddings(model, x), y, tests))
    info = {
        "method": "SimCLR (NT-Xent), no labels",
        "epochs": epochs,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "temperature": temperature,
        "steps": steps,
        "train_images": int(n),
        "threads": torch.get_num_threads(),
    }
    model.save(
        out_dir,
        extra={**info, "metrics": metrics, "train_s": round(train_s, 1),
               "trained_on": "Fashion-MNIST train split, images only"},
    )  # fmt: skip
    return {
        **metrics,
        **info,
        "train_s": train_s,
        "wall_s": time.perf_counter() - t0,
        "out_dir": str(out_dir),
    }
