"""Change detectors: a loader whose output changes must bump its version, so caches are rebuilt.

Each test hashes a loader's output on a fixture of the real layout and compares (version, hash) with
the pair recorded here. The inputs and the loaders are exact (integer arithmetic or float64 without
BLAS), so the hash is the same on every CPU. When a test fails: if the output changed on purpose,
bump the version named in the message, then record the new pair it prints.
"""

from __future__ import annotations

import hashlib

import numpy as np

from memstudy.data import brats, chestxray, load_brats, load_chestxray
from memstudy.data.phantoms import CXR_PHANTOM_VERSION, chest_xray_phantom_image

RECORDED = {
    "brats": (2, "3f7ea35a145d04c7435cd224f8ca8edef7560ca78027d9aa0e99b64cd2ec8b89"),
    "chestxray": (3, "88276b05ee4f223c451e592e4b41f2d76f4d19d20cf02a588b505b217f72241b"),
    "cxr-phantom": (2, "9d803359d9880ec81e3d52fe40dae69f9d84b2ca6302d7bc482a87472e4ded45"),
}


def fingerprint(*arrays_and_texts) -> str:
    digest = hashlib.sha256()
    for item in arrays_and_texts:
        digest.update(
            np.ascontiguousarray(item).tobytes() if isinstance(item, np.ndarray) else repr(item).encode()
        )
    return digest.hexdigest()


def imageset_fingerprint(imageset) -> str:
    return fingerprint(np.asarray(imageset.images), imageset.names, imageset.groups, imageset.channels)


def check(name: str, version: int, digest: str, where: str) -> None:
    assert (version, digest) == RECORDED[name], (
        f"{name}: output or version changed. If the output changed, bump {where}; then record "
        f"{name!r}: ({version}, {digest!r}) in RECORDED (tests/test_data_fingerprints.py)"
    )


def test_brats_loader_output_changes_only_with_its_pipeline_version(brats20_root):
    slices = load_brats(brats20_root, pad_to=32, holdout=2, progress=False)
    resized = load_brats(brats20_root, pad_to=32, size=16, channels=("t1", "seg"), progress=False)
    cubes = load_brats(brats20_root, mode="3d", size=8, progress=False)
    digest = fingerprint(*(imageset_fingerprint(s) for s in (slices, resized, cubes)))
    check("brats", brats.PIPELINE_VERSION, digest, "PIPELINE_VERSION in memstudy/data/brats.py")


def test_chestxray_loader_output_changes_only_with_its_pipeline_version(kermany_root):
    images = load_chestxray(kermany_root, size=32, progress=False)
    subset = load_chestxray(kermany_root, size=16, n_subjects=2, progress=False)
    digest = fingerprint(imageset_fingerprint(images), imageset_fingerprint(subset))
    check("chestxray", chestxray.PIPELINE_VERSION, digest, "PIPELINE_VERSION in memstudy/data/chestxray.py")


def test_cxr_phantom_output_changes_only_with_its_version():
    normal, lungs = chest_xray_phantom_image(0, (0, 0, 1), None)
    pneumonia, _ = chest_xray_phantom_image(0, (0, 1, 1), "virus")
    digest = fingerprint(normal, lungs, pneumonia)
    check("cxr-phantom", CXR_PHANTOM_VERSION, digest, "CXR_PHANTOM_VERSION in memstudy/data/cxr_phantom.py")
