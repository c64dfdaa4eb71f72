"""``cspace toy``: unguided vs guided vs backtracking sampling on the exact Gaussian-mixture flow.

Every method starts from the same noises and is scored against exact truth:

* hit rate: fraction of samples inside a hard obstacle ball;
* energy distance to exact samples of the mixture restricted to the outside of the obstacles
  (rejection sampling), beside the floor that two exact sample sets of the same size show;
* NFE per sample (velocity evaluations), seconds.

The targets and noises come from ``seed``, the SDE's noise and the figure's paths from
:func:`guidance.seeding.derived_seed` ``(seed, "toy-sde")`` and ``(seed, "toy-paths")`` (no
stream of one seed is another seed's).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cspace.io.checks import check_output_folder
from cspace.models.metrics import energy_distance
from cspace.models.toy import BallObstacles, GaussianMixture, default_toy
from guidance import Backtrack, Guided, RepulsiveField, sample
from guidance.seeding import derived_seed
from obstacles import ObstacleSet

__all__ = ["ToySettings", "plot_toy", "run_toy", "toy_obstacle_set"]


@dataclass
class ToySettings:
    """Settings of ``cspace toy`` (the defaults are the README's numbers)."""

    dim: int = 2
    seed: int = 0
    steps: int = 50
    n: int = 2000
    q_star_factor: float = 1.5  # Q* = factor x hard radius
    strength: float = 3.0
    noise_scale: float = 1.0
    revert: int = 20
    max_retries: int = 20
    methods: tuple[str, ...] = field(
        default=(
            "unguided",
            "unguided-sde",
            "guided",
            "guided-noisy",
            "guided-sde",
            "backtrack",
            "guided-backtrack",
        )
    )


#: what each method runs: (sampler method, uses the field, backtracking, field mode)
METHOD_TABLE = {
    "unguided": ("euler", False, False, "clean"),
    "unguided-sde": ("sde", False, False, "clean"),
    "guided": ("euler", True, False, "clean"),
    "guided-noisy": ("euler", True, False, "noisy"),
    "guided-sde": ("sde", True, False, "clean"),
    "backtrack": ("sde", False, True, "clean"),
    "guided-backtrack": ("sde", True, True, "clean"),
}


def toy_obstacle_set(obstacles: BallObstacles, q_star_factor: float = 1.5) -> ObstacleSet:
    """The toy's ball obstacles as an :class:`ObstacleSet`.

    Hard radius = ball radius, ``Q* = q_star_factor x radius``, ``eta = (Q*/1.8)^3`` so that the
    force at a given fraction of Q* is the same whatever the ball size (1.8 is Q* of the 2-D toy's
    mode obstacles).
    """
    if not q_star_factor > 1:
        raise ValueError(
            f"q_star_factor must be > 1 (Q* beyond the hard radius); got {q_star_factor}"
        )
    radius = obstacles.radii.double().numpy()
    q = radius * q_star_factor
    return ObstacleSet.from_embeddings(
        obstacles.centers.double().numpy(),
        q_star=q,
        eta=(q / 1.8) ** 3,
        radius=radius,
        labels="ball",
        sources="cspace.models.toy.default_toy",
    )


def _run_method(name, mix, fld, noise, settings, seed, return_trajectory=False):
    method, guided, bt, mode = METHOD_TABLE[name]
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    velocity = (
        Guided(mix.velocity, fld, strength=settings.strength, mode=mode) if guided else mix.velocity
    )
    out = sample(
        velocity,
        noise,
        steps=settings.steps,
        method=method,
        noise_scale=settings.noise_scale,
        backtrack=Backtrack(settings.revert, settings.max_retries, field=fld) if bt else None,
        generator=g,
        return_trajectory=return_trajectory,
        progress=False,
    )
    return out, time.perf_counter() - t0


def run_toy(
    settings: ToySettings | None = None,
    out_dir: str | Path | None = None,
    *,
    progress: bool = False,
) -> dict:
    """Run every method of ``settings.methods``; returns the report (and writes a PNG for 2-D).
    ``progress``: a tqdm bar over the methods on stderr."""
    from tqdm.auto import tqdm

    s = settings or ToySettings()
    unknown = [m for m in s.methods if m not in METHOD_TABLE]
    if unknown:
        raise ValueError(f"unknown toy methods {unknown}; choose from {sorted(METHOD_TABLE)}")
    if s.n < 2 or s.steps < 1:
        raise ValueError(f"need n >= 2 and steps >= 1; got n={s.n}, steps={s.steps}")
    if out_dir is not None and s.dim == 2:
        check_output_folder(out_dir, "the folder of the figure (--out)")
    mix, balls = default_toy(s.dim)
    oset = toy_obstacle_set(balls, s.q_star_factor)
    fld = RepulsiveField(oset)
    gen = torch.Generator().manual_seed(s.seed)
    target = mix.sample_outside(s.n, balls, gen)
    target2 = mix.sample_outside(s.n, balls, gen)
    noise = torch.randn(s.n, s.dim, generator=gen, dtype=torch.float64)
    mass = mix.mass_inside(balls, seed=s.seed)
    report = {
        "problem": {
            "dim": s.dim,
            "modes": mix.means.shape[0],
            "obstacles": len(oset),
            "radius": oset.radius.tolist(),
            "q_star": oset.q_star.tolist(),
            "eta": oset.eta.tolist(),
            "mass_inside": mass,
        },
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(s).items()},
        "energy_distance_floor": energy_distance(target, target2),
        "rejection_nfe": s.steps / max(1e-12, 1 - mass),
        "methods": {},
    }
    outputs = {}
    bar = tqdm(s.methods, desc="toy", unit="method", disable=not progress, dynamic_ncols=True)
    for name in bar:
        bar.set_postfix_str(name)
        out, secs = _run_method(name, mix, fld, noise, s, derived_seed(s.seed, "toy-sde"))
        outputs[name] = out
        report["methods"][name] = {
            "hit_rate": float(balls.inside(out.samples).double().mean()),
            "energy_distance": energy_distance(out.samples, target),
            "nfe": out.nfe_per_sample,
            "nfe_total": out.nfe,
            "retries": int(out.retries.sum()),
            "seconds": secs,
        }
    if out_dir is not None and s.dim == 2:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        png = out_dir / "toy.png"
        plot_toy(mix, balls, fld, target, noise, s, png, outputs)
        report["png"] = str(png)
    return report


def format_table(report: dict) -> str:
    """The report as a plain-text table."""
    rows = [
        f"{'method':<18}{'hit rate':>10}{'energy dist':>13}{'NFE/sample':>12}{'retries':>9}{'seconds':>9}"
    ]
    for name, m in report["methods"].items():
        rows.append(
            f"{name:<18}{m['hit_rate']:>10.4f}{m['energy_distance']:>13.4f}{m['nfe']:>12.1f}"
            f"{m['retries']:>9d}{m['seconds']:>9.2f}"
        )
    rows.append(
        f"{'exact (rejection)':<18}{0.0:>10.4f}{report['energy_distance_floor']:>13.4f}"
        f"{report['rejection_nfe']:>12.1f}{'-':>9}{'-':>9}"
    )
    p = report["problem"]
    rows.append(
        f"dim={p['dim']}, {p['modes']} modes, {p['obstacles']} obstacles covering "
        f"{100 * p['mass_inside']:.1f}% of the mass; energy distance to exact obstacle-free samples "
        f"(floor = two exact sets)"
    )
    return "\n".join(rows)


def plot_toy(
    mix: GaussianMixture,
    balls: BallObstacles,
    fld: RepulsiveField,
    target: torch.Tensor,
    noise: torch.Tensor,
    s: ToySettings,
    path: Path,
    outputs: dict,
    n_paths: int = 40,
) -> None:
    """Four panels: exact target; unguided; guided (streamlines of the guided velocity at
    t = 0.3, trajectories); guided + backtracking."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    lim = 6.0
    panels = [("exact obstacle-free target", None)]
    for name in ("unguided", "guided", "guided-backtrack"):
        if name in outputs:
            panels.append((name, name))
    fig = Figure(figsize=(4.2 * len(panels), 4.4))  # no pyplot: the caller's backend is untouched
    axes = fig.subplots(1, len(panels), squeeze=False)
    sub = noise[:n_paths]
    for ax, (title, name) in zip(axes[0], panels, strict=True):
        if name is None:
            pts = target
        else:
            pts = outputs[name].samples
            if name in ("unguided", "guided"):
                tr, _ = _run_method(
                    name,
                    mix,
                    fld,
                    sub,
                    s,
                    derived_seed(s.seed, "toy-paths"),
                    return_trajectory=True,
                )
                path_xy = tr.trajectory[..., :2].numpy()
                for j in range(path_xy.shape[1]):
                    ax.plot(path_xy[:, j, 0], path_xy[:, j, 1], lw=0.6, color="tab:gray", alpha=0.7)
            if name == "guided":
                n = 60
                g1 = torch.linspace(-lim, lim, n, dtype=torch.float64)
                xx, yy = torch.meshgrid(g1, g1, indexing="xy")
                grid = torch.stack([xx.flatten(), yy.flatten()], 1)
                if s.dim > 2:
                    grid = torch.cat(
                        [grid, torch.zeros(grid.shape[0], s.dim - 2, dtype=grid.dtype)], 1
                    )
                t = torch.full((grid.shape[0],), 0.3, dtype=grid.dtype)
                v = Guided(mix.velocity, fld, strength=s.strength)(grid, t)
                # the sampler moves along -v (t decreases)
                ax.streamplot(
                    xx.numpy(),
                    yy.numpy(),
                    -v[:, 0].reshape(n, n).numpy(),
                    -v[:, 1].reshape(n, n).numpy(),
                    density=0.9,
                    color="tab:blue",
                    linewidth=0.5,
                    arrowsize=0.6,
                )
        p = pts[:, :2].numpy()
        ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.5, color="tab:orange" if name else "tab:green")
        for c, r, q in zip(balls.centers, balls.radii, fld.obstacles.q_star, strict=True):
            ax.add_patch(Circle((float(c[0]), float(c[1])), float(r), color="tab:red", alpha=0.25))
            ax.add_patch(
                Circle(
                    (float(c[0]), float(c[1])),
                    float(q),
                    color="tab:red",
                    fill=False,
                    ls="--",
                    lw=0.8,
                )
            )
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        if name is None:
            ax.set_title(title, fontsize=10)
        else:
            hit = float(balls.inside(outputs[name].samples).double().mean())
            ax.set_title(
                f"{title}: hit {100 * hit:.1f}%, NFE {outputs[name].nfe_per_sample:.0f}",
                fontsize=10,
            )
    fig.suptitle("cspace toy: red = hard obstacle balls, dashed = Q*", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
