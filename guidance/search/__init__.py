"""Inference-time search: verifiers, NFE budgets and search algorithms on one protocol.

Every algorithm is ``search(velocity, shape, verifier, budget, *, n_return, steps, generator,
...) -> SearchResult`` (:class:`~guidance.search.protocol.SearchAlgorithm`) and never spends more
NFE than its budget (see :mod:`.budget`). Each module declares its
:class:`~guidance.search.protocol.Algorithm` (name, function, what it searches over, whether it
needs the obstacles' field); :data:`ALGORITHMS` is the one registry of them:

=============  ==============================================  ==========================
name           module                                          searches over
=============  ==============================================  ==========================
best-of-n      :mod:`guidance.search.random_search`             initial noises (ODE)
zero-order     :mod:`guidance.search.zero_order`                initial noises (ODE)
paths          :mod:`guidance.search.paths`                     re-noised partial paths
smc            :mod:`guidance.search.smc`                       SDE trajectories (FK SMC)
smc-guided     :mod:`guidance.search.smc_guided`                SDE trajectories, guided
backtrack      :mod:`guidance.search.backtrack`                 SDE segments (retries)
rejection      :mod:`guidance.search.rejection`                 independent draws (test)
rejection-pu   :mod:`guidance.search.rejection_pu`              draws, a learnt test
twisted-smc    :mod:`guidance.search.twisted`                   SDE trajectories, twisted
negation       :mod:`guidance.search.single_pass`               nothing (one pass)
safety-filter  :mod:`guidance.search.single_pass`               nothing (one pass)
auto           :mod:`guidance.search.auto`                      rejection or twisted-smc
=============  ==============================================  ==========================
"""

from guidance.search import (
    auto,
    backtrack,
    paths,
    random_search,
    rejection,
    rejection_pu,
    single_pass,
    smc,
    smc_guided,
    twisted,
    zero_order,
)
from guidance.search.budget import Budget, BudgetExceeded, as_budget
from guidance.search.common import SearchError, SearchResult
from guidance.search.protocol import Algorithm, SearchAlgorithm
from guidance.search.verifiers import (
    CallableVerifier,
    ClearanceVerifier,
    EnsembleVerifier,
    OracleVerifier,
    PreferenceVerifier,
    Verifier,
    VerifierError,
)

#: name -> :class:`Algorithm` (callable like its search function)
ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        random_search.ALGORITHM,
        zero_order.ALGORITHM,
        paths.ALGORITHM,
        smc.ALGORITHM,
        smc_guided.ALGORITHM,
        backtrack.ALGORITHM,
        rejection.ALGORITHM,
        rejection_pu.ALGORITHM,
        twisted.ALGORITHM,
        single_pass.NEGATION,
        single_pass.SAFETY_FILTER,
        auto.ALGORITHM,
    )
}

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "Budget",
    "BudgetExceeded",
    "CallableVerifier",
    "ClearanceVerifier",
    "EnsembleVerifier",
    "OracleVerifier",
    "PreferenceVerifier",
    "SearchAlgorithm",
    "SearchError",
    "SearchResult",
    "Verifier",
    "VerifierError",
    "as_budget",
]
