"""Fixtures shared by every test suite (core, Slicer logic, packaging)."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def openvino_cache(tmp_path_factory):
    """Networks converted for OpenVINO (``mim segment --fast``) go to a temporary cache, not the
    user's (also for the subprocesses the tests start)."""
    folder = tmp_path_factory.mktemp("openvino_cache")
    old = os.environ.get("MIM_OPENVINO_CACHE")
    os.environ["MIM_OPENVINO_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("MIM_OPENVINO_CACHE", None)
    else:
        os.environ["MIM_OPENVINO_CACHE"] = old


@pytest.fixture(scope="session")
def sample_datalist(tmp_path_factory):
    """Path of the sample ``datalist.json``, fetched once per session (real pip download).

    Set ``MIM_DATA_DIR`` to reuse a cache across sessions; otherwise a temporary folder.
    """
    from mimcore.data.samples import fetch_samples

    cache = os.environ.get("MIM_DATA_DIR") or tmp_path_factory.mktemp("mim_samples")
    return fetch_samples(cache_dir=cache, quiet=True)


@pytest.fixture(scope="session")
def ct_folder(tmp_path_factory):
    """Two small synthetic CT-like volumes (HU): a noisy sphere, anisotropic spacing."""
    import numpy as np

    from mimcore.data.volume_io import save_volume

    folder = tmp_path_factory.mktemp("cts")
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(70, 66, 60), (50, 72, 68)]):
        x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
        hu = -1000 + 1100 * (x**2 + y**2 + z**2 < 0.7) + 40 * rng.standard_normal(shape)
        save_volume(folder / f"ct{i}.nii.gz", hu.astype(np.float32), np.diag([0.8, 0.9, 2.5, 1.0]))
    return folder
