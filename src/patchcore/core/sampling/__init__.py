"""Memory-bank subsampling: greedy k-center coresets and seeded random subsampling.

- :mod:`~patchcore.core.sampling.coreset`: the selections a detector calls
  (:func:`chunked_greedy_coreset`, the default; :func:`greedy_coreset`, the exact greedy;
  :func:`extend_coreset` for updates; :func:`random_subsample`) and :func:`coverage_radius`.
- :mod:`~patchcore.core.sampling.stages`: the three stages of :func:`chunked_greedy_coreset`
  as functions that run apart (the fit across Ray workers runs them shard by shard).
- :mod:`~patchcore.core.sampling.kcenter`: the exact greedy k-center kernel (the plain loop and
  the pruned search proven to select the same rows).
"""

from patchcore.core.sampling.coreset import (
    CoresetSelection,
    chunked_greedy_coreset,
    coreset_size,
    coverage_radius,
    extend_coreset,
    greedy_coreset,
    random_projection,
    random_subsample,
)
from patchcore.core.sampling.kcenter import parallel_blocks

__all__ = [
    "CoresetSelection",
    "chunked_greedy_coreset",
    "coreset_size",
    "coverage_radius",
    "extend_coreset",
    "greedy_coreset",
    "parallel_blocks",
    "random_projection",
    "random_subsample",
]
