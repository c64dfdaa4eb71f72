"""The self-supervised Fashion-MNIST teacher: its tokens and checks, SimCLR's views and loss,
training end to end on tiny synthetic IDX files (no labels used), its folder, the shipped
teacher's quality, and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from cspace.io.errors import MissingWeightsError
from cspace.models.data import fashion_heldout
from cspace.models.metrics import embedding_accuracy
from cspace.models.shipped import shipped
from cspace.models.simclr import (
    augment_views,
    nt_xent,
    teacher_embeddings,
    train_fashion_teacher,
)
from cspace.models.teachers import (
    FashionTeacher,
    FashionTeacherConfig,
    TeacherWeightsError,
    load_teacher,
)
from tests.fashion_idx import write_fashion

TINY = FashionTeacherConfig(channels=(8, 8, 16), width=16, proj_hidden=16, proj_dim=8)


def _images(n=4, c=1, size=28, seed=1):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_tokens_are_a_7x7_grid_of_normalised_tokens():
    torch.manual_seed(0)
    t = FashionTeacher(TINY).freeze()
    assert t.grid == 7 and t.width == 16
    tok = t.tokens(_images())
    assert tok.shape == (4, 49, 16)
    # layer-normalised per token: zero mean, unit variance over channels (LayerNorm's init)
    torch.testing.assert_close(tok.mean(-1), torch.zeros(4, 49), atol=1e-5, rtol=0)
    torch.testing.assert_close(tok.var(-1, unbiased=False), torch.ones(4, 49), atol=1e-3, rtol=0)
    # the embedding is the mean token; the projection head maps it to proj_dim
    torch.testing.assert_close(t.embed(_images()), tok.mean(1))
    assert t.project(_images()).shape == (4, 8)
    # token k is the feature map's pixel (k // 7, k % 7): the grid is row-major
    feat = t.features(_images())
    torch.testing.assert_close(tok[:, 7 * 2 + 5], t.norm(feat[:, :, 2, 5]))


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 3, 28, 28), (1, 28, 28), (2, 1, 28, 27)])
def test_wrong_image_size_or_channels_is_a_clear_error(shape):
    t = FashionTeacher(TINY)
    with pytest.raises(ValueError, match=r"expects images \(B, 1, 28, 28\)") as err:
        t.tokens(torch.zeros(shape))
    assert str(tuple(shape)) in str(err.value)


def test_the_teacher_is_frozen_after_freeze():
    t = FashionTeacher(TINY).unfreeze()
    assert t.training and all(p.requires_grad for p in t.parameters())
    t.freeze()
    t.train()  # a frozen teacher stays in eval mode (BatchNorm uses its running statistics)
    assert not t.training and not any(p.requires_grad for p in t.parameters())


def test_config_validation():
    with pytest.raises(ValueError, match="channels must be 3 ints"):
        FashionTeacherConfig(channels=(8, 8))
    with pytest.raises(ValueError, match="image_size must be a multiple of 4"):
        FashionTeacherConfig(image_size=30)
    with pytest.raises(ValueError, match="width must be an int"):
        FashionTeacherConfig(width=0)


def test_views_are_random_deterministic_and_in_range():
    x = _images(8)
    a = augment_views(x, torch.Generator().manual_seed(3))
    b = augment_views(x, torch.Generator().manual_seed(3))
    c = augment_views(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, x)
    # a blank image stays flat under crop and flip: at most two values per view (its possibly
    # brightened background and a black cut-out)
    blank = torch.full((16, 1, 28, 28), -1.0)
    v = augment_views(blank, torch.Generator().manual_seed(0))
    assert all(len(torch.unique(img)) <= 2 for img in v)
    assert float(v.max()) > -1  # some brightness


def test_nt_xent_by_hand():
    p1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p2 = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # same directions: partners have cosine 1
    tau = 0.5
    # view 0 (p1[0]): candidates p1[1] (cos 0), p2[0] (cos 1, its partner), p2[1] (cos 0)
    want = -math.log(math.exp(2) / (math.exp(0) + math.exp(2) + math.exp(0)))
    assert float(nt_xent(p1, p2, tau)) == pytest.approx(want, rel=1e-6)
    # swapped partners: the loss is larger
    assert float(nt_xent(p1, p2.flip(0), tau)) > want + 1
    with pytest.raises(ValueError, match="B >= 2"):
        nt_xent(p1[:1], p2[:1])
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(p1, p2, 0.0)


@pytest.mark.slow
def test_tiny_training_run_end_to_end(tmp_path):
    data = write_fashion(tmp_path / "data", n_train=128, n_test=40)
    out = tmp_path / "teacher"
    torch.manual_seed(123)  # training must not depend on the global RNG
    rep = train_fashion_teacher(
        out, data=data, epochs=2, batch_size=32, config=TINY, progress=False
    )
    assert rep["steps"] == 8 and rep["train_images"] == 128
    assert len(rep["epoch_losses"]) == 2 and all(math.isfinite(v) for v in rep["epoch_losses"])
    for key in ("heldout_knn_accuracy", "heldout_linear_probe_accuracy", "test_knn_accuracy"):
        assert 0.0 <= rep[key] <= 1.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "cspace.ssl_teacher" and manifest["method"].startswith("SimCLR")
    assert manifest["metrics"]["test_knn_accuracy"] == rep["test_knn_accuracy"]
    # the folder loads, frozen, and gives the tokens of the trained model
    t = load_teacher(str(out))
    assert isinstance(t, FashionTeacher) and not t.training
    assert load_teacher("fashion", weights=out).config == t.config
    x = _images(3)
    torch.testing.assert_close(t.tokens(x), FashionTeacher.load(out).tokens(x))
    # deterministic for a seed: a second run writes the same weights
    rep2 = train_fashion_teacher(
        tmp_path / "again", data=data, epochs=2, batch_size=32, config=TINY, progress=False
    )
    assert rep2["epoch_losses"] == rep["epoch_losses"]
    torch.testing.assert_close(FashionTeacher.load(tmp_path / "again").tokens(x), t.tokens(x))


def test_training_refuses_bad_settings_before_training(tmp_path):
    data = write_fashion(tmp_path / "data", n_train=40, n_test=20)
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        train_fashion_teacher(tmp_path / "o", data=data, batch_size=1, progress=False)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        train_fashion_teacher(tmp_path / "o", data=data, batch_size=64, progress=False)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_missing_and_damaged_folders_say_what_to_do(tmp_path):
    with pytest.raises(MissingWeightsError, match="cspace train teacher --data fashion"):
        FashionTeacher.load(tmp_path / "nope")
    out = FashionTeacher(TINY).save(tmp_path / "t")
    weights = next(out.glob("model-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(TeacherWeightsError):
        FashionTeacher.load(out)
    with pytest.raises(ValueError, match="unknown teacher"):
        load_teacher("cifar")


def test_embedding_accuracy_by_hand():
    train = torch.tensor([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    tests = {"a": (torch.tensor([[0.05], [5.05], [4.0]]), torch.tensor([0, 1, 0]))}
    out = embedding_accuracy(train, labels, tests, k=3)
    assert out["a_knn_accuracy"] == pytest.approx(2 / 3)
    assert out["a_linear_probe_accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="NaN"):
        embedding_accuracy(train * float("nan"), labels, tests)


# ---------------------------------------------------------------------- the shipped teacher
def test_the_shipped_teacher_is_self_supervised_and_separates_the_classes():
    t = load_teacher("fashion")
    assert isinstance(t, FashionTeacher) and t.grid == 7
    meta = t.meta
    assert meta["trained_on"] == "Fashion-MNIST train split, images only"
    m = meta["metrics"]
    # the figures its manifest records (fit on the full train split)
    assert m["heldout_knn_accuracy"] >= 0.80 and m["test_linear_probe_accuracy"] >= 0.80
    # measured now, without the train split: 5-fold kNN within the 2,000 held-out images, on
    # the teacher's embeddings and on the raw pixels
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    x, y = fashion_heldout()
    emb = teacher_embeddings(t, x).numpy()
    knn = KNeighborsClassifier(n_neighbors=5)
    acc = cross_val_score(knn, emb, y.numpy(), cv=5).mean()
    assert acc >= 0.75, acc
    # and an untrained network of the same shape is far worse (the training did the work)
    torch.manual_seed(0)
    rand = teacher_embeddings(FashionTeacher(t.config).freeze(), x).numpy()
    assert cross_val_score(knn, rand, y.numpy(), cv=5).mean() < acc - 0.03


def test_shipped_teacher_tokens_are_finite_and_differ_between_classes():
    t = load_teacher("fashion")
    x, y = fashion_heldout()
    tok = t.tokens(x[:200])
    assert tok.shape == (200, 49, 64) and bool(torch.isfinite(tok).all())
    e = F.normalize(tok.mean(1), dim=1)
    same = torch.stack([(e[y[:200] == c] @ e[y[:200] == c].T).mean() for c in range(10)]).mean()
    assert float(same) > float((e @ e.T).mean())
    assert shipped("fashion_teacher").is_dir()


# ---------------------------------------------------------------------- the command line
@pytest.mark.slow
def test_cli_trains_the_fashion_teacher(tmp_path, run_cli):
    data = write_fashion(tmp_path / "data", n_train=64, n_test=20)
    rc, out, err = run_cli(["train", "teacher", "--data", "fashion", "--data-dir", data,
                            "--epochs", "1", "--batch-size", "32", "--out", tmp_path / "t",
                            "--no-progress", "--json"])  # fmt: skip
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["epochs"] == 1 and rep["batch_size"] == 32 and rep["steps"] == 2
    assert isinstance(load_teacher(str(tmp_path / "t")), FashionTeacher)


def test_cli_refuses_options_of_the_other_data_set(tmp_path, run_cli):
    rc, _, err = run_cli(["train", "teacher", "--data", "fashion", "--steps", "3",
                          "--out", tmp_path / "t"])  # fmt: skip
    assert rc == 2 and "--steps applies only to --data digits" in err
    rc, _, err = run_cli(["train", "teacher", "--epochs", "3", "--out", tmp_path / "t"])
    assert rc == 2 and "--epochs applies only to --data fashion" in err
    assert not (tmp_path / "t").exists()
    rc, _, err = run_cli(["train", "teacher", "--data", "fashion", "--data-dir",
                          tmp_path / "empty", "--out", tmp_path / "t"])  # fmt: skip
    assert rc == 2 and "dataset-fashion-mnist" in err
