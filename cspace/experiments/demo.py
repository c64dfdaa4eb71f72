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
   the teacher, the VAEs nor the flow model saw;
5. a ``rejection`` arm, the baseline every avoidance method is measured against: the unguided
   sampler's draws tested with the obstacle set's hard radius, redrawn until ``n`` pass (at
   most :data:`REJECTION_DRAWS` draws per sample); its first round is the unguided arm's own
   samples (common draws, as the guided arms share the unguided arm's noises, so that the
   arms' difference is not the sampling noise of an independent set), its redraws take noise
   from the seed ``derived_seed(seed, "demo-rejection")``; its NFE per sample counts every
   draw, the first round and every discarded one;
   a ``rejection-pu`` arm, the same rejection with another membership test: a region learnt
   from the obstacle set's examples against the unguided arm's samples (positive-unlabelled;
   ``pu_region="kernel"``, the default: :class:`obstacles.KernelRegion`, an RBF kernel model,
   ``g >= 0.4 c`` with Elkan and Noto's ``c``; ``"linear"``: the half-space of
   :meth:`obstacles.PreferenceClassifier.fit_positive_unlabelled`, ``g >= c / 2``),
   tested instead of the hard radii; it uses the avoided class's examples and
   the model's own samples, no other class's examples; redraws from the ``demo-rejection-pu``
   stream;
6. a ``twisted-smc`` arm (:func:`guidance.search.twisted.search`): particles on the SDE, twisted
   by the chance to end outside the obstacle set's hard radii, with that hard radius as the
   final exact test (no returned sample is inside), at most :data:`TWISTED_NFE` x the unguided
   arm's NFE per sample (``TWISTED_NFE x n`` particles in one system; noise from
   ``derived_seed(seed, "demo-twisted")``), and a ``negation`` arm: one pass of the negation
   denoiser (:class:`guidance.sampling.NegationDenoiser`, Safe Denoiser) with the obstacle set's
   examples as the negation set, from the guided arms' noises. Both use only the avoided class's
   examples (the obstacle set), not the other classes' (which the classifier arm learns from);
   their spread ``s(t)`` uses the within-class scale of the C-space (:func:`within_class_scale`);
7. the **membership quality** of the obstacle set (:func:`membership_quality`): the share of the
   held-out images of the avoided class inside its hard radius and inside Q* (recall), and of
   the other classes (false positives). The judge sees pixels, the field sees the C-space: the
   recall bounds what any arm that uses only the examples can avoid.

**Seeds.** The initial noises come from ``seed``; every other stream (the SDE's noise, the
rejection arms' redraws, the twisted SMC's particles) from
:func:`guidance.seeding.derived_seed` ``(seed, label)``, so runs over seeds 0, 1 and 2 share no
draws (with ``seed + 1``, ``seed + 2``, ... the rejection arm's redraws at seed 0 were drawn from
the stream of the unguided arm's noises at seed 2).

It writes ``report.json``, PNG grids of each arm and, when asked (``umap=True``, ``--umap``), a
UMAP figure of the C-space with the obstacles and a few paths of the clean estimate, one per arm.

Your own obstacle set (``obstacles=SET``, ``--obstacles``) or classifier (``classifier=DIR``,
``--classifier``) replaces the one built from the examples, with the same sampler and judge; it
must be in the demo's C-space (``--encoder``, 8 x 8 images): one of another space is refused with
both spaces named.

**Fashion-MNIST** (``--data fashion``, ``DemoSettings(encoder="fashion")``,
:func:`settings_for`): the same arms, figures and report on the 28 x 28 clothes. What differs is
described by one :class:`DemoData` per data set (:data:`DATA`), not by other code paths: the
velocity model is the UNet of the shipped diffusers pipeline (``cspace/weights/fashion_pipeline``,
:class:`cspace.models.latent_pipeline.LatentFlowPipeline`) as a velocity
(:class:`guidance.integrations.velocity.DiffusersVelocity`) in the aligned VAE's 4 x 7 x 7
C-space; the examples are ``examples/fashion/<class>``; the judge is
:class:`cspace.models.fashion_judge.FashionJudge`; the held-out images of the membership figures
and the UMAP are the shipped test slice (``fashion_heldout()``, 2,000 images), which none of the
examples is part of; the "train" images of the within-class scale and of the nearest-neighbour
and copy figures are the 500 shipped example images (train split; the full train split is not
shipped). Its report adds the **membership of every class's obstacle set in both twin spaces**
(the aligned and the plain VAE, :func:`membership_by_space`).
"""

from __future__ import annotations

import functools
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cspace.io.checks import check_memory, check_output_folder
from cspace.io.files import write_file_atomic
from cspace.io.images import save_grid_png
from cspace.models.devices import resolve_device
from cspace.models.shipped import FASHION_ENCODERS
from guidance.sampling import METHODS
from guidance.seeding import derived_seed

__all__ = [
    "ALL_ARMS",
    "ARMS",
    "DATA",
    "FASHION_SPACES",
    "TWISTED_NFE",
    "DemoData",
    "DemoSettings",
    "data_of",
    "demo_obstacles",
    "example_files",
    "format_report",
    "largest_shift",
    "membership_by_space",
    "membership_quality",
    "negation_arm",
    "renormalised_shift",
    "run_demo",
    "sample_arm",
    "settings_for",
    "twisted_arm",
    "within_class_scale",
]

ARMS = ("unguided", "guided", "classifier")
#: every arm of the report: the sampled arms, the rejection baseline, rejection with the
#: positive-unlabelled membership, then the two arms that use only the obstacle set (twisted SMC
#: and the negation denoiser)
ALL_ARMS = (*ARMS, "rejection", "rejection-pu", "twisted-smc", "negation")
#: the most draws per returned sample the demo's rejection arm may spend
REJECTION_DRAWS = 20
#: the twisted SMC arm's NFE per sample as a multiple of the unguided arm's (its particles:
#: ``TWISTED_NFE x n`` in one particle system)
TWISTED_NFE = 1.5
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "digits"
FASHION_EXAMPLES = EXAMPLES.parent / "fashion"
#: the Fashion-MNIST classes the judge confuses most (docs/fashion.md), shown side by side
CLOSE_FASHION = (0, 6, 2, 4)


@dataclass(frozen=True)
class DemoData:
    """What the demo needs to know of one data set; the loaders keyed by :attr:`name`
    (:func:`_space`, :func:`_judge`, :func:`_images`) do the rest.

    Attributes:
        name: ``"digits"`` or ``"fashion"`` (``--data``).
        noun: what the log calls the samples (``"sampling 1000 digits"``).
        classes: the class names, in label order.
        short: a column label of at most 5 characters per class (the class-share table).
        image_size: (H, W) of the images.
        examples: the folder of the example images, one sub-folder per class ...
        folders: ... named so, in label order.
        label: the obstacle set's label prefix (``digit-0``, ``fashion-coat``).
        encoders: the ``--encoder`` names of its C-spaces with a velocity model (the first is
            the default).
        twins: (space name, shipped VAE folder) of the spaces whose membership the report gives
            for every class (:func:`membership_by_space`; none for digits).
        close: classes shown side by side in the printed report (the judge's confusions).
        grid_scale: the PNG grids' nearest-neighbour upscale.
        defaults: settings that differ from :class:`DemoSettings`' (the digits values).
    """

    name: str
    noun: str
    classes: tuple[str, ...]
    short: tuple[str, ...]
    image_size: tuple[int, int]
    examples: Path
    folders: tuple[str, ...]
    label: str
    encoders: tuple[str, ...]
    twins: tuple[tuple[str, str], ...] = ()
    close: tuple[int, ...] = ()
    grid_scale: int = 4
    defaults: tuple[tuple[str, object], ...] = ()

    def class_name(self, c: int) -> str:
        """How the report names class ``c``: ``class 3`` for digits, ``Coat`` for clothes."""
        return f"class {c}" if self.name == "digits" else self.classes[c]


def _fashion_names():
    from cspace.models.data import FASHION_CLASSES, FASHION_SLUGS

    return FASHION_CLASSES, FASHION_SLUGS


DATA = {
    "digits": DemoData(
        name="digits",
        noun="digits",
        classes=tuple(str(c) for c in range(10)),
        short=tuple(str(c) for c in range(10)),
        image_size=(8, 8),
        examples=EXAMPLES,
        folders=tuple(str(c) for c in range(10)),
        label="digit-",
        encoders=("digits", "digits-plain"),
    ),
    "fashion": DemoData(
        name="fashion",
        noun="clothes",
        classes=_fashion_names()[0],
        short=("Tshrt", "Trous", "Pullo", "Dress", "Coat", "Sandl", "Shirt", "Snkr", "Bag", "Boot"),
        image_size=(28, 28),
        examples=FASHION_EXAMPLES,
        folders=_fashion_names()[1],
        label="fashion-",
        encoders=("fashion", "fashion-plain"),
        twins=(("aligned", "fashion_vae_aligned"), ("plain", "fashion_vae_plain")),
        close=CLOSE_FASHION,
        grid_scale=2,
        # measured on 2 CPU cores (docs/fashion.md): the default run takes about a minute
        defaults=(("n", 300), ("steps", 20)),
    ),
}


#: the clothes' C-spaces: ``--encoder`` -> (twin name, shipped VAE folder, shipped pipeline
#: folder whose UNet is the velocity model; trained in that VAE's latents)
FASHION_SPACES = {
    "fashion": ("aligned", FASHION_ENCODERS["fashion"], "fashion_pipeline"),
    "fashion-plain": ("plain", FASHION_ENCODERS["fashion-plain"], "fashion_pipeline_plain"),
}


def data_of(encoder: str) -> DemoData:
    """The data set whose C-space ``encoder`` (``--encoder``) is."""
    for data in DATA.values():
        if encoder in data.encoders:
            return data
    names = tuple(e for d in DATA.values() for e in d.encoders)
    raise ValueError(f"unknown demo encoder {encoder!r}; choose one of {names}")


def settings_for(data: str = "digits", **overrides) -> DemoSettings:
    """:class:`DemoSettings` for the data set ``data`` (``"digits"`` or ``"fashion"``): its
    C-space and its default sizes, then ``overrides`` (None values are left out)."""
    if data not in DATA:
        raise ValueError(f"unknown demo data {data!r}; choose one of {tuple(DATA)}")
    d = DATA[data]
    given = {k: v for k, v in overrides.items() if v is not None}
    if "encoder" in given and given["encoder"] not in d.encoders:
        raise ValueError(
            f"--encoder {given['encoder']} is not a C-space of --data {data}; choose one of "
            f"{d.encoders}"
        )
    return DemoSettings(**{**dict(d.defaults), "encoder": d.encoders[0], **given})


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
    # C-space: "digits" (aligned VAE), "digits-plain" (VF weight 0), "fashion" (the aligned
    # Fashion-MNIST VAE and the shipped pipeline's UNet: --data fashion, settings_for) or
    # "fashion-plain" (the plain twin VAE and the pipeline trained in its latents)
    encoder: str = "digits"
    method: str = "sde"  # sampler of every arm: "sde" (needed for backtracking), "euler", "heun"
    strength: float = 5.0  # obstacle-set arm
    classifier_strength: float = 0.3  # classifier arm
    q_star_scale: float = 1.5  # Q* = q_star_scale x the auto rule (median k-th NN distance)
    radius_scale: float = 1.0  # hard radius = radius_scale x the auto rule's distance
    backtrack: bool = True  # collision backtracking in the guided arms (method "sde" only)
    max_examples: int = 50
    # the rejection-pu arm's learnt region: "kernel" (obstacles.KernelRegion, g >= 0.4 c) or
    # "linear" (the half-space of PreferenceClassifier.fit_positive_unlabelled, g >= c / 2)
    pu_region: str = "kernel"
    umap: bool = False  # the UMAP figure (about 15 s more on 2 cores): --umap
    paths: int = 2  # paths of the clean estimate drawn in the UMAP figure per arm


def _space(encoder: str, device="cpu"):
    """Encoder and velocity model ``v(x, t)`` (on ``device``) of one C-space: for digits the
    shipped latent flow, for clothes the UNet of a shipped diffusers pipeline as a velocity
    (:class:`guidance.integrations.velocity.DiffusersVelocity`) with its VAE
    (:data:`FASHION_SPACES`: ``"fashion"`` the aligned VAE's pipeline, ``"fashion-plain"`` the
    plain twin's; the pipeline's own VAE: the same weights and normalisation, checked)."""
    from cspace.models.encoders import Encoder
    from cspace.models.shipped import SPACES, shipped

    data = data_of(encoder)
    if data.name == "fashion":
        from cspace.models.latent_pipeline import load_latent_pipeline
        from guidance.integrations.velocity import DiffusersVelocity, unconditional

        _, vae_folder, pipe_folder = FASHION_SPACES[encoder]
        pipe = load_latent_pipeline(shipped(pipe_folder))
        enc = Encoder.from_aligned(shipped(vae_folder))
        cfg = pipe.vae.config
        if (cfg.scaling_factor, cfg.shift_factor) != (enc.scaling_factor, enc.shift_factor):
            raise ValueError(
                f"the shipped pipeline {shipped(pipe_folder)}'s VAE is normalised differently "
                f"from {shipped(vae_folder)}: copy both folders from one release"
            )
        unet = pipe.unet.to(device).eval()
        return enc, DiffusersVelocity(_padded(unconditional(unet)), pipe.scheduler, unet.dtype)
    from cspace.models.flow import load_flow

    vae, flow = SPACES[encoder]
    return Encoder.from_aligned(shipped(vae)), load_flow(shipped(flow)).to(device)


#: the UNet sees batches padded to a multiple of this (:func:`_padded`)
BATCH_MULTIPLE = 64


def _padded(denoise):
    """``denoise(x, timestep)`` on batches padded to a multiple of :data:`BATCH_MULTIPLE` (the
    last state repeated; the padding's outputs dropped): backtracking and rejection call the
    model on batches of every size, and on the CPU each new batch shape costs about a second of
    set-up in the UNet's convolutions (measured: 0.29 s per call at a fixed batch of 150, about
    1 s per call when the size changes every call), far more than the padding's extra rows."""

    def run(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        extra = -b % BATCH_MULTIPLE
        if extra == 0 or b == 0:
            return denoise(x, timestep)
        x = torch.cat([x, x[-1:].expand(extra, *x.shape[1:])])
        timestep = torch.cat([timestep, timestep[-1:].expand(extra)])
        return denoise(x, timestep)[:b]

    return run


def _judge(data: DemoData, seed: int):
    """The data set's independent judge and its held-out accuracy: for digits the pixel
    classifier fitted on the judge split (:class:`cspace.models.judge.Judge`), for clothes the
    shipped CNN (:class:`cspace.models.fashion_judge.FashionJudge`). Both take images
    (B, 1, H, W) in [-1, 1] and give ``report(images)``."""
    if data.name == "fashion":
        from cspace.models.fashion_judge import default_fashion_judge

        judge = default_fashion_judge()
        return judge, float(judge.heldout_accuracy)
    from cspace.models.judge import Judge

    judge = Judge.fit(seed=seed)
    return judge, float(judge.accuracy)


def _images(data: DemoData, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Labelled images (N, 1, H, W) in [-1, 1] and labels (N,) of ``data``:

    * ``"unseen"``: what the membership figures count (digits: the judge and held-out splits;
      clothes: the shipped 2,000-image test slice);
    * ``"heldout"``: the UMAP's points (digits: the held-out split; clothes: the test slice);
    * ``"train"``: the within-class scale's images (digits: the train split; clothes: the
      500 shipped example images, of the train split)."""
    if data.name == "digits":
        from cspace.models.data import digits

        if part == "unseen":
            parts = [digits("judge"), digits("heldout")]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return digits(part)
    if part in ("unseen", "heldout"):
        from cspace.models.data import fashion_heldout

        return fashion_heldout()
    return _fashion_examples()


@functools.lru_cache(maxsize=1)
def _fashion_examples() -> tuple[torch.Tensor, torch.Tensor]:
    """Every shipped Fashion-MNIST example image (N, 1, 28, 28) and its class (N,)."""
    from cspace.io.images import load_images

    data = DATA["fashion"]
    files = [example_files(c, 10**6, data) for c in range(len(data.classes))]
    images = load_images([f for fs in files for f in fs], size=data.image_size)[0]
    labels = torch.cat([torch.full((len(fs),), c, dtype=torch.long) for c, fs in enumerate(files)])
    return images, labels


def _nearest_and_copies(data: DemoData, images: torch.Tensor) -> tuple[float, float]:
    """The mean pixel distance of ``images`` (n, 1, H, W) to their nearest train image and the
    share closer than the copy threshold (:func:`cspace.models.judge.copy_rate`). Clothes: the
    train images are the 500 shipped examples, the threshold the 1st percentile of the
    test slice's nearest distances to them (as the digits' is of the judge split's)."""
    if data.name == "digits":
        from cspace.models.judge import copy_rate, nearest_train_distance

        return float(nearest_train_distance(images).mean()), float(copy_rate(images))
    d = _nearest_example(images)
    return float(d.mean()), float((d < _fashion_copy_threshold()).double().mean())


def _nearest_example(images: torch.Tensor) -> torch.Tensor:
    """(n,) float64: the pixel L2 distance of each of ``images`` (n, 1, 28, 28) to its nearest
    shipped Fashion-MNIST example image."""
    train = _fashion_examples()[0]
    flat = images.reshape(images.shape[0], -1).double()
    train = train.reshape(train.shape[0], -1).double()
    return torch.cdist(flat, train, compute_mode="donot_use_mm_for_euclid_dist").min(1).values


@functools.lru_cache(maxsize=1)
def _fashion_copy_threshold() -> float:
    """The clothes' copy threshold: the 1st percentile of the shipped test slice's distances to
    their nearest example image (the digits' rule, :func:`cspace.models.judge.copy_threshold`)."""
    from cspace.models.judge import COPY_PERCENTILE

    d = _nearest_example(_images(DATA["fashion"], "heldout")[0])
    return float(torch.quantile(d, COPY_PERCENTILE / 100))


def example_files(cls: int, limit: int, data: DemoData | None = None) -> list[Path]:
    """The first ``limit`` example PNGs of class ``cls`` of ``data`` (default digits)."""
    data = data or DATA["digits"]
    folder = data.examples / data.folders[cls]
    if not folder.is_dir():
        raise FileNotFoundError(
            f"example images for class {cls} not found at {folder}; the demo needs the repository's "
            "examples/ folder (install with `pip install -e .` from a checkout)"
        )
    return sorted(p for p in folder.iterdir() if p.suffix == ".png")[:limit]


def _stream(device, seed: int, label: str) -> torch.Generator:
    """A generator on ``device`` for the stream ``label`` of a demo seeded ``seed``
    (:func:`guidance.seeding.derived_seed`)."""
    return torch.Generator(device).manual_seed(derived_seed(seed, label))


def sample_arm(flow, noise: torch.Tensor, s: DemoSettings, field=None, strength: float = 0.0,
               callback=None):  # fmt: skip
    """One arm of the demo from ``noise`` (n, C, H, W): ``s.method`` with ``s.steps`` steps, the
    field at ``strength`` and, when ``s.backtrack``, collision backtracking; the SDE's noise
    from the ``demo-sde`` stream (the same for every arm; module docstring, **Seeds**). Returns
    :class:`guidance.SampleOutput`."""
    from guidance import Backtrack, Guided, sample

    guided = field is not None
    return sample(
        Guided(flow, field, strength=strength) if guided else flow,
        noise,
        steps=s.steps,
        method=s.method,
        backtrack=Backtrack() if (s.backtrack and guided) else None,
        generator=_stream(noise.device, s.seed, "demo-sde"),
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


def within_class_scale(encoder, data: DemoData | None = None) -> float:
    """The local data scale of ``data`` (default digits) in ``encoder``'s C-space: the root mean
    within-class variance per coordinate of the train images' embeddings (:func:`_images`),

        a = sqrt( mean_c mean_j Var[z_j | class c] ),

    the ``a`` of the twist's spread ``s(t)^2 = a^2 t^2 / ((1-t)^2 a^2 + t^2)``
    (:func:`guidance.search.twisted.posterior_spread`) and of the negation denoiser's."""
    images, labels = _images(data or DATA["digits"], "train")
    dev = next(encoder.vae.parameters()).device
    lat = encoder.embed(encoder.encode(images.to(dev))).cpu().double()
    within = torch.stack([lat[labels == c].var(0).mean() for c in labels.unique()]).mean()
    return float(within.sqrt())


def demo_obstacles(encoder, s: DemoSettings):
    """The demo's obstacle set: the example images of ``s.avoid_class`` (at most
    ``s.max_examples``) embedded by ``encoder``, with Q* = ``q_star_scale`` x the auto rule and
    hard radius = ``radius_scale`` x the auto rule. Returns ``(obstacle_set, auto_q_star)``."""
    from obstacles.from_images import build_from_images

    data = data_of(s.encoder)
    files = example_files(s.avoid_class, s.max_examples, data)
    oset = build_from_images(
        files, encoder, label=data.label + data.folders[s.avoid_class], size=data.image_size
    )
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


def membership_quality(
    encoder,
    oset,
    avoid_class: int,
    examples=None,
    data: DemoData | None = None,
    embedded: torch.Tensor | None = None,
    pu=None,
) -> dict:
    """How well the obstacle set's membership matches the class it stands for, on the images
    that neither the VAE, the flow nor the set saw (``_images(data, "unseen")``: for digits
    the judge's and the held-out splits, for clothes the shipped test slice; without the set's
    own examples): the share of those images of ``avoid_class`` whose embedding
    lies inside some obstacle's hard radius (``recall_radius``) or within its Q*
    (``recall_q_star``), and the same shares of the other classes' images
    (``false_positive_radius``, ``false_positive_q_star``), with the per-class shares
    (``inside_radius_by_class``, ``inside_q_star_by_class``, 10 each) and the counts.

    The shipped example images are held-out digits: ``examples`` (M, 1, 8, 8), the set's own
    images, are left out of the count (a held-out image within 0.05 of one in pixel space, the
    PNG rounding), since an obstacle always contains its own example (``excluded``). The
    clothes' examples are train images: none is in the test slice, so none is left out.

    ``embedded`` (N, d): the embeddings of all of ``_images(data, "unseen")`` by ``encoder``, when
    the caller has them (:func:`membership_by_space` encodes them once for ten sets). ``pu``: the
    rejection-pu arm's region (:class:`obstacles.KernelRegion` or a positive-unlabelled
    :class:`obstacles.PreferenceClassifier`; anything with ``is_bad``), measured the same way (``recall_pu``, ``false_positive_pu``)."""
    data = data or DATA["digits"]
    images, labels = _images(data, "unseen")
    keep = torch.ones(len(labels), dtype=torch.bool)
    excluded = 0
    if examples is not None and len(examples):
        flat = images.reshape(images.shape[0], -1).double()
        ex = torch.as_tensor(examples).reshape(len(examples), -1).double()
        own_image = torch.cdist(flat, ex).min(1).values < 0.05
        excluded = int(own_image.sum())
        keep = ~own_image
        images, labels = images[keep], labels[keep]
    if embedded is None:
        dev = next(encoder.vae.parameters()).device
        emb = encoder.embed(encoder.encode(images.to(dev))).cpu().double()
    else:
        emb = embedded[keep].double()
    obs = torch.from_numpy(oset.embeddings.astype(np.float64))
    dist = torch.cdist(emb, obs, compute_mode="donot_use_mm_for_euclid_dist")  # (M, N)
    radius = torch.from_numpy(oset.radius.astype(np.float64))
    q = torch.from_numpy(oset.q_star.astype(np.float64))
    in_r = (dist < radius[None]).any(1)
    in_q = (dist < q[None]).any(1)
    own = labels == int(avoid_class)

    def share(mask, rows) -> float:
        return float(mask[rows].double().mean()) if bool(rows.any()) else 0.0

    extra = {}
    if pu is not None:
        in_pu = torch.from_numpy(pu.is_bad(emb.numpy()))
        extra = {"recall_pu": share(in_pu, own), "false_positive_pu": share(in_pu, ~own)}
    return {
        **extra,
        "recall_radius": share(in_r, own),
        "recall_q_star": share(in_q, own),
        "false_positive_radius": share(in_r, ~own),
        "false_positive_q_star": share(in_q, ~own),
        "inside_radius_by_class": [share(in_r, labels == c) for c in range(len(data.classes))],
        "inside_q_star_by_class": [share(in_q, labels == c) for c in range(len(data.classes))],
        "heldout_class": int(own.sum()),
        "heldout_other": int((~own).sum()),
        "excluded": excluded,
    }


def membership_by_space(s: DemoSettings, device="cpu", encoders: dict | None = None) -> dict:
    """The membership quality (:func:`membership_quality`) of every class's obstacle set, built
    as the demo builds it (:func:`demo_obstacles`: at most ``s.max_examples`` examples, Q* and
    hard radius ``s.q_star_scale`` and ``s.radius_scale`` x the auto rule), in each of the data
    set's twin C-spaces (``DemoData.twins``: the aligned VAE and its plain twin for clothes).

    Returns ``{space: {"vae": folder, "classes": [membership of class 0, ...]}}``; ``encoders``
    maps a space to an :class:`~cspace.models.encoders.Encoder` already loaded."""
    from dataclasses import replace

    from cspace.io.images import load_images
    from cspace.models.encoders import Encoder
    from cspace.models.shipped import shipped

    data = data_of(s.encoder)
    images = _images(data, "unseen")[0]
    out = {}
    for space, folder in data.twins:
        enc = (encoders or {}).get(space) or Encoder.from_aligned(shipped(folder))
        enc.vae.to(device)
        emb = enc.embed(enc.encode(images.to(device))).cpu().double()
        rows = []
        for c in range(len(data.classes)):
            oset, _ = demo_obstacles(enc, replace(s, avoid_class=c))
            own = load_images(example_files(c, s.max_examples, data), size=data.image_size)[0]
            rows.append(membership_quality(enc, oset, c, own, data, embedded=emb))
        out[space] = {"vae": folder, "classes": rows}
    return out


def rejection_arm(flow, shape, s: DemoSettings, field, device, first=None,
                  stream: str = "demo-rejection", membership=None):  # fmt: skip
    """The rejection arm: :func:`guidance.search.rejection.search` with the unguided sampler
    (``s.method``, ``s.steps``) and the field's hard radius as the membership test, its first
    round ``first`` (the unguided arm's samples, (n, C, H, W); None: drawn) and its redraws'
    noise from the seed stream ``stream``, at most :data:`REJECTION_DRAWS` draws per sample;
    ``membership`` (an ``inside`` test such as :class:`obstacles.KernelRegion`) instead of the
    field's hard regions. Returns the search result (fewer than ``s.n`` samples when the budget ran out:
    ``records["shortfall"]``)."""
    from guidance.search import CallableVerifier, rejection

    cost = rejection.draw_cost(s.steps, s.method)
    return rejection.search(
        flow, shape, CallableVerifier(lambda x: torch.zeros(x.shape[0]), name="none"),
        REJECTION_DRAWS * int(s.n) * cost, field=field, n_return=int(s.n), steps=s.steps,
        generator=_stream(device, s.seed, stream), method=s.method,
        first=first, membership=membership, dtype=torch.float32, device=device,
    )  # fmt: skip


def twisted_arm(flow, shape, s: DemoSettings, field, data_scale: float, unguided_nfe: float,
                device, callback=None):  # fmt: skip
    """The twisted SMC arm: :func:`guidance.search.twisted.search` with the model's own SDE step as
    proposal, the twist and the final exact test from ``field``'s hard radii (the obstacle set
    alone), ``data_scale`` the spread's ``a``; a budget of ``TWISTED_NFE x unguided_nfe`` NFE per
    returned sample, all of it spent on one system of ``floor(TWISTED_NFE x unguided_nfe x n /
    steps)`` particles (at least ``n``), which returns ``s.n`` by systematic resampling of the
    final weights; noise and resampling from the ``demo-twisted`` stream. Returns the search
    result."""
    from guidance.search import CallableVerifier, twisted

    budget = int(TWISTED_NFE * float(unguided_nfe) * int(s.n))
    return twisted.search(
        flow, shape, CallableVerifier(lambda x: torch.zeros(x.shape[0]), name="none"), budget,
        field=field, n_return=int(s.n), steps=s.steps, data_scale=data_scale,
        generator=_stream(device, s.seed, "demo-twisted"), dtype=torch.float32,
        device=device, callback=callback,
    )  # fmt: skip


def negation_arm(flow, noise: torch.Tensor, s: DemoSettings, field, data_scale: float,
                 callback=None):  # fmt: skip
    """The negation arm: one pass of ``s.method`` (the SDE by default: ``s.steps`` NFE per
    sample, no backtracking) with the negation denoiser
    (:class:`guidance.sampling.NegationDenoiser`: the obstacle set's examples as the negation
    set, ``beta = 1 - phi_t`` from its hard radii, ``data_scale`` the spread's ``a``), from the
    guided arms' ``noise`` (n, C, H, W) and, like them, the SDE's noise from the ``demo-sde`` stream
    (a generator of its own). Returns :class:`guidance.SampleOutput`."""
    from guidance import sample
    from guidance.sampling import NegationDenoiser

    return sample(
        NegationDenoiser(flow, field, data_scale=data_scale),
        noise,
        steps=s.steps,
        method=s.method,
        generator=_stream(noise.device, s.seed, "demo-sde"),
        callback=callback,
        progress=False,
    )


def _judged(judge, images: torch.Tensor, avoid_class: int, data: DemoData | None = None) -> dict:
    """The judge's figures of one arm's decoded ``images`` (n, 1, H, W), as every arm reports
    them."""
    from cspace.models.metrics import diversity

    rep = judge.report(images)
    nearest, copies = _nearest_and_copies(data or DATA["digits"], images)
    return {
        "avoided_rate": float(rep["class_shares"][avoid_class]),
        "class_shares": [float(v) for v in rep["class_shares"]],
        "judge_confidence": float(rep["confidence"]),
        "diversity": float(diversity(images)),
        "nearest_train_distance": nearest,
        "copy_rate": copies,
    }


def _inside_share(regions, latents: torch.Tensor) -> float:
    """The share of ``latents`` (n, ...) inside some hard region of ``regions``."""
    return float(regions.inside(latents.reshape(latents.shape[0], -1)).double().mean())


def _encoder_arg(s: DemoSettings) -> str:
    """What ``cspace obstacles ... --encoder`` takes for the demo's C-space: the name for
    digits, the shipped VAE folder for clothes (the obstacle commands know no ``fashion``)."""
    if data_of(s.encoder).name == "fashion":
        from cspace.models.shipped import shipped

        return str(shipped(FASHION_SPACES[s.encoder][1]))
    return s.encoder


def _user_obstacles(path, encoder, s: DemoSettings):
    """An obstacle set of the user's, checked against the demo's C-space (its images through
    ``encoder``): another space is refused naming both, a set of unknown space must at least
    have the space's dimension."""
    from obstacles import ObstacleSet

    oset = ObstacleSet.load(path)
    size = data_of(s.encoder).image_size
    space = encoder.space(size)
    oset.check_space(
        space,
        f"the demo's encoder {s.encoder!r}",
        fix=f"build the set with the demo's encoder (cspace obstacles build IMAGES --encoder "
        f"{_encoder_arg(s)} --out SET), or pass the --encoder it was built with",
    )
    if oset.dim != space.dim:
        raise ValueError(
            f"the obstacle set {path} has d={oset.dim}; the demo's C-space ({s.encoder}, "
            f"{size[0]}x{size[1]} images) has d={space.dim}: build it with --encoder {s.encoder}"
        )
    if len(oset) == 0:
        raise ValueError(f"the obstacle set {path} is empty")
    return oset


def _user_classifier(path, encoder, s: DemoSettings):
    """A preference classifier of the user's, checked against the demo's C-space."""
    from cspace.models.space import check_same_space
    from obstacles.classifier import PreferenceClassifier

    clf = PreferenceClassifier.load(path)
    size = data_of(s.encoder).image_size
    space = encoder.space(size)
    check_same_space(
        clf.space,
        space,
        f"the classifier {path}",
        f"the demo's encoder {s.encoder!r}",
        fix=f"train it with the demo's encoder (cspace obstacles classifier ... --encoder "
        f"{_encoder_arg(s)}), or pass the --encoder it was trained with",
    )
    if clf.dim != space.dim:
        raise ValueError(
            f"the classifier {path} has d={clf.dim}; the demo's C-space ({s.encoder}, "
            f"{size[0]}x{size[1]} images) has d={space.dim}: train it with --encoder {s.encoder}"
        )
    return clf


class _ArmProgress:
    """A tqdm bar (stderr) over one arm's sampler steps; a callback for :func:`sample_arm`.

    The bar shows how far the slowest sample has come (backtracking sends samples back, so
    the count of sampler iterations can exceed the steps). Its rate and ETA are the arm's
    average so far (tqdm ``smoothing=0``): a pause while samples backtrack does not turn into
    an ETA of minutes at the next step."""

    def __init__(self, arm: str, steps: int, enabled: bool):
        from tqdm.auto import tqdm

        self.steps = steps
        self.bar = tqdm(total=steps, desc=f"{arm:<12}", unit="step", disable=not enabled,
                        leave=True, dynamic_ncols=True, smoothing=0)  # fmt: skip

    def __call__(self, info) -> None:
        t_next = float(info["t"].max()) if info["t"].numel() else 0.0
        done = max(self.bar.n, min(self.steps, round((1.0 - t_next) * self.steps)))
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar.n < self.steps:
            self.bar.update(self.steps - self.bar.n)
        self.bar.close()


def run_demo(
    settings: DemoSettings | None = None,
    out_dir: str | Path | None = "cspace-demo",
    *,
    obstacles: str | Path | None = None,
    classifier: str | Path | None = None,
    progress: bool = False,
    log=None,
    membership_spaces: bool = False,
) -> dict:
    """Run the demo; returns the report (also written to ``out_dir/report.json``; nothing is
    written when ``out_dir`` is None).

    Args:
        settings: the demo's settings (default :class:`DemoSettings`).
        out_dir: folder of the grids, the report and the UMAP figure, or None.
        obstacles: an obstacle set folder to use instead of the one built from the examples of
            ``settings.avoid_class`` (in the demo's C-space; its Q*, eta and radius are used as
            stored, at ``settings.strength``).
        classifier: a preference classifier folder to use instead of the one trained on the
            examples (in the demo's C-space; at ``settings.classifier_strength``).
        progress: tqdm bars on stderr, one per arm.
        log: called with a line for each stage (loading, building, each arm, judging, files).
        membership_spaces: also measure every class's obstacle set in each of the data set's
            twin C-spaces (``report["membership_by_space"]``, :func:`membership_by_space`;
            ``--membership``; clothes only: the digits have no such list). About 2 x 2,500
            images encoded: 10 to 30 s on 2 CPU cores.
    """
    from cspace.io.images import load_images
    from guidance import ClassifierField, RepulsiveField
    from guidance.fields.regions import hard_regions
    from guidance.search.rejection_pu import REGIONS, fit_region
    from obstacles.classifier import ClassifierError, PreferenceClassifier

    say = log or (lambda message: None)
    s = settings or DemoSettings()
    data = data_of(s.encoder)
    if s.pu_region not in REGIONS:
        raise ValueError(
            f"pu_region must be one of {REGIONS} (the rejection-pu arm's region); got "
            f"{s.pu_region!r}"
        )
    if not 0 <= s.avoid_class <= 9:
        if data.name == "digits":
            raise ValueError(f"--class must be a digit 0..9; got {s.avoid_class}")
        names = ", ".join(f"{c} {n}" for c, n in enumerate(data.classes))
        raise ValueError(f"--class must be a class 0..9 ({names}); got {s.avoid_class}")
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
    if membership_spaces and not data.twins:
        raise ValueError(
            f"--membership measures the twin C-spaces of a data set; --data {data.name} has none "
            "(use --data fashion)"
        )
    device = resolve_device(s.device)
    if out_dir is not None:
        check_output_folder(out_dir, "the output folder (--out)")
    h, w = data.image_size
    dim = h * w // 2  # the latents: at most half as many numbers as the pixels
    check_memory(
        16 * int(s.n) * dim * 4 + 12 * int(s.n) * h * w * 4,
        f"{int(s.n):,} samples per arm (latents and {h}x{w} images, x6 arms; "
        f"{TWISTED_NFE:g} x n particles)",
        "lower --n",
    )
    t_start = time.perf_counter()
    torch.manual_seed(s.seed)

    say(f"loading the {s.encoder} C-space (VAE and latent flow) and fitting the judge")
    encoder, flow = _space(s.encoder, device)
    encoder.vae.to(device)
    judge, judge_accuracy = _judge(data, s.seed)

    # obstacles from the example images of the avoided class; the classifier also sees the others
    if obstacles is None:
        say(f"building the obstacle set from the example images of class {s.avoid_class}")
        oset, auto_q = demo_obstacles(encoder, s)
    else:
        say(f"loading the obstacle set {obstacles}")
        oset = _user_obstacles(obstacles, encoder, s)
        auto_q = None
    if classifier is None:
        say("training the preference classifier (the other classes' examples are good)")
        good_files = [
            f
            for c in range(len(data.classes))
            if c != s.avoid_class
            for f in example_files(c, s.max_examples, data)
        ]
        good = load_images(good_files, size=data.image_size)[0].to(device)
        good_emb = encoder.embed(encoder.encode(good)).cpu().numpy()
        clf = PreferenceClassifier.fit(good_emb, oset.embeddings, seed=s.seed, space=oset.space)
    else:
        say(f"loading the classifier {classifier}")
        clf = _user_classifier(classifier, encoder, s)
    fields = {
        "guided": (RepulsiveField(oset), s.strength),
        "classifier": (ClassifierField(clf), s.classifier_strength),
    }

    shape = encoder.latent_shape(data.image_size)
    gen = torch.Generator().manual_seed(s.seed)
    noise = torch.randn((s.n, *shape), generator=gen).to(device)
    about = {
        "count": len(oset),
        "q_star": median(oset.q_star),
        "radius": median(oset.radius),
        "auto_q_star": None if auto_q is None else median(auto_q),
        "eta": median(oset.eta),
    }
    if obstacles is None:
        about["examples"] = str(data.examples / data.folders[s.avoid_class])
    else:
        about["set"] = str(obstacles)
    accuracy = None if clf.accuracy is None else float(clf.accuracy)
    report: dict = {
        "settings": asdict(s),
        "space": {"encoder": encoder.name, "dim": int(np.prod(shape))},
        "obstacles": about,
        "classifier": {"heldout_accuracy": accuracy, "q_star": float(clf.q_star)},
        "judge": {"heldout_accuracy": judge_accuracy},
        "arms": {},
    }
    if classifier is not None:
        report["classifier"]["folder"] = str(classifier)
    samples, paths = {}, {}
    for arm in ARMS:
        fld, strength = fields.get(arm, (None, 0.0))
        x0_path: list[tuple[torch.Tensor, torch.Tensor]] = []
        bar = _ArmProgress(arm, s.steps, progress)
        what = "unguided" if fld is None else f"{type(fld).__name__}, strength {strength:g}"
        say(f"sampling {s.n} {data.noun}, arm {arm} ({what})")

        def keep(info, store=x0_path, bar=bar):
            if s.umap:  # every sample's clean estimates: the figure picks which to draw
                store.append((info["index"].cpu(), info["x0_hat"].detach().cpu()))
            bar(info)

        t0 = time.perf_counter()
        out = sample_arm(flow, noise, s, fld, strength, callback=keep)
        bar.close()
        images = encoder.decode(out.samples).cpu()
        secs = time.perf_counter() - t0
        report["arms"][arm] = {
            **_judged(judge, images, s.avoid_class, data),
            "nfe": out.nfe_per_sample,
            "backtrack_retries": int(out.retries.sum()) if out.retries is not None else 0,
            "seconds": secs,
        }
        samples[arm] = images
        paths[arm] = x0_path
        if arm == "unguided":
            unguided = out.samples

    # the baseline: unguided draws tested with the obstacle set's hard radius, the unguided
    # arm's samples first (common draws), then redraws of its own noise
    regions = hard_regions(fields["guided"][0])
    t0 = time.perf_counter()
    say(
        f"sampling {s.n} {data.noun}, arm rejection (the unguided samples tested with the hard "
        f"radius, the rejected ones drawn again, at most {REJECTION_DRAWS} draws per sample)"
    )
    rej = rejection_arm(flow, shape, s, fields["guided"][0], device, first=unguided)
    images = encoder.decode(rej.samples).cpu()
    report["arms"]["rejection"] = {
        **_judged(judge, images, s.avoid_class, data),
        "nfe": rej.nfe_per_sample,
        "draws": int(rej.records["draws"]),
        # the unguided samples inside the hard radius: the ones drawn again
        "redrawn": int(regions.inside(unguided.reshape(s.n, -1)).sum()),
        "rejected_share": float(rej.records["inside_estimate"]),
        "shortfall": int(rej.records["shortfall"]),
        "seconds": time.perf_counter() - t0,
    }
    samples["rejection"] = images

    # rejection with a membership learnt from the examples against the unguided samples
    # (positive-unlabelled): the examples of the class and the model's own samples, no other
    # class's examples
    kernel = s.pu_region == "kernel"
    say(
        f"sampling {s.n} {data.noun}, arm rejection-pu (a {'kernel' if kernel else 'linear'} "
        f"classifier of the {len(oset)} examples against the {s.n} unguided samples, threshold "
        f"{'0.4 c' if kernel else 'c / 2'} of Elkan and Noto's c; the samples it flags drawn again)"
    )
    t0 = time.perf_counter()
    pu = None
    folds = min(5, len(oset), int(s.n))
    try:
        if folds < 2:
            raise ClassifierError(
                f"the positive-unlabelled fit needs at least 2 examples and 2 samples; got "
                f"{len(oset)} and {s.n}"
            )
        pu, test = fit_region(oset.embeddings, encoder.embed(unguided).cpu().numpy(),
                              s.pu_region, folds=folds, seed=s.seed, space=oset.space)  # fmt: skip
    except ClassifierError as err:  # too few examples or samples, or nothing told apart
        report["skipped"] = {"rejection-pu": str(err)}
        say(f"arm rejection-pu skipped: {err}")
    if pu is not None:
        rpu = rejection_arm(flow, shape, s, None, device, first=unguided,
                            stream="demo-rejection-pu", membership=test)  # fmt: skip
        images = encoder.decode(rpu.samples).cpu()
        # the region on generated samples, by the judge's labels of the unguided ones (the
        # membership figures below are on real unseen images)
        flagged = test.inside(unguided.reshape(s.n, -1))
        judged = judge.predict(samples["unguided"]).to(flagged.device) == s.avoid_class
        report["arms"]["rejection-pu"] = {
            **_judged(judge, images, s.avoid_class, data),
            "nfe": rpu.nfe_per_sample,
            "draws": int(rpu.records["draws"]),
            "redrawn": int(flagged.sum()),
            "rejected_share": float(rpu.records["inside_estimate"]),
            "shortfall": int(rpu.records["shortfall"]),
            "region": s.pu_region,
            "rule": pu.info["rule"],
            "c": float(pu.info["c"]),
            "example_recall": float(pu.info["example_recall"]),
            "judged_recall": float(flagged[judged].double().mean()) if judged.any() else 0.0,
            "judged_false_positive": float(flagged[~judged].double().mean())
            if (~judged).any()
            else 0.0,
            "seconds": time.perf_counter() - t0,
        }
        samples["rejection-pu"] = images

    # the two arms that use only the obstacle set: twisted SMC and the negation denoiser
    scale = within_class_scale(encoder, data)
    unguided_nfe = report["arms"]["unguided"]["nfe"]
    particles = int(TWISTED_NFE * float(unguided_nfe) * s.n) // s.steps
    say(
        f"sampling {s.n} {data.noun}, arm twisted-smc ({particles} particles on the SDE, twisted by "
        f"the chance to end outside the hard radii, at most {TWISTED_NFE:g} x the unguided NFE)"
    )
    bar = _ArmProgress("twisted-smc", s.steps, progress)
    t0 = time.perf_counter()
    tw = twisted_arm(flow, shape, s, fields["guided"][0], scale, unguided_nfe, device, bar)
    bar.close()
    images = encoder.decode(tw.samples).cpu()
    report["arms"]["twisted-smc"] = {
        **_judged(judge, images, s.avoid_class, data),
        "nfe": tw.nfe_per_sample,
        "n_particles": int(tw.records["n_particles"]),
        "resamplings": int(tw.records["resamplings"]),
        "unique": int(tw.records["unique"]),
        "mass_inside": float(tw.records["mass_inside"]),
        "inside_radius": _inside_share(regions, tw.samples),
        "seconds": time.perf_counter() - t0,
    }
    samples["twisted-smc"] = images
    say(f"sampling {s.n} {data.noun}, arm negation (negation denoiser, the {len(oset)} examples)")
    bar = _ArmProgress("negation", s.steps, progress)
    t0 = time.perf_counter()
    neg = negation_arm(flow, noise, s, fields["guided"][0], scale, bar)
    bar.close()
    images = encoder.decode(neg.samples).cpu()
    report["arms"]["negation"] = {
        **_judged(judge, images, s.avoid_class, data),
        "nfe": neg.nfe_per_sample,
        "inside_radius": _inside_share(regions, neg.samples),
        "seconds": time.perf_counter() - t0,
    }
    samples["negation"] = images
    report["data_scale"] = scale
    if membership_spaces:
        say(f"measuring every class's obstacle set in {len(data.twins)} C-spaces (membership)")
        own_space = FASHION_SPACES[s.encoder][0]
        report["membership_by_space"] = membership_by_space(
            s, device, encoders={own_space: encoder}
        )
    own_examples = load_images(
        example_files(s.avoid_class, s.max_examples, data), size=data.image_size
    )[0]
    # the demo's set (its own space's row of membership_by_space) and the rejection-pu region
    report["membership"] = membership_quality(
        encoder, oset, s.avoid_class, own_examples, data, pu=pu
    )
    report["seconds"] = time.perf_counter() - t_start

    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        for arm, images in samples.items():
            files[f"grid_{arm}"] = str(out / f"samples_{arm}.png")
            save_grid_png(images[:100], files[f"grid_{arm}"], nrow=10, scale=data.grid_scale)
        if s.umap:
            say(f"drawing the UMAP figure (fitting UMAP on the held-out {data.noun})")
            files["umap"] = str(out / "cspace_umap.png")
            judged = {arm: judge.predict(images).tolist() for arm, images in samples.items()}
            chosen = _noises_to_draw(torch.tensor(judged["unguided"]), s)
            drawn = {arm: _paths_of(rec, chosen) for arm, rec in paths.items()}
            _umap_figure(encoder, oset, drawn, chosen, judged, s, Path(files["umap"]))
        report["files"] = files
        report["seconds"] = time.perf_counter() - t_start
        write_file_atomic(out / "report.json", json.dumps(report, indent=1))
        report["files"]["report"] = str(out / "report.json")
    return report


def _noises_to_draw(unguided_labels: torch.Tensor, s: DemoSettings) -> list[int]:
    """The ``s.paths`` noises whose paths the UMAP figure draws: the first ones whose unguided
    sample the judge calls the avoided class (where the arms part), then the first others."""
    labels = unguided_labels.tolist()
    hit = [i for i, c in enumerate(labels) if c == s.avoid_class]
    rest = [i for i in range(len(labels)) if i not in set(hit[: s.paths])]
    return (hit[: s.paths] + rest)[: min(s.paths, len(labels))]


def _paths_of(records: list, which) -> list[torch.Tensor]:
    """The clean-estimate path of each sample in ``which`` (indices, or a count: the first
    ones), (steps_j, ...) each, from the ``(indices, x0_hat)`` pairs the sampler's callback kept
    (a sample sent back by backtracking keeps its steps in order: its path goes back and
    forth)."""
    out = []
    for j in range(which) if isinstance(which, int) else which:
        pts = [x[i == j] for i, x in records if bool((i == j).any())]
        out.append(torch.cat(pts) if pts else torch.zeros(0))
    return out


#: one colour per arm in the UMAP figure (arms beyond these get the next colours of "Dark2")
ARM_COLOURS = {"unguided": "#444444", "guided": "#d62728", "classifier": "#1f77b4"}


def _umap_figure(
    encoder, oset, paths: dict, chosen: list, judged: dict, s: DemoSettings, path: Path
) -> None:
    """UMAP of held-out C-space embeddings by class, the obstacles, and for the noises
    ``chosen`` one polyline per arm: the clean estimate ``x0_hat`` from the first step (t = 1,
    the noise) to the sample (t = 0). The arms start from the same noises, so the lines of one
    noise show where each arm takes it; ``judged[arm][i]`` is the judge's class of sample i."""
    import umap
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    data = data_of(s.encoder)
    images, labels = _images(data, "heldout")
    dev = next(encoder.vae.parameters()).device
    emb = encoder.embed(encoder.encode(images.to(dev))).cpu().numpy()
    reducer = umap.UMAP(n_neighbors=15, min_dist=0.2, random_state=s.seed, n_jobs=1)
    xy = reducer.fit_transform(emb)
    obs_xy = reducer.transform(oset.embeddings)
    # ten classes in ten distinguishable colours (tab10 and its neighbours in hue are easy to
    # confuse at small marker sizes: these are Paul Tol's "muted" and two of "bright")
    tol = "#332288 #88CCEE #44AA99 #117733 #999933 #DDCC77 #CC6677 #882255 #AA4499 #EE7733"
    classes = ListedColormap(tol.split())
    fig = Figure(figsize=(8.2, 8.6), layout="constrained")
    ax = fig.subplots()
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels.numpy(), cmap=classes, vmin=-0.5, vmax=9.5,
                    s=8, alpha=0.8, linewidths=0)  # fmt: skip
    for c in range(10):  # the class number at the middle of its points
        mid = np.median(xy[labels.numpy() == c], axis=0)
        ax.text(mid[0], mid[1], data.short[c], fontsize=12 if data.name == "digits" else 8, weight="bold", ha="center", va="center",
                color=classes(c), bbox={"boxstyle": "circle,pad=0.15", "fc": "white",
                                        "ec": classes(c), "alpha": 0.8})  # fmt: skip
    bar = fig.colorbar(sc, ax=ax, ticks=range(10), shrink=0.8,
                       label="held-out digit class" if data.name == "digits" else "held-out class")  # fmt: skip
    if data.name != "digits":
        bar.ax.set_yticklabels(data.classes)
    ax.scatter(obs_xy[:, 0], obs_xy[:, 1], marker="x", color="black", s=28, lw=1.2)
    extra = iter(colormaps["Dark2"].colors)
    styles = ("-", "--", ":", "-.")
    handles = []
    for arm, arm_paths in paths.items():
        colour = ARM_COLOURS.get(arm) or next(extra)
        for j, p in enumerate(arm_paths):
            if p.numel() == 0:
                continue
            pts = reducer.transform(p.reshape(p.shape[0], -1).numpy())
            ax.plot(pts[:, 0], pts[:, 1], color=colour, lw=1.5, alpha=0.85, ls=styles[j % 4])
            ax.plot(*pts[0], "o", ms=7, mfc="white", mec="black", mew=1.0, zorder=4)
            ax.plot(*pts[-1], "*", ms=14, color=colour, mec="black", mew=0.6, zorder=5)
            if arm == next(iter(paths)):  # one label per noise, at its start
                # the noises' starts can lie together: one label above, the next below, ...
                ax.annotate(f"noise #{chosen[j]}", pts[0], xytext=(8, 5 - 14 * (j % 2)),
                            textcoords="offset points", fontsize=8, weight="bold",
                            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none",
                                  "alpha": 0.7})  # fmt: skip
        handles.append(Line2D([], [], color=colour, lw=1.6, label=f"arm: {arm}"))
    for j, i in enumerate(chosen):
        said = ", ".join(f"{a} {judged[a][i]}" for a in paths)
        handles.append(Line2D([], [], color="black", lw=1.0, ls=styles[j % 4],
                              label=f"noise #{i}, judged: {said}"))  # fmt: skip
    handles += [
        Line2D([], [], ls="", marker="x", color="black", label=f"obstacles ({len(oset)})"),
        Line2D([], [], ls="", marker="o", mfc="white", mec="black", label="start (t = 1)"),
        Line2D([], [], ls="", marker="*", ms=10, color="grey", mec="black", label="sample (t = 0)"),
    ]
    # below the map, where it hides no class
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=2,
              fontsize=8, frameon=False)  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])
    fig.suptitle(
        f"The {data.name} C-space (--encoder {s.encoder}, d = {oset.dim}) in 2-D: UMAP of "
        f"{len(labels)} held-out {data.noun}\n{data.class_name(s.avoid_class)} avoided; the clean "
        f"estimate's path in each arm "
        f"from the same {len(chosen)} noises",
        fontsize=10,
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_file_atomic(path, buf.getvalue())


def largest_shift(report: dict, arm: str) -> tuple[float, int] | None:
    """The largest change of another class's share in ``arm`` against the unguided arm, in
    points (signed, largest in absolute value), and that class; None for the unguided arm."""
    if arm == "unguided" or "unguided" not in report["arms"]:
        return None
    c = report["settings"]["avoid_class"]
    base = report["arms"]["unguided"]["class_shares"]
    shares = report["arms"][arm]["class_shares"]
    diff = [(100 * (a - b), k) for k, (a, b) in enumerate(zip(shares, base, strict=True)) if k != c]
    return max(diff, key=lambda d: abs(d[0]))


def renormalised_shift(report: dict, arm: str) -> tuple[float, int] | None:
    """The largest change of another class's share in ``arm`` against the unguided arm once the
    avoided class ``c`` is taken out of both, in points (signed, largest in absolute value), and
    that class; None for the unguided arm. With ``p_k`` an arm's class shares,

        shift_k = 100 (p_k / (1 - p_c) - u_k / (1 - u_c)),  k != c,

    ``u`` the unguided arm's shares: an arm that removes the class and leaves the others in
    their proportions shifts nothing (the raw :func:`largest_shift` of such an arm is
    ``100 u_k u_c / (1 - u_c)``). A share of 1 for ``c`` leaves nothing to renormalise: that
    arm's other shares count as 0."""
    if arm == "unguided" or "unguided" not in report["arms"]:
        return None
    c = report["settings"]["avoid_class"]

    def rest(shares: list[float]) -> list[float]:
        left = 1.0 - shares[c]
        return [v / left if left > 0 else 0.0 for v in shares]

    base = rest(report["arms"]["unguided"]["class_shares"])
    shares = rest(report["arms"][arm]["class_shares"])
    diff = [(100 * (a - b), k) for k, (a, b) in enumerate(zip(shares, base, strict=True)) if k != c]
    return max(diff, key=lambda d: abs(d[0]))


def format_report(report: dict) -> str:
    """The report as a plain-text table (with each arm's largest shift of another class against
    the unguided arm, renormalised without the avoided class: :func:`renormalised_shift`) and
    class histogram; for clothes also the close classes side by side and every class's
    membership in both twin C-spaces (``membership_by_space``)."""
    c = report["settings"]["avoid_class"]
    data = data_of(report["settings"]["encoder"])
    shown = {}
    for arm in report["arms"]:
        shift = renormalised_shift(report, arm)
        shown[arm] = "" if shift is None else f"{shift[0]:+.1f} pts ({data.class_name(shift[1])})"
    wide = max(21, 1 + max(len(v) for v in shown.values()))  # class names are longer than digits
    head = (
        f"{'arm':<13}{'avoided':>9}{'renormalised shift':>{wide}}{'judge conf':>12}"
        f"{'diversity':>11}{'NN-train':>10}{'copies':>8}{'NFE':>6}{'seconds':>9}"
    )
    rows = [head]
    for arm, m in report["arms"].items():
        rows.append(
            f"{arm:<13}{100 * m['avoided_rate']:>8.1f}%{shown[arm]:>{wide}}"
            f"{100 * m['judge_confidence']:>11.1f}%"
            f"{m['diversity']:>11.3f}{m['nearest_train_distance']:>10.3f}{100 * m['copy_rate']:>7.1f}%"
            f"{m['nfe']:>6.1f}{m['seconds']:>9.1f}"
        )

    def rejection_line(arm: str, m: dict, region: str, about: str = "") -> str:
        short = f"; {m['shortfall']} samples short" if m["shortfall"] else ""
        return (
            f"{arm}: {m['draws']} draws, {100 * m['rejected_share']:.1f}% inside {region} and "
            f"discarded{about}{short}"
        )

    if "rejection" in report["arms"]:
        rows.append(rejection_line("rejection", report["arms"]["rejection"], "a hard radius"))
    for arm, why in report.get("skipped", {}).items():
        rows.append(f"{arm}: skipped ({why})")
    rpu = report["arms"].get("rejection-pu")
    if rpu is not None:
        about = (
            f" (Elkan and Noto's c = {rpu['c']:.3f}, examples inside out of fold: "
            f"{100 * rpu['example_recall']:.0f}%; of the unguided samples the judge calls the "
            f"class, {100 * rpu['judged_recall']:.0f}% inside, of the others "
            f"{100 * rpu['judged_false_positive']:.1f}%)"
        )
        kind = "kernel" if rpu.get("region", "linear") == "kernel" else "half-space"
        rows.append(rejection_line("rejection-pu", rpu, f"the examples-vs-samples {kind} region",
                                   about))  # fmt: skip
    tw = report["arms"].get("twisted-smc")
    if tw is not None:
        rows.append(
            f"twisted-smc: {tw['n_particles']} particles, {tw['resamplings']} resamplings, "
            f"{tw['unique']} distinct samples returned, {100 * tw['inside_radius']:.1f}% inside a "
            f"hard radius"
        )
    neg = report["arms"].get("negation")
    if neg is not None:
        rows.append(f"negation: {100 * neg['inside_radius']:.1f}% inside a hard radius")
    mem = report.get("membership")
    if mem is not None:
        rows.append(
            f"membership (unseen {data.noun}): {data.class_name(c)} inside a hard radius "
            f"{100 * mem['recall_radius']:.1f}%, within Q* {100 * mem['recall_q_star']:.1f}% "
            f"(recall); other classes {100 * mem['false_positive_radius']:.1f}% / "
            f"{100 * mem['false_positive_q_star']:.1f}% (false positives)"
            + (
                f"; rejection-pu's region {100 * mem['recall_pu']:.1f}% / "
                f"{100 * mem['false_positive_pu']:.1f}%"
                if "recall_pu" in mem
                else ""
            )
        )
    rows.append("")
    rows.append("class shares (%)  " + "".join(f"{k:>6}" for k in data.short))
    for arm, m in report["arms"].items():
        rows.append(f"{arm:<18}" + "".join(f"{100 * v:>6.1f}" for v in m["class_shares"]))
    if data.close:
        rows.append("")
        rows.append("close classes (%)  " + "".join(f"{data.classes[k]:>13}" for k in data.close))
        for arm, m in report["arms"].items():
            shares = m["class_shares"]
            rows.append(f"{arm:<19}" + "".join(f"{100 * shares[k]:>13.1f}" for k in data.close))
    by_space = report.get("membership_by_space")
    if by_space:
        rows.append("")
        rows.append(
            f"membership of each class's obstacle set (<= {report['settings']['max_examples']} "
            f"examples) on the unseen {data.noun}: recall / false positives, inside the hard "
            f"radius | within Q* (%)"
        )
        rows.append(f"{'class':<13}" + "".join(f"{space:>27}" for space in by_space))
        order = [*data.close, *(k for k in range(len(data.classes)) if k not in data.close)]
        for k in order:
            cells = []
            for space in by_space.values():
                m = space["classes"][k]
                cells.append(
                    f"{100 * m['recall_radius']:5.1f}/{100 * m['false_positive_radius']:5.1f} | "
                    f"{100 * m['recall_q_star']:5.1f}/{100 * m['false_positive_q_star']:5.1f}"
                )
            rows.append(f"{data.classes[k]:<13}" + "".join(f"{cell:>27}" for cell in cells))
    obs = report["obstacles"]
    source = (
        f"{obs['count']} example images as obstacles"
        if "examples" in obs
        else f"the obstacle set {obs.get('set')} ({obs['count']} obstacles)"
    )
    acc = report["classifier"]["heldout_accuracy"]
    rows.append(
        f"avoided {data.class_name(c)}; {source} in "
        f"{report['space']['encoder']} "
        f"(d={report['space']['dim']}); judge held-out accuracy {100 * report['judge']['heldout_accuracy']:.1f}%; "
        f"classifier held-out accuracy {'n/a' if acc is None else f'{100 * acc:.1f}%'}; total {report['seconds']:.0f} s"
    )
    return "\n".join(rows)
