"""The pixel-space judge, diversity and the memorisation (copy-rate) check."""

from __future__ import annotations

import pytest
import torch

from cspace.models.data import digits
from cspace.models.judge import (
    Judge,
    copy_rate,
    copy_threshold,
    default_judge,
    nearest_train_distance,
)
from cspace.models.metrics import diversity


@pytest.fixture(scope="module")
def judge() -> Judge:
    return default_judge()


def test_judge_accuracy_on_heldout(judge):
    assert judge.heldout_accuracy >= 0.95
    assert judge.accuracy == judge.heldout_accuracy
    images, labels = digits("heldout")
    acc = float((judge.predict(images) == labels).double().mean())
    assert acc == pytest.approx(judge.heldout_accuracy)


def test_judge_is_deterministic(judge):
    images = digits("heldout")[0][:50]
    assert torch.equal(Judge.fit(seed=0).predict_proba(images), judge.predict_proba(images))


def test_report(judge):
    images = digits("heldout")[0]
    p = judge.predict_proba(images)
    assert p.shape == (len(images), 10)
    assert torch.allclose(p.sum(1), torch.ones(len(images), dtype=p.dtype))
    rep = judge.report(images)
    assert len(rep["class_shares"]) == 10
    assert sum(rep["class_shares"]) == pytest.approx(1.0)
    assert rep["predicted"].shape == (len(images),)
    assert 0.9 < rep["confidence"] <= 1.0
    assert rep["confident_share"] > 0.8  # real digits: about 88% judged with p > 0.9
    assert max(rep["class_shares"]) < 0.15  # the heldout split is stratified
    noise = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert judge.report(noise)["confident_share"] < 0.05  # calibrated: noise is not a digit


def test_judge_rejects_bad_input(judge):
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        judge.predict_proba(torch.zeros(3, 64))
    with pytest.raises(ValueError, match="NaN"):
        judge.report(torch.full((2, 1, 8, 8), float("nan")))


def test_diversity():
    x = torch.zeros(4, 1, 8, 8)
    assert diversity(x) == 0.0
    a, b = torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    assert diversity(torch.cat([a, b])) == pytest.approx(8.0)  # |1|_2 over 64 pixels
    real = diversity(digits("heldout")[0])
    assert 5.5 < real < 6.5
    assert diversity(a) == 0.0  # one sample: no spread
    with pytest.raises(ValueError, match="NaN"):
        diversity(torch.cat([a, torch.full_like(a, float("nan"))]))
    # blocks give the same value as one pass
    real_blocked = diversity(digits("heldout")[0], block=7)
    assert real_blocked == pytest.approx(real, rel=1e-12)


def test_copy_rate_separates_copies_from_new_digits():
    train = digits("train")[0]
    assert torch.all(nearest_train_distance(train[:100]) == 0)
    thr = copy_threshold()
    assert 0.5 < thr < 2.0
    assert copy_rate(train) == 1.0
    assert copy_rate(digits("heldout")[0]) < 0.03  # independent of the threshold's split
    assert copy_rate(train[:10] + 0.5, threshold=0.1) == 0.0
