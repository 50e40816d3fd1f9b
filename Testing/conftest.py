"""Fixtures shared by every test suite (core, Slicer logic, packaging)."""

import os

import pytest


@pytest.fixture(scope="session")
def sample_datalist(tmp_path_factory):
    """Path of the sample ``datalist.json``, fetched once per session (real pip download).

    Set ``MIM_DATA_DIR`` to reuse a cache across sessions; otherwise a temporary folder.
    """
    from mimcore.data.samples import fetch_samples

    cache = os.environ.get("MIM_DATA_DIR") or tmp_path_factory.mktemp("mim_samples")
    return fetch_samples(cache_dir=cache, quiet=True)
