"""Inference-time search: verifiers, NFE budgets and search algorithms on one signature.

Every algorithm is ``search(velocity, shape, verifier, budget, *, n_return, steps, generator,
...) -> SearchResult`` and never spends more NFE than its budget (see :mod:`.budget`):

=============  ==============================================  ==========================
name           module                                          searches over
=============  ==============================================  ==========================
best-of-n      :mod:`guidance.search.random_search`             initial noises (ODE)
zero-order     :mod:`guidance.search.zero_order`                initial noises (ODE)
paths          :mod:`guidance.search.paths`                     re-noised partial paths
smc            :mod:`guidance.search.smc`                       SDE trajectories (FK SMC)
smc-guided     :mod:`guidance.search.smc_guided`                SDE trajectories, guided
backtrack      :mod:`guidance.search.backtrack`                 SDE segments (retries)
=============  ==============================================  ==========================
"""

from guidance.search import backtrack, paths, random_search, smc, smc_guided, zero_order
from guidance.search.budget import Budget, BudgetExceeded, as_budget
from guidance.search.common import SearchError, SearchResult
from guidance.search.verifiers import (
    CallableVerifier,
    ClearanceVerifier,
    EnsembleVerifier,
    OracleVerifier,
    PreferenceVerifier,
    Verifier,
    VerifierError,
)

#: name -> search function
ALGORITHMS = {
    "best-of-n": random_search.search,
    "zero-order": zero_order.search,
    "paths": paths.search,
    "smc": smc.search,
    "smc-guided": smc_guided.search,
    "backtrack": backtrack.search,
}
#: algorithms that need the obstacles' field (keyword ``field=``)
NEEDS_FIELD = ("smc-guided", "backtrack")

__all__ = [
    "ALGORITHMS",
    "NEEDS_FIELD",
    "Budget",
    "BudgetExceeded",
    "CallableVerifier",
    "ClearanceVerifier",
    "EnsembleVerifier",
    "OracleVerifier",
    "PreferenceVerifier",
    "SearchError",
    "SearchResult",
    "Verifier",
    "VerifierError",
    "as_budget",
]
