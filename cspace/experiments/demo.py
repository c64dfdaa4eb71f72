"""``cspace demo``: keep a digit class out of generated digits, from a few example images.

On the embedded default (scikit-learn's digits, the shipped aligned VAE and latent flow model):

1. build an obstacle set from the shipped example images of one class (``examples/digits/<c>``),
   embedded in the C-space of the aligned VAE;
2. train a preference classifier (the other classes' examples are "good", the class is "bad");
3. sample ``n`` digits unguided, guided by the obstacle set, and guided by the classifier obstacle,
   from the same noises, with the marginal-preserving SDE sampler; the guided arms add the
   repulsive field and collision backtracking (a sample whose clean estimate enters an
   obstacle's hard radius goes back ``revert`` steps and draws that segment's noise again);
4. judge every sample with an independent classifier trained on pixels of a split that neither
   the teacher, the VAEs nor the flow model saw.

5. a ``rejection`` arm, the baseline every avoidance method is measured against: the unguided
   sampler's draws (noise from seed ``seed + 2``, so the other arms are unchanged) tested with
   the obstacle set's hard radius, redrawn until ``n`` pass (at most :data:`REJECTION_DRAWS`
   draws per sample); its NFE per sample counts every discarded draw;
6. the **membership quality** of the obstacle set (:func:`membership_quality`): the share of the
   held-out images of the avoided class inside its hard radius and inside Q* (recall), and of
   the other classes (false positives). The judge sees pixels, the field sees the C-space: the
   recall bounds what any arm that uses only the examples can avoid.

It writes ``report.json``, PNG grids of each arm and a UMAP figure of the C-space with the
obstacles and a few guided and unguided trajectories of the clean estimate.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cspace.io.checks import check_memory, check_output_folder
from cspace.io.files import write_file_atomic
from cspace.models.devices import resolve_device
from guidance.sampling import METHODS

__all__ = [
    "ALL_ARMS",
    "ARMS",
    "DemoSettings",
    "demo_obstacles",
    "example_files",
    "format_report",
    "membership_quality",
    "run_demo",
    "sample_arm",
]

ARMS = ("unguided", "guided", "classifier")
#: every arm of the report: the sampled arms, then the rejection baseline
ALL_ARMS = (*ARMS, "rejection")
#: the most draws per returned sample the demo's rejection arm may spend
REJECTION_DRAWS = 20
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "digits"


@dataclass
class DemoSettings:
    """Settings of ``cspace demo``; the defaults are the README's numbers.

    The defaults of ``strength``, ``classifier_strength``, ``q_star_scale`` and ``radius_scale``
    were chosen by a sweep on class 0 (``benchmarks/demo_table.py --field-only`` and its grid
    options) for the demo's targets: guided avoided rate <= 10% of unguided, other classes
    within 3 points, judge confidence down by <= 2 points. ``benchmarks/demo_table.py --classes
    0-9`` measures them on every class.
    """

    avoid_class: int = 0
    n: int = 1000
    seed: int = 0
    steps: int = 50
    device: str = "cpu"
    encoder: str = "digits"  # "digits" (aligned VAE) or "digits-plain" (VF weight 0)
    method: str = "sde"  # sampler of every arm: "sde" (needed for backtracking), "euler", "heun"
    strength: float = 5.0  # obstacle-set arm
    classifier_strength: float = 0.3  # classifier arm
    q_star_scale: float = 1.5  # Q* = q_star_scale x the auto rule (median k-th NN distance)
    radius_scale: float = 1.0  # hard radius = radius_scale x the auto rule's distance
    backtrack: bool = True  # collision backtracking in the guided arms (method "sde" only)
    max_examples: int = 50
    umap: bool = True
    paths: int = 6  # trajectories drawn in the UMAP figure per arm


def _space(encoder: str):
    """Encoder and flow model of one C-space."""
    from cspace.models.encoders import Encoder
    from cspace.models.flow import load_flow
    from cspace.models.shipped import SPACES, shipped

    if encoder not in SPACES:
        raise ValueError(f"unknown demo encoder {encoder!r}; choose one of {tuple(SPACES)}")
    vae, flow = SPACES[encoder]
    return Encoder.from_aligned(shipped(vae)), load_flow(shipped(flow))


def example_files(cls: int, limit: int) -> list[Path]:
    folder = EXAMPLES / str(cls)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"example images for class {cls} not found at {folder}; the demo needs the repository's "
            "examples/ folder (install with `pip install -e .` from a checkout)"
        )
    return sorted(p for p in folder.iterdir() if p.suffix == ".png")[:limit]


def sample_arm(flow, noise: torch.Tensor, s: DemoSettings, field=None, strength: float = 0.0,
               callback=None):  # fmt: skip
    """One arm of the demo from ``noise`` (n, C, H, W): ``s.method`` with ``s.steps`` steps, the
    field at ``strength`` and, when ``s.backtrack``, collision backtracking; the SDE's noise
    from seed ``s.seed + 1`` (the same for every arm). Returns :class:`guidance.SampleOutput`."""
    from guidance import Backtrack, Guided, sample

    guided = field is not None
    return sample(
        Guided(flow, field, strength=strength) if guided else flow,
        noise,
        steps=s.steps,
        method=s.method,
        backtrack=Backtrack() if (s.backtrack and guided) else None,
        generator=torch.Generator(noise.device).manual_seed(s.seed + 1),
        callback=callback,
        progress=False,
    )


def median(values) -> float:
    """The median of ``values`` (N,) that cannot overflow: the middle pair ``a <= b`` is averaged
    as ``a + (b - a) / 2`` (``np.median`` adds them, and two values near the float maximum give
    inf)."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size == 0:
        raise ValueError("the median of no values")
    a, b = v[(v.size - 1) // 2], v[v.size // 2]
    return float(a + (b - a) / 2)


def demo_obstacles(encoder, s: DemoSettings):
    """The demo's obstacle set: the example images of ``s.avoid_class`` (at most
    ``s.max_examples``) embedded by ``encoder``, with Q* = ``q_star_scale`` x the auto rule and
    hard radius = ``radius_scale`` x the auto rule. Returns ``(obstacle_set, auto_q_star)``."""
    from obstacles.from_images import build_from_images

    files = example_files(s.avoid_class, s.max_examples)
    oset = build_from_images(files, encoder, label=f"digit-{s.avoid_class}")
    auto_q = oset.q_star.copy()
    for name in ("q_star_scale", "radius_scale"):
        with np.errstate(over="ignore"):
            scaled = getattr(s, name) * auto_q
        if not np.all(np.isfinite(scaled)):
            raise ValueError(
                f"{name} = {getattr(s, name):g} times the auto rule's Q* ({float(auto_q.max()):.4g})"
                f" overflows; lower it{' (--q-star-scale)' if name == 'q_star_scale' else ''}"
            )
    oset.set_parameters(
        q_star=s.q_star_scale * auto_q,
        radius=s.radius_scale * auto_q,
        note=f"demo: q_star x{s.q_star_scale}, radius x{s.radius_scale} of the auto rule",
    )
    return oset, auto_q


def membership_quality(encoder, oset, avoid_class: int, examples=None) -> dict:
    """How well the obstacle set's membership matches the class it stands for, on the images
    that neither the VAE, the flow nor the set saw (the judge's and the held-out splits, without
    the set's own examples): the share of those images of ``avoid_class`` whose embedding
    lies inside some obstacle's hard radius (``recall_radius``) or within its Q*
    (``recall_q_star``), and the same shares of the other classes' images
    (``false_positive_radius``, ``false_positive_q_star``), with the per-class shares
    (``inside_radius_by_class``, ``inside_q_star_by_class``, 10 each) and the counts.

    The shipped example images are held-out digits: ``examples`` (M, 1, 8, 8), the set's own
    images, are left out of the count (a held-out image within 0.05 of one in pixel space, the
    PNG rounding), since an obstacle always contains its own example (``excluded``)."""
    from cspace.models.data import digits

    parts = [digits("judge"), digits("heldout")]
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    excluded = 0
    if examples is not None and len(examples):
        flat = images.reshape(images.shape[0], -1).double()
        ex = torch.as_tensor(examples).reshape(len(examples), -1).double()
        own_image = torch.cdist(flat, ex).min(1).values < 0.05
        excluded = int(own_image.sum())
        images, labels = images[~own_image], labels[~own_image]
    dev = next(encoder.vae.parameters()).device
    emb = encoder.embed(encoder.encode(images.to(dev))).cpu().double()
    obs = torch.from_numpy(oset.embeddings.astype(np.float64))
    dist = torch.cdist(emb, obs, compute_mode="donot_use_mm_for_euclid_dist")  # (M, N)
    radius = torch.from_numpy(oset.radius.astype(np.float64))
    q = torch.from_numpy(oset.q_star.astype(np.float64))
    in_r = (dist < radius[None]).any(1)
    in_q = (dist < q[None]).any(1)
    own = labels == int(avoid_class)

    def share(mask, rows) -> float:
        return float(mask[rows].double().mean()) if bool(rows.any()) else 0.0

    return {
        "recall_radius": share(in_r, own),
        "recall_q_star": share(in_q, own),
        "false_positive_radius": share(in_r, ~own),
        "false_positive_q_star": share(in_q, ~own),
        "inside_radius_by_class": [share(in_r, labels == c) for c in range(10)],
        "inside_q_star_by_class": [share(in_q, labels == c) for c in range(10)],
        "heldout_class": int(own.sum()),
        "heldout_other": int((~own).sum()),
        "excluded": excluded,
    }


def rejection_arm(flow, shape, s: DemoSettings, field, device):
    """The rejection arm: :func:`guidance.search.rejection.search` with the unguided sampler
    (``s.method``, ``s.steps``) and the field's hard radius as the membership test, noise from
    seed ``s.seed + 2``, at most :data:`REJECTION_DRAWS` draws per sample. Returns the search
    result (fewer than ``s.n`` samples when the budget ran out: ``records["shortfall"]``)."""
    from guidance.search import CallableVerifier, rejection

    cost = rejection.draw_cost(s.steps, s.method)
    return rejection.search(
        flow, shape, CallableVerifier(lambda x: torch.zeros(x.shape[0]), name="none"),
        REJECTION_DRAWS * int(s.n) * cost, field=field, n_return=int(s.n), steps=s.steps,
        generator=torch.Generator(device).manual_seed(s.seed + 2), method=s.method,
        dtype=torch.float32, device=device,
    )  # fmt: skip


def _grid_png(images: torch.Tensor, path: Path, nrow: int = 10, scale: int = 4) -> None:
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid((images[: nrow * nrow] + 1) / 2, nrow=nrow, padding=1, pad_value=1.0)
    arr = (grid[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="png")
    write_file_atomic(path, buf.getvalue())


def run_demo(
    settings: DemoSettings | None = None, out_dir: str | Path | None = "cspace-demo"
) -> dict:
    """Run the demo; returns the report (also written to ``out_dir/report.json``)."""
    from cspace.models.judge import Judge, copy_rate, nearest_train_distance
    from cspace.models.metrics import diversity
    from guidance import ClassifierField, RepulsiveField
    from obstacles.classifier import PreferenceClassifier

    s = settings or DemoSettings()
    if not 0 <= s.avoid_class <= 9:
        raise ValueError(f"--class must be a digit 0..9; got {s.avoid_class}")
    if s.n < 1 or s.steps < 1:
        raise ValueError(f"need n >= 1 and steps >= 1; got n={s.n}, steps={s.steps}")
    if s.method not in METHODS:
        raise ValueError(f"unknown sampler method {s.method!r}; choose one of {METHODS}")
    if s.backtrack and s.method != "sde":
        raise ValueError(
            f"backtracking re-draws noise, so it needs method='sde' (got {s.method!r}); "
            "pass backtrack=False (--no-backtrack) for a deterministic sampler"
        )
    for name in ("strength", "classifier_strength", "q_star_scale", "radius_scale"):
        val = getattr(s, name)
        if not (np.isfinite(val) and val >= 0) or (name == "q_star_scale" and val == 0):
            raise ValueError(f"{name} must be a finite number >= 0 (q_star_scale > 0); got {val}")
    device = resolve_device(s.device)
    if out_dir is not None:
        check_output_folder(out_dir, "the output folder (--out)")
    check_memory(
        16 * int(s.n) * 32 * 4 + 8 * int(s.n) * 64 * 4,
        f"{int(s.n):,} samples per arm (latents and 8x8 images, x3 arms)",
        "lower --n",
    )
    t_start = time.perf_counter()
    torch.manual_seed(s.seed)

    encoder, flow = _space(s.encoder)
    encoder.vae.to(device)
    flow.to(device)
    judge = Judge.fit(seed=s.seed)

    # obstacles from the example images of the avoided class; the classifier also sees the others
    oset, auto_q = demo_obstacles(encoder, s)
    good_files = [
        f for c in range(10) if c != s.avoid_class for f in example_files(c, s.max_examples)
    ]
    from cspace.io.images import load_images

    good_emb = encoder.embed(encoder.encode(load_images(good_files)[0].to(device))).cpu().numpy()
    clf = PreferenceClassifier.fit(good_emb, oset.embeddings, seed=s.seed, space=oset.space)
    fields = {
        "guided": (RepulsiveField(oset), s.strength),
        "classifier": (ClassifierField(clf), s.classifier_strength),
    }

    shape = encoder.latent_shape((8, 8))
    gen = torch.Generator().manual_seed(s.seed)
    noise = torch.randn((s.n, *shape), generator=gen).to(device)
    report: dict = {
        "settings": asdict(s),
        "space": {"encoder": encoder.name, "dim": int(np.prod(shape))},
        "obstacles": {
            "count": len(oset),
            "q_star": median(oset.q_star),
            "radius": median(oset.radius),
            "auto_q_star": median(auto_q),
            "eta": median(oset.eta),
            "examples": str(EXAMPLES / str(s.avoid_class)),
        },
        "classifier": {"heldout_accuracy": float(clf.accuracy), "q_star": float(clf.q_star)},
        "judge": {"heldout_accuracy": float(judge.accuracy)},
        "arms": {},
    }
    samples, paths = {}, {}
    for arm in ARMS:
        fld, strength = fields.get(arm, (None, 0.0))
        x0_path: list[torch.Tensor] = []

        def keep(info, store=x0_path):
            if info["index"].numel() and int(info["index"][0]) == 0:
                store.append(info["x0_hat"][: s.paths].detach().cpu())

        t0 = time.perf_counter()
        out = sample_arm(flow, noise, s, fld, strength, callback=keep)
        images = encoder.decode(out.samples).cpu()
        secs = time.perf_counter() - t0
        rep = judge.report(images)
        nn = nearest_train_distance(images)
        report["arms"][arm] = {
            "avoided_rate": float(rep["class_shares"][s.avoid_class]),
            "class_shares": [float(v) for v in rep["class_shares"]],
            "judge_confidence": float(rep["confidence"]),
            "diversity": float(diversity(images)),
            "nearest_train_distance": float(nn.mean()),
            "copy_rate": float(copy_rate(images)),
            "nfe": out.nfe_per_sample,
            "backtrack_retries": int(out.retries.sum()) if out.retries is not None else 0,
            "seconds": secs,
        }
        samples[arm] = images
        paths[arm] = torch.stack(x0_path, 1) if x0_path else None  # (paths, steps, ...)

    # the baseline: unguided draws tested with the obstacle set's hard radius (its own noise)
    t0 = time.perf_counter()
    rej = rejection_arm(flow, shape, s, fields["guided"][0], device)
    images = encoder.decode(rej.samples).cpu()
    rep = judge.report(images)
    report["arms"]["rejection"] = {
        "avoided_rate": float(rep["class_shares"][s.avoid_class]),
        "class_shares": [float(v) for v in rep["class_shares"]],
        "judge_confidence": float(rep["confidence"]),
        "diversity": float(diversity(images)),
        "nearest_train_distance": float(nearest_train_distance(images).mean()),
        "copy_rate": float(copy_rate(images)),
        "nfe": rej.nfe_per_sample,
        "draws": int(rej.records["draws"]),
        "rejected_share": float(rej.records["inside_estimate"]),
        "shortfall": int(rej.records["shortfall"]),
        "seconds": time.perf_counter() - t0,
    }
    samples["rejection"] = images
    own_examples = load_images(example_files(s.avoid_class, s.max_examples))[0]
    report["membership"] = membership_quality(encoder, oset, s.avoid_class, own_examples)
    report["seconds"] = time.perf_counter() - t_start

    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        for arm, images in samples.items():
            files[f"grid_{arm}"] = str(out / f"samples_{arm}.png")
            _grid_png(images, Path(files[f"grid_{arm}"]))
        if s.umap:
            files["umap"] = str(out / "cspace_umap.png")
            _umap_figure(encoder, oset, paths, s, Path(files["umap"]))
        report["files"] = files
        report["seconds"] = time.perf_counter() - t_start
        write_file_atomic(out / "report.json", json.dumps(report, indent=1))
        report["files"]["report"] = str(out / "report.json")
    return report


def _umap_figure(encoder, oset, paths: dict, s: DemoSettings, path: Path) -> None:
    """UMAP of held-out C-space embeddings by class, the obstacles, and clean-estimate paths."""
    import umap
    from matplotlib.figure import Figure

    from cspace.models.data import digits

    images, labels = digits("heldout")
    dev = next(encoder.vae.parameters()).device
    emb = encoder.embed(encoder.encode(images.to(dev))).cpu().numpy()
    reducer = umap.UMAP(n_neighbors=15, min_dist=0.2, random_state=s.seed, n_jobs=1)
    xy = reducer.fit_transform(emb)
    obs_xy = reducer.transform(oset.embeddings)
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.subplots()
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels.numpy(), cmap="tab10", s=6, alpha=0.6)
    fig.colorbar(sc, ax=ax, ticks=range(10), label="held-out digit class")
    ax.scatter(
        obs_xy[:, 0],
        obs_xy[:, 1],
        marker="x",
        color="black",
        s=30,
        label=f"obstacles (digit {s.avoid_class})",
    )
    colours = {"unguided": "tab:gray", "guided": "tab:red", "classifier": "tab:purple"}
    for arm, p in paths.items():
        if p is None or arm not in colours:
            continue
        k, steps = p.shape[:2]
        pts = reducer.transform(p.reshape(k * steps, -1).numpy()).reshape(k, steps, 2)
        for j in range(k):
            ax.plot(
                pts[j, :, 0],
                pts[j, :, 1],
                color=colours[arm],
                lw=1.0,
                alpha=0.8,
                label=arm if j == 0 else None,
            )
            ax.scatter(
                pts[j, -1, 0], pts[j, -1, 1], color=colours[arm], s=18, edgecolor="black", zorder=3
            )
    ax.set_title(f"C-space ({encoder.name}): UMAP of held-out digits; paths of x0_hat", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_file_atomic(path, buf.getvalue())


def format_report(report: dict) -> str:
    """The report as a plain-text table and class histogram."""
    c = report["settings"]["avoid_class"]
    head = f"{'arm':<12}{'avoided':>9}{'judge conf':>12}{'diversity':>11}{'NN-train':>10}{'copies':>8}{'NFE':>6}{'seconds':>9}"
    rows = [head]
    for arm, m in report["arms"].items():
        rows.append(
            f"{arm:<12}{100 * m['avoided_rate']:>8.1f}%{100 * m['judge_confidence']:>11.1f}%{m['diversity']:>11.3f}"
            f"{m['nearest_train_distance']:>10.3f}{100 * m['copy_rate']:>7.1f}%{m['nfe']:>6.0f}{m['seconds']:>9.1f}"
        )
    rej = report["arms"].get("rejection")
    if rej is not None:
        rows.append(
            f"rejection: {rej['draws']} draws, {100 * rej['rejected_share']:.1f}% inside a hard "
            f"radius and discarded"
            + (f"; {rej['shortfall']} samples short" if rej["shortfall"] else "")
        )
    mem = report.get("membership")
    if mem is not None:
        rows.append(
            f"membership (unseen digits): class {c} inside a hard radius "
            f"{100 * mem['recall_radius']:.1f}%, within Q* {100 * mem['recall_q_star']:.1f}% "
            f"(recall); other classes {100 * mem['false_positive_radius']:.1f}% / "
            f"{100 * mem['false_positive_q_star']:.1f}% (false positives)"
        )
    rows.append("")
    rows.append("class shares (%)  " + "".join(f"{k:>6d}" for k in range(10)))
    for arm, m in report["arms"].items():
        rows.append(f"{arm:<18}" + "".join(f"{100 * v:>6.1f}" for v in m["class_shares"]))
    rows.append(
        f"avoided class {c}; {report['obstacles']['count']} example images as obstacles in {report['space']['encoder']} "
        f"(d={report['space']['dim']}); judge held-out accuracy {100 * report['judge']['heldout_accuracy']:.1f}%; "
        f"classifier held-out accuracy {100 * report['classifier']['heldout_accuracy']:.1f}%; total {report['seconds']:.0f} s"
    )
    return "\n".join(rows)
