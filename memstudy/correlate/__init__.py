"""Exact top-k Pearson search of synthetic images against training images (CPU, GPU, out-of-core).

``topk_pearson`` is the entry point; ``memstudy.correlate.distributed.topk_pearson_dask`` spreads
the same search over a Dask cluster.
"""

from memstudy.correlate.core import release_buffers
from memstudy.correlate.exclude import Exclude
from memstudy.correlate.matches import Matches, merge_matches
from memstudy.correlate.search import topk_pearson

__all__ = ["Exclude", "Matches", "merge_matches", "release_buffers", "topk_pearson"]
