r"""A small flow-matching velocity model on VAE latents: the network, training, files, evaluation.

Convention (the library's): t = 1 is noise, t = 0 is data,

    x_t = (1 - t) x0 + t eps,    eps ~ N(0, I),    v = eps - x0.

Training objective (conditional flow matching, Lipman et al. 2023; rectified flow):

    L(theta) = E_{x0 ~ data, eps ~ N(0, I), t ~ p(t)} | v_theta(x_t, t) - (eps - x0) |^2

(mean over the latent's elements), whose minimiser is the marginal velocity
``v(x, t) = E[eps - x0 | x_t = x]`` that :func:`guidance.sample` integrates from t = 1 to 0.
``p(t)`` is uniform on [0, 1] by default; ``time_dist="logit_normal"`` draws
``t = sigmoid(n)``, ``n ~ N(0, 1)`` (SD3), which puts more weight on intermediate times.

Pieces:

* :class:`VelocityNet` (config :class:`FlowConfig`): residual MLP with adaptive LayerNorm time
  conditioning (sinusoidal embedding from diffusers), for latents of shape (c, h, w);
* :func:`train_flow`: AdamW, linear warm-up and cosine decay, gradient clipping, EMA weights,
  deterministic for a seed, optional checkpoint/resume (bit-identical to an uninterrupted run);
* :class:`FlowModel`: the trained net as the velocity callable ``v(x, t)`` of the sampler, with
  its metadata (``meta["encoder"]``: the VAE folder whose latents it models; ``meta["space"]``:
  their C-space, :attr:`FlowModel.space`);
* :func:`save_flow` / :func:`load_flow`: a folder in cspace's safe-folder format
  (:mod:`cspace.io.folder`): ``manifest.json`` (format ``cspace.flow`` v3: config, parameters,
  meta, stored name, size and SHA-256 of the weights) + ``model-<hash>.safetensors``, crash-safe
  and serialised with other writers, checksums and shapes verified on load, never unpickled.
  Folders of the older layouts (v2 manifests with a plain ``model.safetensors``; ``config.json``
  + ``model.safetensors``, format ``cspace-flow`` v1) still load (:mod:`cspace.io.legacy`);
* :mod:`cspace.experiments.flow_training` trains one on a C-space's digits latents and evaluates
  it by sampling.

The shipped digits flows live in ``cspace/weights/flow_aligned`` (latents of
``Encoder.from_aligned()``) and ``cspace/weights/flow_plain``; the commands that rebuild them are
in :mod:`cspace.cli.flow`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cspace.io.checks import check_memory
from cspace.io.errors import FolderError, MissingWeightsError
from cspace.io.files import write_file_atomic
from cspace.io.folder import FolderKind, read_folder, write_folder
from cspace.io.legacy import FLOW_V1, manifest_v2
from cspace.io.weights import build_within, weights_values
from cspace.models.shipped import WEIGHTS_DIR, shipped
from cspace.models.space import Space

__all__ = [
    "FLOW_KIND",
    "FlowConfig",
    "FlowModel",
    "FlowWeightsError",
    "VelocityNet",
    "fit_velocity",
    "flow_matching_loss",
    "load_flow",
    "save_flow",
    "train_flow",
]

FORMAT = "cspace.flow"
FORMAT_VERSION = 3
CHECKPOINT_FORMAT = "cspace-flow-checkpoint"
_WEIGHTS = "model.safetensors"
#: the safetensors header tag of the weights file (unchanged since the v1 layout)
_TENSOR_TAG = {"format": "cspace-flow"}
TIME_DISTS = ("uniform", "logit_normal")


class FlowWeightsError(FolderError):
    """A flow folder or checkpoint exists but cannot be used (corrupt, foreign, mismatched)."""


# ---------------------------------------------------------------------------------- the network
@dataclass(frozen=True)
class FlowConfig:
    """Architecture of a :class:`VelocityNet`.

    Attributes:
        latent_shape: (c, h, w) of one latent; digits VAE: (2, 4, 4).
        width: hidden width of the residual stream.
        depth: number of residual blocks.
        mlp_ratio: hidden units of a block's MLP per unit of ``width``.
        time_channels: sinusoidal channels of the time embedding.
        time_embed_dim: width of the learned time embedding.
        dropout: dropout inside each block's MLP while training. With 896 training digits the
            flow otherwise drifts toward reproducing them (measured on a 32-d PCA stand-in for
            the VAE latents, 4,000 steps: copy rate 19% without dropout, 7% at 0.1, 2% at 0.3;
            at 0.4 with this default architecture and 6,000 steps, 0.8%, as for real unseen
            digits, with the lowest held-out flow-matching loss of the settings tried).

    The default (width 192, 4 blocks, MLP ratio 1, dropout 0.4) has 680,544 parameters for
    (2, 4, 4) latents.
    """

    latent_shape: tuple[int, int, int] = (2, 4, 4)
    width: int = 192
    depth: int = 4
    mlp_ratio: float = 1.0
    time_channels: int = 64
    time_embed_dim: int = 128
    dropout: float = 0.4

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.latent_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"latent_shape must be (c, h, w) of positive ints; got {shape}")
        object.__setattr__(self, "latent_shape", shape)
        for name in ("width", "depth", "time_channels", "time_embed_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.time_channels % 2:
            raise ValueError(f"time_channels must be even; got {self.time_channels}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0; got {self.mlp_ratio}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")

    @property
    def dim(self) -> int:
        c, h, w = self.latent_shape
        return c * h * w

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["latent_shape"] = list(self.latent_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FlowConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise FlowWeightsError(f"unknown flow config fields {sorted(unknown)}")
        d = dict(d)
        if "latent_shape" in d:
            d["latent_shape"] = tuple(d["latent_shape"])
        return cls(**d)


class _Block(nn.Module):
    """Pre-norm residual MLP block with adaptive LayerNorm (shift, scale, gate from the time
    embedding; the gate starts at zero, so every block starts as the identity)."""

    def __init__(self, width: int, hidden: int, temb: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mod = nn.Linear(temb, 3 * width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.mod(temb).chunk(3, dim=-1)
        y = self.norm(h) * (1 + scale) + shift
        return h + gate * self.fc2(self.drop(F.silu(self.fc1(y))))


class VelocityNet(nn.Module):
    r"""Velocity model ``v_theta(x, t)`` for latents of shape (c, h, w).

    ``forward(x, t)``: ``x`` (B, c, h, w) states, ``t`` (B,) times in [0, 1] (a scalar tensor is
    broadcast) -> ``v`` (B, c, h, w), the estimate of ``eps - x0`` (t = 1 noise, t = 0 data).

    Architecture: the latent is flattened to d = c*h*w and projected to ``width``; time goes
    through diffusers' sinusoidal ``Timesteps`` (of ``1000 t``) and ``TimestepEmbedding`` (MLP)
    and then SiLU; ``depth`` residual blocks ``h <- h + gate(t) * MLP(LN(h) (1 + scale(t)) +
    shift(t))``; a final adaptive LayerNorm and a zero-initialised linear map back to d.

    Trained by :func:`train_flow` to minimise
    ``E |v_theta((1-t) x0 + t eps, t) - (eps - x0)|^2``.
    """

    def __init__(self, config: FlowConfig | None = None) -> None:
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        cfg = config or FlowConfig()
        self.config = cfg
        hidden = max(1, round(cfg.width * cfg.mlp_ratio))
        self.time_proj = Timesteps(cfg.time_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(cfg.time_channels, cfg.time_embed_dim)
        self.inp = nn.Linear(cfg.dim, cfg.width)
        self.blocks = nn.ModuleList(
            [_Block(cfg.width, hidden, cfg.time_embed_dim, cfg.dropout) for _ in range(cfg.depth)]
        )
        self.norm_out = nn.LayerNorm(cfg.width, elementwise_affine=False)
        self.mod_out = nn.Linear(cfg.time_embed_dim, 2 * cfg.width)
        self.out = nn.Linear(cfg.width, cfg.dim)
        for layer in (self.mod_out, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = self.config.latent_shape
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(
                f"VelocityNet expects states (B, {', '.join(map(str, shape))}); got {tuple(x.shape)}"
            )
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or have shape ({b},); got {tuple(t.shape)}")
        temb = F.silu(self.time_embed(self.time_proj(1000.0 * t).to(x.dtype)))
        h = self.inp(x.reshape(b, -1))
        for block in self.blocks:
            h = block(h, temb)
        shift, scale = self.mod_out(temb).chunk(2, dim=-1)
        h = self.norm_out(h) * (1 + scale) + shift
        return self.out(h).reshape(x.shape)


# ---------------------------------------------------------------------------------- the wrapper
class FlowModel:
    """A trained :class:`VelocityNet` as the sampler's velocity callable, with its metadata.

    ``flow(x, t)``: ``x`` (B, c, h, w) of any float dtype, ``t`` a float or a (B,) tensor ->
    ``v`` (B, c, h, w) in ``x``'s dtype; evaluated in eval mode without gradients.

    Attributes:
        net: the network (EMA weights when it comes from :func:`train_flow`).
        meta: metadata; ``meta["encoder"]`` names the VAE folder whose latents it models.
        config: the :class:`FlowConfig`.
    """

    def __init__(self, net: VelocityNet, meta: dict | None = None) -> None:
        self.net = net.eval()
        self.meta = dict(meta or {})
        self.config = net.config

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.config.latent_shape

    @property
    def encoder(self) -> str | None:
        """The VAE folder name (e.g. ``"vae_aligned"``) whose latents this flow models."""
        return self.meta.get("encoder")

    @property
    def space(self) -> Space | None:
        """The C-space of the latents this flow models (``meta["space"]``, a
        :class:`cspace.models.space.Space`); None: unknown (a flow trained before spaces were
        recorded), which every space check accepts."""
        try:
            return Space.from_json(self.meta.get("space"))
        except ValueError as err:
            raise FlowWeightsError(f"the flow's meta['space'] is not a space: {err}") from err

    def to(self, device: torch.device | str) -> FlowModel:
        self.net.to(device)
        return self

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        p = next(self.net.parameters())
        b = x.shape[0]
        tt = torch.as_tensor(t, dtype=p.dtype, device=p.device)
        if tt.ndim == 0:
            tt = tt.expand(b)
        v = self.net(x.to(device=p.device, dtype=p.dtype), tt.reshape(-1))
        return v.to(device=x.device, dtype=x.dtype)

    velocity = __call__

    def load_encoder(self):
        """The :class:`~cspace.models.encoders.Encoder` named by ``meta["encoder"]`` (a folder under
        ``cspace/weights`` or a path)."""
        from cspace.models.encoders import Encoder

        name = self.encoder
        if not name:
            raise ValueError("this flow does not record its encoder (meta['encoder'])")
        path = Path(name) if Path(name).is_absolute() else WEIGHTS_DIR / name
        return Encoder.from_aligned(path)


# ---------------------------------------------------------------------------------- training
def _draw_t(n: int, dist: str, g: torch.Generator) -> torch.Tensor:
    if dist == "uniform":
        return torch.rand(n, generator=g)
    return torch.sigmoid(torch.randn(n, generator=g))


def flow_matching_loss(
    net: VelocityNet | FlowModel,
    latents: torch.Tensor,
    *,
    seed: int = 0,
    repeats: int = 4,
    time_dist: str = "uniform",
    batch_size: int = 1024,
) -> float:
    """The flow-matching loss of ``net`` on ``latents`` (N, c, h, w), estimated with ``repeats``
    draws of (t, eps) per latent from a fixed ``seed``: deterministic, for comparisons."""
    model = net.net if isinstance(net, FlowModel) else net
    if time_dist not in TIME_DISTS:
        raise ValueError(f"time_dist must be one of {TIME_DISTS}; got {time_dist!r}")
    g = torch.Generator().manual_seed(int(seed))
    x0 = latents.detach().to(torch.float32).repeat(int(repeats), 1, 1, 1)
    t = _draw_t(x0.shape[0], time_dist, g)
    eps = torch.randn(x0.shape, generator=g)
    was = model.training
    model.eval()
    total = 0.0
    p = next(model.parameters())
    with torch.no_grad():
        for s in range(0, x0.shape[0], batch_size):
            a, e, tt = x0[s : s + batch_size], eps[s : s + batch_size], t[s : s + batch_size]
            xt = (1 - tt)[:, None, None, None] * a + tt[:, None, None, None] * e
            v = model(xt.to(p), tt.to(p)).to(torch.float64)
            total += float(((v - (e - a).to(torch.float64)) ** 2).sum())
    model.train(was)
    return total / x0.numel()


def _lr_at(step: int, steps: int, lr: float, warmup: int, min_lr_ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _settings_json(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


def _write_checkpoint(path: Path, state: dict, settings: dict, step: int) -> None:
    from safetensors.torch import save

    data = save(
        {k: v.contiguous() for k, v in state.items()},
        metadata={
            "format": CHECKPOINT_FORMAT,
            "step": str(int(step)),
            "settings": _settings_json(settings),
        },
    )
    write_file_atomic(path, data)


def _read_checkpoint(path: Path, settings: dict) -> tuple[dict, int]:
    from safetensors import safe_open

    if not path.is_file():
        raise MissingWeightsError(f"no flow checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise FlowWeightsError(f"{path} is not a readable flow checkpoint: {err}") from err
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise FlowWeightsError(f"{path} is not a cspace flow checkpoint")
    saved = json.loads(meta.get("settings", "{}"))
    if saved != json.loads(_settings_json(settings)):
        diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        raise FlowWeightsError(
            f"{path} was written with other training settings ({', '.join(diff)}); resume with "
            "the same settings, or start afresh: delete that file or pass another checkpoint path"
        )
    return state, int(meta["step"])


def train_flow(
    latents: torch.Tensor,
    *,
    steps: int = 8000,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    ema: float = 0.999,
    config: FlowConfig | None = None,
    time_dist: str = "uniform",
    weight_decay: float = 0.0,
    warmup: int = 200,
    min_lr_ratio: float = 0.05,
    grad_clip: float = 1.0,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    resume: str | os.PathLike | None = None,
    threads: int | None = None,
) -> tuple[VelocityNet, dict]:
    r"""Train a :class:`VelocityNet` by conditional flow matching on ``latents`` (N, c, h, w).

    Each step draws a batch of latents x0 (with replacement), ``t ~ p(t)`` (``time_dist``:
    ``"uniform"`` on [0, 1], or ``"logit_normal"``: ``sigmoid(N(0, 1))``), ``eps ~ N(0, I)``,
    forms ``x_t = (1-t) x0 + t eps`` and minimises ``mean |v_theta(x_t, t) - (eps - x0)|^2``
    with AdamW (``lr``, linear warm-up over ``warmup`` steps, cosine decay to
    ``min_lr_ratio * lr``, gradient norm clipped at ``grad_clip``). An exponential moving
    average of the weights (decay ``min(ema, (1+n)/(10+n))`` at step n) is what is returned.

    Deterministic for a seed on a given machine and thread count: the initial weights and every
    random draw come from ``seed``. ``checkpoint``: a file (safetensors) written every
    ``checkpoint_every`` steps and at the end; ``resume``: continue from such a file (same
    settings required), giving the same weights as an uninterrupted run. ``threads``: torch
    intra-op threads while training (restored afterwards; None keeps the current setting); one
    thread is the fastest for these small models on a shared 2-core machine.

    Refused before training (``ValueError`` naming the value): ``lr`` outside (0, 1]
    (:data:`MAX_LR`), ``threads`` outside 1 .. 4 x the CPU cores (:func:`max_threads`), and a
    ``batch_size`` whose activations do not fit in this machine's memory
    (:class:`~cspace.io.checks.SizeLimitError`).

    Returns:
        ``(net, metrics)``: the EMA network in eval mode and a dict with ``steps``,
        ``batch_size``, ``lr``, ``seed``, ``ema``, ``time_dist``, ``parameters``, ``n_train``,
        ``final_loss`` (mean training loss of the last 10% of steps, raw weights),
        ``train_loss`` (:func:`flow_matching_loss` of the EMA net on the first
        :data:`TRAIN_LOSS_LATENTS` latents, seed 0),
        ``loss_curve`` ([step, mean loss] pairs), ``wall_s`` (this call) and ``resumed_from``.
    """
    cfg = config or FlowConfig(latent_shape=tuple(latents.shape[1:]))
    if latents.ndim != 4 or tuple(latents.shape[1:]) != cfg.latent_shape:
        raise ValueError(
            f"latents must have shape (N, {', '.join(map(str, cfg.latent_shape))}); got "
            f"{tuple(latents.shape)}"
        )
    if latents.shape[0] < 1 or not bool(torch.isfinite(latents).all()):
        raise ValueError("latents must be non-empty and finite")
    if time_dist not in TIME_DISTS:
        raise ValueError(f"time_dist must be one of {TIME_DISTS}; got {time_dist!r}")
    steps, batch_size, warmup = int(steps), int(batch_size), int(warmup)
    if steps < 1 or batch_size < 1 or warmup < 1:
        raise ValueError("steps, batch_size and warmup must be >= 1")
    if not (lr > 0 and 0 <= ema < 1 and grad_clip > 0):
        raise ValueError("need lr > 0, 0 <= ema < 1 and grad_clip > 0")
    if not lr <= MAX_LR:
        raise ValueError(f"lr must be in (0, {MAX_LR:g}]; got {lr} (AdamW diverges far below it)")
    if threads is not None and not 1 <= int(threads) <= max_threads():
        raise ValueError(
            f"threads must be in 1..{max_threads()} (4 x the {os.cpu_count() or 1} CPU cores); "
            f"got {threads}"
        )
    check_memory(8 * steps, f"the loss record of {steps:,} steps", "use fewer steps (--steps)")
    # a batch's activations: about 4 x depth float32 copies of the residual stream, at least
    check_memory(
        4 * (cfg.depth + 1) * batch_size * max(math.prod(cfg.latent_shape), cfg.width) * 4,
        f"a training batch of {batch_size:,} (width {cfg.width}, depth {cfg.depth})",
        "lower the batch size (--batch-size)",
    )
    settings = {
        "config": cfg.to_dict(),
        "steps": steps,
        "batch_size": batch_size,
        "lr": float(lr),
        "seed": int(seed),
        "ema": float(ema),
        "time_dist": time_dist,
        "weight_decay": float(weight_decay),
        "warmup": warmup,
        "min_lr_ratio": float(min_lr_ratio),
        "grad_clip": float(grad_clip),
        "n_train": int(latents.shape[0]),
    }
    data = latents.detach().to(torch.float32).cpu().contiguous()
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    try:
        net, metrics = fit_velocity(
            lambda: VelocityNet(cfg), data, settings, progress, checkpoint, checkpoint_every, resume
        )
        metrics["threads"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
    return net, metrics


#: the largest learning rate train_flow accepts
MAX_LR = 1.0
#: ``train_loss`` in the metrics is measured on the first this many latents (all of the digits';
#: 5,000 of Fashion-MNIST's 60,000, about a minute on one CPU thread instead of ten)
TRAIN_LOSS_LATENTS = 5000


def max_threads() -> int:
    """The most torch threads train_flow accepts: 4 x the CPU cores (more only slow it down)."""
    return 4 * (os.cpu_count() or 1)


def fit_velocity(
    build: Callable[[], nn.Module],
    data: torch.Tensor,
    settings: dict,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    resume: str | os.PathLike | None = None,
    desc: str = "training flow",
) -> tuple[nn.Module, dict]:
    r"""The flow-matching training loop of :func:`train_flow`, for any network ``build()`` whose
    ``forward(x, t)`` maps states (B, c, h, w) and times (B,) in [0, 1] to velocities
    (B, c, h, w): ``min E |v_theta((1-t) x0 + t eps, t) - (eps - x0)|^2``.

    ``data``: float32 latents (N, c, h, w), already checked. ``settings``: the dict that
    :func:`train_flow` builds (``seed``, ``steps``, ``batch_size``, ``lr``, ``ema``,
    ``time_dist``, ``weight_decay``, ``warmup``, ``min_lr_ratio``, ``grad_clip`` and a JSON
    ``config`` naming the network; all of it is stored in checkpoints and must match on
    ``resume``). ``build`` is called once, under ``torch.manual_seed(seed)``, so the initial
    weights come from the seed. Returns the EMA network (eval mode) and the metrics that
    :func:`train_flow` documents.
    """
    n = data.shape[0]
    seed, steps, batch_size = settings["seed"], settings["steps"], settings["batch_size"]
    lr, ema, time_dist = settings["lr"], settings["ema"], settings["time_dist"]
    weight_decay, warmup = settings["weight_decay"], settings["warmup"]
    min_lr_ratio, grad_clip = settings["min_lr_ratio"], settings["grad_clip"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))  # initial weights and dropout masks
        net = build()
        ema_net = copy.deepcopy(net).eval()
        for p in ema_net.parameters():
            p.requires_grad_(False)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        g = torch.Generator().manual_seed(int(seed))
        losses = torch.zeros(steps, dtype=torch.float64)
        start = 0

        def state() -> dict:
            st = {f"model.{k}": v for k, v in net.state_dict().items()}
            st.update({f"ema.{k}": v for k, v in ema_net.state_dict().items()})
            for i, p in enumerate(net.parameters()):
                s = opt.state.get(p)
                if s:
                    st[f"opt.{i}.exp_avg"] = s["exp_avg"]
                    st[f"opt.{i}.exp_avg_sq"] = s["exp_avg_sq"]
                    st[f"opt.{i}.step"] = torch.as_tensor(s["step"], dtype=torch.float32).reshape(1)
            st["rng"] = g.get_state()
            st["torch_rng"] = torch.get_rng_state()  # dropout masks
            st["losses"] = losses
            return st

        resumed_from = None
        if resume is not None:
            st, start = _read_checkpoint(Path(resume), settings)
            try:
                net.load_state_dict({k[6:]: v for k, v in st.items() if k.startswith("model.")})
                ema_net.load_state_dict({k[4:]: v for k, v in st.items() if k.startswith("ema.")})
                for i, p in enumerate(net.parameters()):
                    if f"opt.{i}.exp_avg" in st:
                        opt.state[p] = {
                            "step": st[f"opt.{i}.step"].reshape(()).clone(),
                            "exp_avg": st[f"opt.{i}.exp_avg"].clone(),
                            "exp_avg_sq": st[f"opt.{i}.exp_avg_sq"].clone(),
                        }
                g.set_state(st["rng"])
                torch.set_rng_state(st["torch_rng"])
                losses = st["losses"].clone()
            except (KeyError, RuntimeError) as err:
                raise FlowWeightsError(f"{resume} does not match this model: {err}") from err
            resumed_from = start

        net.train()
        ema_params = list(ema_net.parameters())
        params = list(net.parameters())
        t0 = time.perf_counter()
        bar = tqdm(
            range(start, steps),
            initial=start,
            total=steps,
            desc=desc,
            unit="step",
            disable=not progress,
            mininterval=1.0,
        )
        for step in bar:
            idx = torch.randint(0, n, (batch_size,), generator=g)
            x0 = data[idx]
            t = _draw_t(batch_size, time_dist, g)
            eps = torch.randn(x0.shape, generator=g)
            tb = t[:, None, None, None]
            xt = (1 - tb) * x0 + tb * eps
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr, warmup, min_lr_ratio)
            loss = F.mse_loss(net(xt, t), eps - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            decay = min(ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - decay)
            losses[step] = float(loss.detach())
            if not math.isfinite(float(losses[step])):
                why = (
                    f"before any update: the latents (largest |value| "
                    f"{float(data.abs().max()):.3g}) are too large for the network; normalise them"
                    if step == start
                    else f"lower the learning rate (got {lr:g})"
                )
                raise ValueError(
                    f"flow training diverged at step {step + 1}: the loss is "
                    f"{float(losses[step])}; nothing was saved. {why[0].upper()}{why[1:]}"
                )
            if progress and (step + 1) % 100 == 0:
                bar.set_postfix(loss=f"{float(losses[max(0, step - 99) : step + 1].mean()):.4f}")
            if checkpoint is not None and (
                (step + 1) % max(1, int(checkpoint_every)) == 0 or step + 1 == steps
            ):
                _write_checkpoint(Path(checkpoint), state(), settings, step + 1)
        bar.close()
    wall = time.perf_counter() - t0
    ema_net.eval()
    every = max(1, steps // 20)
    curve = [
        [s + every, float(losses[s : s + every].mean())] for s in range(0, steps - every + 1, every)
    ]
    tail = max(1, steps // 10)
    metrics = {
        **{k: v for k, v in settings.items() if k != "config"},
        "parameters": sum(p.numel() for p in ema_net.parameters()),
        "final_loss": float(losses[steps - tail :].mean()),
        "train_loss": flow_matching_loss(ema_net, data[:TRAIN_LOSS_LATENTS], seed=0),
        "loss_curve": curve,
        "wall_s": round(wall, 2),
        "resumed_from": resumed_from,
    }
    return ema_net, metrics


# ---------------------------------------------------------------------------------- files


def _missing(path: Path, detail: str = "") -> MissingWeightsError:
    if path.resolve() == shipped("flow_aligned").resolve():
        cmd = "cspace train flow --encoder digits"
    elif path.resolve() == shipped("flow_plain").resolve():
        cmd = "cspace train flow --encoder digits-plain"
    else:
        cmd = f"cspace train flow --encoder digits|digits-plain|VAE_DIR --out {path}"
    return MissingWeightsError(
        f"no flow weights at {path} ({detail or 'the folder is missing'}: manifest.json and "
        f"{_WEIGHTS} expected). Train them with `{cmd}` (a few minutes on 2 CPU cores; see "
        "cspace.cli.flow), or from Python with "
        "cspace.experiments.flow_training.train_flow_for_encoder"
    )


#: the flow's folder kind (:mod:`cspace.io.folder`)
FLOW_KIND = FolderKind(
    format=FORMAT,
    version=FORMAT_VERSION,
    what="flow",
    a_what="a saved flow",
    error=FlowWeightsError,
    files=(_WEIGHTS,),
    fix="retrain it (cspace train flow) or restore the folder from a copy",
    missing=_missing,
    legacy=(FLOW_V1, manifest_v2((_WEIGHTS,))),
)


def save_flow(dir: str | os.PathLike, model: VelocityNet | FlowModel, meta: dict) -> Path:
    """Write ``manifest.json`` + ``model.safetensors`` (stored as ``model-<hash>.safetensors``)
    into the folder ``dir``; returns the path.

    Crash-safe and serialised with other writers (:func:`cspace.io.folder.write_folder`: the
    manifest is replaced last, readers see the old flow or the new one); an existing folder is
    replaced only if it is a saved flow (any layout) or empty. ``meta`` must
    be JSON serialisable (``meta["encoder"]``: the VAE folder name the latents come from;
    ``meta["space"]``: their :class:`~cspace.models.space.Space` as JSON, or a Space).
    """
    from safetensors.torch import save

    net = model.net if isinstance(model, FlowModel) else model
    if not isinstance(net, VelocityNet):
        raise TypeError(f"save_flow needs a VelocityNet or FlowModel; got {type(model).__name__}")
    meta = dict(meta)
    if isinstance(meta.get("space"), Space):
        meta["space"] = meta["space"].to_json()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    blob = save(tensors, metadata=_TENSOR_TAG)
    fields = {
        "config": net.config.to_dict(),
        "parameters": net.num_parameters(),
        "meta": json.loads(json.dumps(meta)),
    }
    return write_folder(dir, FLOW_KIND, fields, {_WEIGHTS: blob})


def load_flow(dir: str | os.PathLike | None = None) -> FlowModel:
    """Load a flow saved by :func:`save_flow` (default: the shipped ``flow_aligned``), or one in
    the older ``config.json`` layout.

    Checks the format, the size and SHA-256 of the weights, and every tensor's name and shape
    against the recorded architecture. Raises :class:`~cspace.io.errors.MissingWeightsError`
    (with the command that trains them) when the files are absent and :class:`FlowWeightsError`
    when they are unusable.
    """
    from safetensors.torch import load

    path = Path(dir) if dir is not None else shipped("flow_aligned")
    folder = read_folder(path, FLOW_KIND)
    mpath, wpath = folder.mpath, folder.file(_WEIGHTS)
    try:
        cfg = FlowConfig.from_dict(folder.manifest["config"])
        meta = dict(folder.manifest.get("meta") or {})
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise FlowWeightsError(f"{mpath} lacks or has a bad field: {err}", mpath) from err
    values = weights_values(folder.files[_WEIGHTS], wpath, FlowWeightsError)
    net = build_within(lambda: VelocityNet(cfg), values, wpath, mpath, FlowWeightsError)
    try:
        tensors = load(folder.files[_WEIGHTS])
    except Exception as err:  # safetensors raises its own error types
        raise FlowWeightsError(f"{wpath} is not a readable safetensors file: {err}", wpath) from err
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise FlowWeightsError(
            f"{wpath} does not match the architecture in {mpath.name}: missing {missing[:5]}, "
            f"unexpected {extra[:5]}, wrong shapes "
            f"{[(k, got[k], expected[k]) for k in wrong[:5]]}",
            wpath,
        )
    for k, v in tensors.items():
        if not bool(torch.isfinite(v).all()):
            raise FlowWeightsError(f"{wpath}: tensor {k} holds NaN or Inf", wpath)
    net.load_state_dict(tensors, strict=True)
    meta.setdefault("path", str(path))
    flow = FlowModel(net, meta)
    flow.space  # noqa: B018 - a malformed space record fails here, not at the first check
    return flow
