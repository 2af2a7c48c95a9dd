"""The same exact search spread over a Dask cluster: training shards on workers, top-k merged here.

Each worker searches every synthetic image against one contiguous shard of the training set and
returns a partial top-k with global indices and exact (re-scored) values; the partial results are
merged as they arrive with the search's own final ordering. Because the top-k of a union is the
top-k of the partial top-ks, the answer equals the local search, ties included.

Inputs given as files (``.npy`` paths, saved ImageSet folders, memmaps) travel as a path and an
offset: every worker reads its own shard from the shared filesystem. In-memory arrays are scattered
(the synthetic set to every worker, each training shard to one).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from memstudy.correlate.exclude import Exclude, resolve_exclude
from memstudy.correlate.matches import Matches, merge_matches
from memstudy.correlate.search import report_constants, search
from memstudy.correlate.sources import Channel, Source, check_compatible, open_pair

logger = logging.getLogger(__name__)


def _shard_search(
    synthetic: Source,
    shard: Source,
    offset: int,
    k: int,
    backend: str,
    chunk_mb: float | None,
    exclusion: Any,
) -> Matches:
    """Worker task: search one training shard, reporting global training indices."""
    return search(
        synthetic,
        shard,
        k,
        backend=backend,
        chunk_mb=chunk_mb,
        exclusion=exclusion,
        training_offset=offset,
        progress=False,
    )


def topk_pearson_dask(
    synthetic: Any,
    training: Any,
    k: int = 1,
    *,
    client: Any,
    n_shards: int | None = None,
    backend: str = "auto",
    chunk_mb: float | None = None,
    exclude: Exclude | str | dict | None = None,
    channel: Channel = None,
    progress: bool | None = None,
) -> Matches:
    """:func:`memstudy.correlate.topk_pearson` on a Dask cluster.

    Parameters
    ----------
    synthetic, training, k, backend, chunk_mb, exclude, channel, progress
        As for :func:`~memstudy.correlate.topk_pearson`. ``backend`` and ``chunk_mb`` apply on each
        worker (``auto`` picks a GPU on workers that have one); ``chunk_mb`` is per task.
    client : distributed.Client
        A client of the cluster: ``Client(LocalCluster(...))``, ``Client("tcp://scheduler:8786")``
        or ``Client(SLURMCluster(...))`` from dask-jobqueue.
    n_shards : int, optional
        Number of training shards (tasks). Default: one per worker. Every shard streams the whole
        synthetic set, so more shards than workers only helps to balance uneven workers.

    Returns
    -------
    Matches
        The same as the local search, indices and values.

    Notes
    -----
    File inputs must be readable at the same path on every worker (a shared filesystem).
    """
    from distributed import as_completed

    syn, train = open_pair(synthetic, training, channel)
    check_compatible(syn, train)
    if not 1 <= k <= train.n:
        raise ValueError(f"k must be between 1 and the number of training images ({train.n}), got {k}")
    exclusion = resolve_exclude(exclude, syn, train)
    if n_shards is None:
        n_shards = max(1, len(client.scheduler_info().get("workers", {})))
    n_shards = int(min(max(1, n_shards), train.n))
    bounds = np.linspace(0, train.n, n_shards + 1).round().astype(int)
    logger.info("searching %d × %d images in %d training shards", syn.n, train.n, n_shards)

    def ship(source: Source, *, broadcast: bool) -> Any:
        # A file source is a path and an offset; an in-memory one is data worth sending once.
        return client.scatter(source, broadcast=broadcast, hash=False) if source.in_memory else source

    syn_ref = ship(syn, broadcast=True)
    exclusion_ref = client.scatter(exclusion, broadcast=True, hash=False) if exclusion is not None else None
    futures = [
        client.submit(
            _shard_search,
            syn_ref,
            ship(train.subset(a, b), broadcast=False),
            int(a),
            k,
            backend,
            chunk_mb,
            exclusion_ref,
            pure=False,
        )
        for a, b in itertools.pairwise(bounds)
    ]
    merged = None
    with tqdm(
        total=len(futures), unit="shard", desc="correlate", disable=None if progress is None else not progress
    ) as bar:
        for future in as_completed(futures):
            part = future.result()
            merged = part if merged is None else merge_matches([merged, part])
            bar.update(1)
    report_constants(merged, exclusion)
    return merged
