r"""The independent judge of generated Fashion-MNIST images: a small supervised CNN.

It plays the part :class:`cspace.models.judge.Judge` plays for digits: it says which class a
generated image shows and how sure it is, and it is **never used for guidance** (no field,
verifier or obstacle set is built from it). It works in pixel space on images (B, 1, 28, 28) in
[-1, 1], so it judges every VAE, flow and pipeline the same way.

The network (:class:`FashionJudge`, about 100k parameters)::

    [conv3x3 -> BatchNorm -> ReLU -> maxpool 2] x 3   (1 -> 16 -> 32 -> 64 channels; 28 -> 14 -> 7 -> 3)
    flatten (576) -> dropout -> linear 576 -> 128 -> ReLU    = features(x), the penultimate layer
    -> linear 128 -> 10                                      = logits(x)
    p(y | x) = softmax(logits(x))

:func:`train_fashion_judge` trains it on the **full train split** (60,000 images) with
cross-entropy (no label smoothing, so that its confidence stays a probability), AdamW and a
cosine learning rate, random horizontal flips and shifts of up to 2 pixels, and measures it on
the full test split (10,000 images) and on the shipped held-out slice
(:func:`cspace.models.data.fashion_heldout`, 2,000 of those test images). The shipped judge
(``cspace/weights/fashion_judge``) was made by

    OMP_NUM_THREADS=1 cspace train judge --out cspace/weights/fashion_judge --epochs 8 --seed 0

and its figures are in its manifest's ``metrics`` and in ``docs/fashion.md``. A judge folder is
in cspace's safe-folder format (:mod:`cspace.io.folder`: ``manifest.json``, format
``cspace.judge`` v3, the config, training settings and metrics; ``model-<hash>.safetensors``),
loaded like every weights folder: header checked against the file, module sized on the ``meta``
device first, keys and shapes checked, nothing unpickled.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cspace.io.checks import check_output_folder
from cspace.io.errors import FolderError, MissingWeightsError
from cspace.io.folder import FolderKind, check_target, read_folder, write_folder
from cspace.io.weights import load_config_module
from cspace.models.metrics import class_report
from cspace.models.shipped import shipped

__all__ = [
    "JUDGE_KIND",
    "FashionJudge",
    "FashionJudgeConfig",
    "JudgeWeightsError",
    "default_fashion_judge",
    "evaluate_judge",
    "train_fashion_judge",
]

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 28, 28)
CONFIDENT = 0.9
_WEIGHTS = "model.safetensors"


class JudgeWeightsError(FolderError):
    """A Fashion-MNIST judge folder that exists but cannot be used (corrupt, foreign,
    mismatched)."""


def _missing_judge(folder: Path, detail: str) -> MissingWeightsError:
    return MissingWeightsError(
        f"Fashion-MNIST judge: {folder}: {detail}. Train it with "
        f"`cspace train judge --out {folder}` (needs the Fashion-MNIST files; see "
        "cspace.models.data.find_fashion_mnist)"
    )


#: the judge's folder kind (:mod:`cspace.io.folder`)
JUDGE_KIND = FolderKind(
    format="cspace.judge",
    version=3,
    what="judge",
    a_what="a cspace judge folder",
    error=JudgeWeightsError,
    files=(_WEIGHTS,),
    fix="retrain it (cspace train judge) or restore the folder from a copy",
    missing=_missing_judge,
)


@dataclass
class FashionJudgeConfig:
    """Architecture of :class:`FashionJudge`."""

    channels: tuple[int, int, int] = (16, 32, 64)
    hidden: int = 128
    dropout: float = 0.2
    num_classes: int = NUM_CLASSES

    def __post_init__(self) -> None:
        ch = tuple(self.channels)
        if len(ch) != 3 or not all(type(c) is int and 1 <= c <= 1024 for c in ch):
            raise ValueError(f"channels must be 3 ints in 1..1024; got {self.channels!r}")
        if type(self.hidden) is not int or not 1 <= self.hidden <= 4096:
            raise ValueError(f"hidden must be an int in 1..4096; got {self.hidden!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout!r}")
        if self.num_classes != NUM_CLASSES:
            raise ValueError(f"num_classes must be {NUM_CLASSES}; got {self.num_classes!r}")
        self.channels = ch


def _check_images(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"{what} must have shape (B, 1, 28, 28) in [-1, 1]; got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} is empty")
    if not torch.is_floating_point(x):
        raise ValueError(f"{what} must be floating point in [-1, 1]; got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN or Inf")
    return x


class FashionJudge(nn.Module):
    """The Fashion-MNIST judge CNN; see the module docstring. ``meta``: the manifest's fields
    of a loaded judge (``metrics`` among them)."""

    def __init__(self, config: FashionJudgeConfig | None = None) -> None:
        super().__init__()
        cfg = config or FashionJudgeConfig()
        self.config = cfg
        layers: list[nn.Module] = []
        c_in = 1
        for c in cfg.channels:
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = c
        self.conv = nn.Sequential(*layers)
        self.hidden = nn.Sequential(
            nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(c_in * 3 * 3, cfg.hidden), nn.ReLU()
        )
        self.head = nn.Linear(cfg.hidden, cfg.num_classes)
        self.meta: dict[str, Any] = {}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, 28, 28) in [-1, 1] -> penultimate features (B, hidden) (after ReLU)."""
        return self.hidden(self.conv(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, 10)."""
        return self.head(self.features(images))

    forward = logits

    @property
    def heldout_accuracy(self) -> float | None:
        """Accuracy on the shipped held-out slice, from the manifest (None if unknown)."""
        return self.meta.get("metrics", {}).get("heldout_accuracy")

    @torch.no_grad()
    def _batched(self, fn, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        x = _check_images(images).detach()
        was = self.training
        self.eval()
        try:
            dev = next(self.parameters()).device
            out = [
                fn(x[s : s + batch_size].to(dev, torch.float32).clamp(-1, 1)).cpu()
                for s in range(0, x.shape[0], batch_size)
            ]
        finally:
            self.train(was)
        return torch.cat(out)

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, 10) float64 for images (B, 1, 28, 28) in [-1, 1] (values
        outside are clamped)."""
        return torch.softmax(self._batched(self.logits, images).double(), dim=1)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted classes (B,) int64."""
        return self.predict_proba(images).argmax(1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, hidden) float64 without gradients (for Frechet distances)."""
        return self._batched(self.features, images).double()

    def report(self, images: torch.Tensor, confident: float = CONFIDENT) -> dict:
        """Judge a set of images; the same dict as :meth:`cspace.models.judge.Judge.report`:
        ``class_shares`` (10 floats, sum 1), ``confidence`` (mean largest probability),
        ``confident_share`` (share with largest probability > ``confident``), ``predicted``
        (B,), ``max_prob`` (B,), ``n``."""
        return class_report(self.predict_proba(images), confident)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write the judge folder (``manifest.json``: the config and ``extra``;
        ``model.safetensors``), crash-safe (:func:`cspace.io.folder.write_folder`)."""
        from safetensors.torch import save

        blob = save({k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()})
        config = asdict(self.config)
        config["channels"] = list(config["channels"])
        return write_folder(path, JUDGE_KIND, {"config": config, **(extra or {})}, {_WEIGHTS: blob})

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> FashionJudge:
        """Load a judge folder (default: the shipped judge), in eval mode."""
        read = read_folder(Path(path) if path is not None else shipped("fashion_judge"), JUDGE_KIND)
        model = load_config_module(read, _WEIGHTS, FashionJudgeConfig, cls, JUDGE_KIND,
                                   JudgeWeightsError, "Fashion-MNIST judge")  # fmt: skip
        return model.eval()


@functools.lru_cache(maxsize=1)
def default_fashion_judge() -> FashionJudge:
    """The shipped judge, loaded once per process."""
    return FashionJudge.load()


def evaluate_judge(judge: FashionJudge, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy, mean confidence (largest probability) and mean negative log-likelihood
    ``-log p(y_true | x)`` of ``judge`` on labelled images (N, 1, 28, 28), (N,)."""
    p = judge.predict_proba(images)
    y = torch.as_tensor(labels).long()
    if y.shape != (p.shape[0],):
        raise ValueError(f"labels must have shape ({p.shape[0]},); got {tuple(y.shape)}")
    true = p[torch.arange(len(y)), y].clamp_min(1e-300)
    return {
        "accuracy": float((p.argmax(1) == y).double().mean()),
        "confidence": float(p.max(1).values.mean()),
        "nll": float(-true.log().mean()),
        "n": len(y),
    }


def _augment(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flips and integer shifts by up to ``max_shift`` pixels (-1 fills)."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :]
    return pad[torch.arange(b)[:, None, None, None], torch.zeros(1, 1, 1, 1, dtype=torch.long),
               rows, cols]  # fmt: skip


def train_fashion_judge(
    out_dir: str | os.PathLike,
    data: str | os.PathLike | None = None,
    epochs: int = 8,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 3e-3,
    progress: bool = True,
    config: FashionJudgeConfig | None = None,
) -> dict[str, Any]:
    """Train the judge on the Fashion-MNIST *train* split and save it to ``out_dir``.

    ``data``: where the IDX files are (:func:`cspace.models.data.find_fashion_mnist`).
    AdamW (weight decay 1e-4), cross-entropy, cosine learning rate after a 2% warm-up, random
    flips and shifts; deterministic for a seed on one device and thread count. ``config``: the
    architecture (default :class:`FashionJudgeConfig`). Measures the full *test* split and the
    shipped held-out slice; writes the folder (``manifest.json`` with the metrics) and returns
    the metrics with ``wall_s`` and ``out_dir``.
    """
    from tqdm.auto import tqdm

    from cspace.models.data import fashion_heldout, fashion_mnist

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1; got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    check_target(out_dir, JUDGE_KIND)  # before training, not after
    check_output_folder(out_dir, "the output folder (--out)")
    x, y = fashion_mnist("train", data)
    x_test, y_test = fashion_mnist("test", data)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = FashionJudge(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = x.shape[0]
    per_epoch = max(1, math.ceil(n / batch_size))
    steps = epochs * per_epoch
    warm = max(1, steps // 50)
    g = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(total=steps, desc="judge", disable=not progress)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            frac = min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group["lr"] = lr * frac
            loss = F.cross_entropy(model.logits(_augment(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
    bar.close()
    model.eval()
    train_s = time.perf_counter() - t0
    test = evaluate_judge(model, x_test, y_test)
    metrics = {
        "test_accuracy": test["accuracy"],
        "test_confidence": test["confidence"],
        "test_nll": test["nll"],
        "test_n": test["n"],
    }
    try:
        h = evaluate_judge(model, *fashion_heldout())
        metrics.update(heldout_accuracy=h["accuracy"], heldout_confidence=h["confidence"])
    except (OSError, FolderError):  # no shipped slice (yet): the full test split stands alone
        pass
    info = {
        "epochs": epochs,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "steps": steps,
        "train_images": int(n),
        "threads": torch.get_num_threads(),
    }
    model.save(
        out_dir,
        extra={**info, "metrics": metrics, "train_s": round(train_s, 1),
               "trained_on": "Fashion-MNIST train split"},
    )  # fmt: skip
    return {**metrics, **info, "wall_s": time.perf_counter() - t0, "out_dir": str(out_dir)}
