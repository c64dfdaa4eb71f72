"""Sampling flow-matching models: the flow convention, one step per method, guidance as a
velocity wrapper, and the sampler with collision backtracking.

* :mod:`.convention`: :class:`Prediction` (``x0_hat``, ``eps_hat``, ``v`` from each other);
* :mod:`.steps`: :func:`euler_step`, :func:`heun_step`, :func:`sde_step` (``STEPS``), each
  returning a :class:`Step` (next state, the step's mean, ``x0_hat``, the prediction, NFE);
* :mod:`.guided`: :class:`Guided`, the field's displacement of the clean estimate as a velocity;
* :mod:`.negation`: :class:`NegationDenoiser`, the safe denoiser with the obstacles' examples as
  the negation set;
* :mod:`.barrier`: :class:`SafetyFilter`, the constricting control-barrier filter;
* :mod:`.sampler`: :func:`sample`, :class:`Backtrack`, :class:`SampleOutput`, :func:`time_grid`.
"""

from guidance.sampling.barrier import SafetyFilter
from guidance.sampling.convention import (
    NonFiniteVelocityError,
    Prediction,
    Predictor,
    Velocity,
    batch_times,
    check_velocity,
    predict,
)
from guidance.sampling.guided import MODES, Guided
from guidance.sampling.negation import NegationDenoiser
from guidance.sampling.sampler import METHODS, Backtrack, SampleOutput, sample, time_grid
from guidance.sampling.steps import STEPS, Step, euler_step, heun_step, sde_step

__all__ = [
    "METHODS",
    "MODES",
    "STEPS",
    "Backtrack",
    "Guided",
    "NegationDenoiser",
    "NonFiniteVelocityError",
    "Prediction",
    "Predictor",
    "SafetyFilter",
    "SampleOutput",
    "Step",
    "Velocity",
    "batch_times",
    "check_velocity",
    "euler_step",
    "heun_step",
    "predict",
    "sample",
    "sde_step",
    "time_grid",
]
