r"""``rejection-pu``: rejection sampling whose membership test is learnt from the obstacle set's
examples against the sampler's own draws.

The hard radii of an obstacle set built from a few examples hold only part of the class the
examples stand for (on the digits, 75-98% of unseen images), and rejection with them removes no
more than that. Here the first round of ``n_return`` plain draws is also the unlabelled set of a
positive-unlabelled model ``g`` of the examples (the field's obstacle centres, or ``examples``)
against those draws, balanced, with ``c`` Elkan and Noto's constant measured out of fold:

* ``region="kernel"`` (default): :class:`obstacles.KernelRegion`, logistic regression on RBF
  kernel features, region ``g(x) >= 0.4 c``;
* ``region="linear"``: :meth:`obstacles.PreferenceClassifier.fit_positive_unlabelled`, a
  half-space, region ``g(x) >= c / 2``.

The search is then :func:`guidance.search.rejection.search` with that region as the membership
test and the first round as its first draws (charged there), so every draw is paid for and the
reported NFE are the whole cost. No example of another class is used.

On an exact mixture of 4 modes on a circle (d = 5, the class one mode, 40 examples, hard radius
0.3; 800 samples, 30 Euler steps; ``tests/test_rejection_pu.py``) both regions leave 0-0.1% of
the class, against 24.4% for rejection with the hard radii, the other three modes in proportion
(41.8 NFE per sample against 31.1). With 8 modes on the circle the half-space also takes most
of the two neighbours at 45 degrees (2.5% and 8.7% of what is returned, against 1/7 = 14.3%);
the kernel region leaves them (12.0% and 16.5%), and costs less (35.9 NFE per sample against
44.1), since it rejects fewer draws.

The returned law is the sampler's restricted to the outside of the *learnt* region, not of the
field's hard radii: use it where the examples stand for a class, and the plain ``rejection``
where the obstacles are the exact test (the toy's balls). The first round fitted the region and
is tested with it (in sample; a sample of the class that trained it as "unlabelled" is a little
less likely inside than a fresh one). On the digits demo's settings (n = 1000, 50 SDE steps) the
kernel region meets the demo's targets on 9 of 10 classes on every seed, against 8 for the
half-space and 2 for rejection with the hard radius (docs/noise-vs-trajectory.md, section 6).

Records: rejection's (``draws``, ``accepted``, ``acceptance``, ``inside_estimate``, ...) and
``c``, ``example_recall`` (the examples' out-of-fold share inside), ``examples`` (how many),
``first_inside`` (the first round's share inside the learnt region), ``region``.
"""

from __future__ import annotations

import math

import torch

from guidance.fields.classifier import ClassifierField
from guidance.fields.regions import hard_regions
from guidance.sampling import sample, time_grid
from guidance.search import rejection
from guidance.search.budget import BudgetExceeded
from guidance.search.common import SearchError, SearchResult, begin, check_states, draw_noise
from guidance.search.protocol import Algorithm

__all__ = ["REGIONS", "fit_region", "search"]

#: the learnt regions ``search`` can fit: an RBF kernel model's (default) or a half-space
REGIONS = ("kernel", "linear")


def fit_region(examples, unlabelled, region: str = "kernel", *, folds: int = 5,
               C: float | None = None, seed: int = 0, space=None):  # fmt: skip
    """The positive-unlabelled region of ``examples`` (M, d) against ``unlabelled`` (N, d) and
    its membership test: ``(fitted, test)``, ``fitted`` an :class:`obstacles.KernelRegion`
    (``region="kernel"``) or a :class:`obstacles.PreferenceClassifier` (``"linear"``, its
    ``space`` set), ``test`` an object whose ``inside(states (m, d))`` gives (m,) bool.

    Raises:
        ValueError: ``region`` not in :data:`REGIONS`.
        obstacles.ClassifierError: the fit's errors (named).
    """
    from obstacles.classifier import PreferenceClassifier
    from obstacles.kernel_region import KernelRegion

    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}; got {region!r}")
    ex = examples.detach().cpu().double().numpy() if torch.is_tensor(examples) else examples
    un = unlabelled.detach().cpu().double().numpy() if torch.is_tensor(unlabelled) else unlabelled
    if region == "kernel":
        fitted = KernelRegion.fit_positive_unlabelled(ex, un, folds=folds, C=C, seed=seed)
        return fitted, fitted
    fitted = PreferenceClassifier.fit_positive_unlabelled(ex, un, folds=folds, C=C, seed=seed,
                                                          space=space)  # fmt: skip
    return fitted, hard_regions(ClassifierField(fitted))


def search(
    velocity,
    shape,
    verifier,
    budget,
    *,
    field,
    n_return: int = 1,
    steps: int = 50,
    generator: torch.Generator | None = None,
    method: str = "euler",
    noise_scale: float = 1.0,
    shift: float = 1.0,
    examples=None,
    folds: int = 5,
    C: float | None = None,
    region: str = "kernel",
    dtype: torch.dtype = torch.float64,
    device=None,
) -> SearchResult:
    """Rejection with a positive-unlabelled membership (module docstring).

    Args:
        field: the obstacle set's field; its obstacles' centres are the examples unless
            ``examples`` (M, d) is given (d = the flattened sample size).
        method, noise_scale, shift: the plain sampler, as for
            :func:`guidance.search.rejection.search`.
        region: ``"kernel"`` (default): :class:`obstacles.KernelRegion`, an RBF kernel
            model, region ``g >= 0.4 c``; ``"linear"``: the half-space of
            :meth:`obstacles.PreferenceClassifier.fit_positive_unlabelled`, ``g >= c / 2``.
        folds, C: of that fit (C None: its default, ``30 PU_CN / n`` for the kernel,
            ``PU_CN / n`` for the half-space).

    Raises:
        BudgetExceeded: the budget cannot pay ``n_return`` draws (checked before any draw).
        SearchError: no field, fewer than ``folds`` examples, or a fit that tells nothing apart
            (the classifier's error, named).
    """
    from obstacles.classifier import ClassifierError

    if region not in REGIONS:
        raise SearchError(f"rejection-pu: region must be one of {REGIONS}; got {region!r}")
    run, shape = begin("rejection-pu", velocity, shape, verifier, budget, n_return, steps)
    if field is None:
        raise SearchError("rejection-pu needs the obstacle set's field (its examples)")
    ex = hard_regions(field).centres if examples is None else torch.as_tensor(examples)
    dim = math.prod(shape)
    if ex.ndim != 2 or ex.shape[1] != dim:
        raise SearchError(
            f"rejection-pu: the examples must be (M, {dim}) embeddings of the samples' space; got "
            f"{tuple(ex.shape)}"
        )
    n = int(n_return)
    cost = rejection.draw_cost(steps, method)
    if run.budget.remaining < n * cost:
        raise BudgetExceeded(
            f"rejection-pu: a budget of {run.budget.remaining} NFE is less than the first round "
            f"({n} x {cost} NFE = {n * cost}); raise it above {n * cost}: the redraws of what the "
            f"learnt region rejects cost more, about {n * cost} / (1 - the share rejected)"
        )
    # the first round: the plain sampler's draws, charged by rejection.search below (first=)
    check_states("rejection-pu", n, shape, dtype, f"a first round of {n:,} draws")
    x = sample(velocity, draw_noise(n, shape, generator, dtype, device),
               times=time_grid(steps, shift=shift), method=method, noise_scale=noise_scale,
               generator=generator, progress=False).samples  # fmt: skip
    try:
        pu, test = fit_region(ex, x.reshape(n, -1), region, folds=folds, C=C)
    except ClassifierError as err:
        raise SearchError(f"rejection-pu: {err}") from None
    res = rejection.search(
        velocity, shape, verifier, run.budget, field=None, n_return=n, steps=steps,
        generator=generator, method=method, noise_scale=noise_scale, shift=shift, first=x,
        membership=test, dtype=dtype, device=device,
    )  # fmt: skip
    records = dict(res.records)
    records.update(
        c=float(pu.info["c"]),
        example_recall=float(pu.info["example_recall"]),
        examples=int(ex.shape[0]),
        first_inside=float(pu.info["unlabelled_inside"]),
        region=region,
    )
    return run.result(res.samples, res.scores, records)


ALGORITHM = Algorithm(
    name="rejection-pu",
    run=search,
    searches_over="independent draws, tested by a region learnt from the examples",
    needs_field=True,
    learns_membership=True,
)
