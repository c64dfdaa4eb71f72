"""The library's checks of sizes, budgets, paths and devices, and errors that name the real
culprit: each refuses before anything large is allocated or computed."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from cspace.io.checks import (
    SizeLimitError,
    check_memory,
    check_output_file,
    check_output_folder,
    format_bytes,
    memory_bytes,
)

F64 = torch.float64


# ---------------------------------------------------------------------- cspace.io.checks
def test_check_memory_names_the_request_and_the_fix():
    check_memory(1024, "a small thing", "lower it")
    with pytest.raises(SizeLimitError, match=r"^a huge thing needs .* more than this machine's"):
        check_memory(memory_bytes() + 1, "a huge thing", "lower --n")
    with pytest.raises(SizeLimitError, match=r"lower --n$"):
        check_memory(10**40, "x", "lower --n")  # Python ints of any size
    assert format_bytes(512) == "512 B" and format_bytes(3 * 2**30) == "3.0 GiB"
    assert format_bytes(10**40).endswith(" B")


def test_output_paths(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    assert check_output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # nothing is created
    check_output_folder(tmp_path / "d")
    with pytest.raises(NotADirectoryError, match=r"f/x/y is inside .*f, which is a file"):
        check_output_folder(tmp_path / "f" / "x" / "y", "--out")
    with pytest.raises(NotADirectoryError, match=r"--out .*f is a file, not a folder"):
        check_output_folder(tmp_path / "f", "--out")
    check_output_file(tmp_path / "f")  # replacing a file is fine
    check_output_file(tmp_path / "new" / "r.json")
    with pytest.raises(IsADirectoryError, match="is a folder, not a file"):
        check_output_file(tmp_path / "d")
    with pytest.raises(NotADirectoryError):
        check_output_file(tmp_path / "f" / "r.json")
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(PermissionError, match="no write permission"):
            check_output_folder(tmp_path / "ro" / "x")


def test_resolve_device():
    from cspace.models.devices import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device 'foo' is not a torch device"):
        resolve_device("foo")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device; use --device cpu"):
            resolve_device("cuda")


# ---------------------------------------------------------------------- guidance culprits
class _Field:
    """A field whose force is given (for the culprit tests)."""

    def __init__(self, force_value: float):
        self.value = force_value

    def evaluate(self, x, t=None, *, need_force=True):
        from types import SimpleNamespace

        return SimpleNamespace(force=torch.full_like(x, self.value))


def _run(guided):
    from guidance import sample

    x = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    return sample(guided, x, steps=4, progress=False)


def test_a_nan_weight_is_named_not_the_velocity(toy):
    from guidance import Guided

    mix, _, field = toy
    guided = Guided(
        mix.velocity, field, strength=1.0, weight=lambda t: torch.full_like(t, math.nan)
    )
    with pytest.raises(ValueError, match=r"the weight function returned NaN or Inf for 6 of 6"):
        _run(guided)
    # NaN outside the window is never used
    lam = lambda t: torch.where(t > 0.5, torch.full_like(t, math.nan), torch.ones_like(t))  # noqa: E731
    assert _run(Guided(mix.velocity, field, window=(0.0, 0.5), weight=lam)).samples.isfinite().all()


def test_a_non_finite_force_names_the_field(toy):
    from guidance import Guided

    mix, _, _ = toy
    with pytest.raises(ValueError, match=r"the field \(_Field\) returned a NaN or Inf force"):
        _run(Guided(mix.velocity, _Field(math.inf), strength=1.0))


def test_an_overflowing_strength_is_named(toy):
    from guidance import Guided

    mix, _, _ = toy
    with pytest.raises(ValueError, match=r"strength x weight\(t\) x force overflowed.*lower the"):
        _run(Guided(mix.velocity, _Field(10.0), strength=1e308))

    def huge(x, t):
        return torch.full_like(x, 1e308)

    with pytest.raises(ValueError, match=r"the guided velocity v - strength .* overflowed"):
        _run(Guided(huge, _Field(-1e308), strength=1.0))


def test_a_model_failing_where_guidance_pushed_it_names_the_displacement(toy):
    """eta = 1e300 gives a finite force that throws the states to 1e299, where the exact
    mixture's squared distances overflow: the model's NaN is blamed on the displacement."""
    from guidance import Guided

    mix, _, _ = toy
    with pytest.raises(ValueError, match=r"velocity returned NaN.*Guidance had displaced states"):
        _run(Guided(mix.velocity, _Field(1e300), strength=1.0))


def test_a_nan_model_is_still_the_velocity(toy):
    from guidance import Guided

    _, _, field = toy

    def bad(x, t):
        return torch.full_like(x, math.nan)

    with pytest.raises(ValueError, match="velocity returned NaN or Inf for 6 of 6 states"):
        _run(Guided(bad, field, strength=1.0))


# ---------------------------------------------------------------------- search sizes
def test_budget_is_bounded_by_64_bits():
    from guidance.search import Budget
    from guidance.search.budget import MAX_NFE

    assert Budget(MAX_NFE).total == 2**63 - 1
    for bad in (2**63, 10**20, -1, 2.5, True, float("inf"), "many"):
        with pytest.raises(ValueError, match=r"whole number of NFE in 0\.\."):
            Budget(bad)


@pytest.mark.parametrize("algo", ["best-of-n", "paths", "smc", "smc-guided"])
def test_a_plan_beyond_memory_is_refused_before_allocating(algo, toy):
    from guidance.search import ALGORITHMS, ClearanceVerifier

    mix, _, field = toy
    kw = ALGORITHMS[algo].keywords(field=field, data_scale=0.35, lam=1.0, revert=2, max_retries=1)
    with pytest.raises(SizeLimitError, match=f"^{algo}: .* more than this machine's memory"):
        ALGORITHMS[algo](mix.velocity, (2,), ClearanceVerifier(field), 10**18, n_return=4,
                         steps=5, **kw)  # fmt: skip


def test_too_many_returned_samples_are_refused(toy):
    from guidance.search import ALGORITHMS, ClearanceVerifier

    mix, _, field = toy
    with pytest.raises(SizeLimitError, match=r"10,000,000,000,000 returned samples"):
        ALGORITHMS["best-of-n"](mix.velocity, (2,), ClearanceVerifier(field), 100,
                                n_return=10**13, steps=5)  # fmt: skip


# ---------------------------------------------------------------------- the toy
def test_toy_sizes_and_coverage():
    from cspace.models.toy import default_toy, toy_with_coverage

    with pytest.raises(ValueError, match=r"coverage 1e-06 is below the smallest ball.*--coverage"):
        toy_with_coverage(2, 1e-6)
    with pytest.raises(SizeLimitError, match="lower the dimension"):
        default_toy(10**15)
    mix, balls = default_toy()
    with pytest.raises(SizeLimitError, match="10,000,000,000,000 samples"):
        mix.sample(10**13)
    with pytest.raises(ValueError, match="ask for at most 25,000,000 samples"):
        mix.sample_outside(10**12, balls)
    with pytest.raises(ValueError, match="ask for at most 500 samples"):
        mix.sample_outside(501, balls, max_draws=1000)


def test_time_grid_beyond_memory():
    from guidance import time_grid

    with pytest.raises(SizeLimitError, match="a time grid of 1,000,000,000,000 steps"):
        time_grid(10**12)
    assert time_grid(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


# ---------------------------------------------------------------------- calibration budget
def test_calibrate_refuses_a_budget_below_one_trial(tmp_path):
    from cspace.experiments.calibration import calibrate_set, toy_set, trial_nfe
    from guidance.calibrate import CalibrationError, CalibrationSettings, calibrate

    assert trial_nfe("toy", None, 50) == 25_600 and trial_nfe("digits", 10, 5) == 50
    calls = []

    def evaluate(oset):
        calls.append(1)
        return {"hit": 0.0, "loss": 1.0, "nfe": 100}

    evaluate.trial_nfe = 100
    s = CalibrationSettings(q_star_range=(0.5, 4.0), budget=99, trials=3)
    with pytest.raises(
        CalibrationError, match="budget of 99 NFE is less than one trial costs: 100"
    ):
        calibrate(toy_set(), evaluate, s, None, progress=False)
    assert calls == []
    s.budget = 250  # pays two trials of 100, not a third
    res = calibrate(toy_set(), evaluate, s, None, progress=False)
    assert len(calls) == 2 and res.nfe == 200 and "budget" in res.message
    # cspace calibrate: refused before the set is written or a sample drawn
    with pytest.raises(CalibrationError, match=r"25,600 NFE \(512 samples x 50 steps\)"):
        calibrate_set(tmp_path / "set", "toy", budget=1, init=True)
    assert not (tmp_path / "set").exists()


# ---------------------------------------------------------------------- training
@pytest.mark.parametrize(
    "kw, err, match",
    [
        ({"threads": 10**20}, ValueError, r"threads must be in 1\.\."),
        ({"threads": 0}, ValueError, r"threads must be in 1\.\."),
        ({"lr": 1e308}, ValueError, r"lr must be in \(0, 1\]"),
        ({"batch_size": 10**20}, SizeLimitError, "lower the batch size"),
    ],
)
def test_train_flow_refuses_before_training(kw, err, match):
    from cspace.models.flow import train_flow

    with pytest.raises(err, match=match):
        train_flow(torch.zeros(4, 2, 4, 4), steps=1, **kw)


def test_train_flow_steps_and_divergence():
    from cspace.models.flow import train_flow

    with pytest.raises(SizeLimitError, match="the loss record of 1,000,000,000,000 steps"):
        train_flow(torch.zeros(4, 2, 4, 4), steps=10**12)
    with pytest.raises(ValueError, match=r"diverged at step 1: the loss is nan.*Before any upd"):
        train_flow(torch.full((4, 2, 4, 4), 1e30), steps=3, progress=False)


def test_train_vae_divergence_is_named_and_nothing_is_saved(tmp_path):
    from cspace.models.vae import train_vae

    with pytest.raises(ValueError, match=r"VAE training diverged at step 1.*--vf-weight"):
        train_vae(tmp_path / "vae", vf_weight=1e308, steps=2, progress=False)
    assert not (tmp_path / "vae" / "manifest.json").exists()


def test_teacher_weights_are_never_unpickled(tmp_path, monkeypatch):
    """A DINOv2 weights file that is not safetensors used to reach timm, which reads it with
    torch.load (an unpickler); it is refused before timm sees it."""
    import torch.serialization

    from cspace.models.teachers import DinoV2Teacher

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(torch.serialization, "load", no_unpickling)
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.bin")
    (tmp_path / "fake.safetensors").write_bytes(b"\x00" * 4)
    name = "vit_large_patch14_dinov2.lvd142m"
    with pytest.raises(ValueError, match=r"expected a \.safetensors file.*never loads"):
        DinoV2Teacher(name, weights=tmp_path / "model.bin", img_size=28)
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        DinoV2Teacher(name, weights=tmp_path / "fake.safetensors", img_size=28)


def test_demo_refuses_an_overflowing_q_star_scale():
    from cspace.experiments.demo import DemoSettings, demo_obstacles
    from cspace.models.encoders import Encoder

    big = float(np.finfo(np.float64).max)
    with pytest.raises(
        ValueError, match=r"q_star_scale = 1.79769e\+308 .* overflows.*--q-star-scale"
    ):
        demo_obstacles(Encoder.from_aligned(), DemoSettings(q_star_scale=big))
    oset, auto = demo_obstacles(Encoder.from_aligned(), DemoSettings(q_star_scale=2.0))
    assert np.allclose(oset.q_star, 2 * auto)


def test_the_demo_report_median_cannot_overflow():
    from cspace.experiments.demo import median

    big = float(np.finfo(np.float64).max)
    assert median([big, big, big, big]) == big  # np.median gives inf
    assert median([1.0, 3.0]) == 2.0 and median([5.0, 1.0, 3.0]) == 3.0
    assert median(np.full(40, 0.7)) == 0.7
