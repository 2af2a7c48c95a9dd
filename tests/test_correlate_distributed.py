"""The Dask search on a LocalCluster gives the local search's answer."""

from __future__ import annotations

import numpy as np
import pytest

from memstudy.correlate import Exclude, topk_pearson
from memstudy.correlate.distributed import topk_pearson_dask


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    )
    with distributed.Client(cluster) as dask_client:
        yield dask_client
    cluster.close()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    training = rng.integers(0, 256, (157, 12, 12), dtype=np.uint8)
    synthetic = rng.integers(0, 256, (21, 12, 12), dtype=np.uint8)
    synthetic[2] = training[150]
    synthetic[9] = training[3] // 3 + 40
    training[77] = 9  # constant
    return synthetic, training


def test_dask_search_of_arrays_equals_local_search(client, images):
    synthetic, training = images
    local = topk_pearson(synthetic, training, k=4, backend="numpy")

    distributed = topk_pearson_dask(synthetic, training, k=4, client=client, n_shards=5, backend="numpy")

    np.testing.assert_array_equal(distributed.indices, local.indices)
    np.testing.assert_allclose(distributed.values, local.values, atol=1e-6)
    np.testing.assert_array_equal(distributed.constant_training, [77])
    assert distributed.indices[2, 0] == 150 and distributed.indices[9, 0] == 3


def test_dask_search_of_npy_files_with_exclusion_equals_local_search(client, images, tmp_path):
    _, training = images
    np.save(tmp_path / "train.npy", training)
    exclude = Exclude(same_group=True, groups=np.arange(157) // 4)
    local = topk_pearson(training, training, k=3, exclude=exclude, backend="numpy")

    distributed = topk_pearson_dask(
        tmp_path / "train.npy",
        str(tmp_path / "train.npy"),
        k=3,
        client=client,
        exclude=exclude,
        chunk_mb=0.04,
    )

    np.testing.assert_array_equal(distributed.indices, local.indices)
    np.testing.assert_allclose(distributed.values, local.values, atol=1e-6)
    groups = np.arange(157) // 4
    found = distributed.indices >= 0
    assert (groups[distributed.indices[found]] != np.broadcast_to(groups[:, None], found.shape)[found]).all()


def test_dask_search_with_more_shards_than_k_allows(client, images):
    synthetic, training = images
    local = topk_pearson(synthetic, training[:10], k=6)

    distributed = topk_pearson_dask(synthetic, training[:10], k=6, client=client, n_shards=4)

    np.testing.assert_array_equal(distributed.indices, local.indices)
    np.testing.assert_allclose(distributed.values, local.values, atol=1e-6)


def test_dask_search_orders_identical_images_straddling_k_by_index(client):
    rng = np.random.default_rng(1)
    training = rng.integers(0, 256, (60, 12, 12), dtype=np.uint8)
    copies = [4, 19, 20, 33, 51]  # spread over the shards
    training[copies] = training[33]
    synthetic = training[[33, 7]].copy()

    found = topk_pearson_dask(synthetic, training, k=3, client=client, n_shards=4, backend="numpy")

    np.testing.assert_array_equal(found.indices[0], [4, 19, 20])
    # Against float64 Pearson computed here: values are r rounded to float32 (≤ 2⁻²⁴·|r| off);
    # the reference itself is off by ~144·2⁻⁵³ at 144 pixels, far below the 1e-12 allowed.
    a = synthetic.reshape(2, -1).astype(np.float64)
    b = training.reshape(60, -1).astype(np.float64)
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    r = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    expected = np.take_along_axis(r, found.indices, axis=1)
    assert np.all(np.abs(found.values - expected) <= 2.0**-24 * np.abs(expected) + 1e-12)
    np.testing.assert_array_equal(found.indices[1, 0], 7)
