"""Scale-out on Ray: batch scoring of stored images into Parquet, and a fit across workers.

- :mod:`~patchcore.scale.batch`: :func:`batch_score` (one inspection record a row, resumable,
  every input written once) and :func:`read_results`.
- :mod:`~patchcore.scale.fit`: :func:`fit_distributed` (the detector's public hooks and the
  coreset's stages across workers; the model keeps its bank provenance).
- :mod:`~patchcore.scale.sources`: :func:`list_sources` (folders, globs, lists, URIs).
- :mod:`~patchcore.scale.session`: joining or starting Ray, restartable actors, and an end
  that leaves no worker process behind.

Ray and pyarrow are optional (``pip install 'patchcore[ray]'``), imported only when a job runs.
See docs/cluster.md.
"""

from patchcore.scale.batch import BatchSummary, batch_schema, batch_score, read_results
from patchcore.scale.fit import DistributedFit, FitShard, fit_distributed
from patchcore.scale.session import BatchError, WorkerLostError
from patchcore.scale.sources import list_sources

__all__ = [
    "BatchError",
    "BatchSummary",
    "DistributedFit",
    "FitShard",
    "WorkerLostError",
    "batch_schema",
    "batch_score",
    "fit_distributed",
    "list_sources",
    "read_results",
]
