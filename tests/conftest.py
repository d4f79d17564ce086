"""Tests marked `gpu` (or `tpu`) skip themselves where JAX sees no such device; the `x64`
fixture turns on float64 for the tests that compute a float64 reference."""

import jax
import pytest


def _has(platform: str) -> bool:
    try:
        return bool(jax.devices(platform))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    for platform in ("gpu", "tpu"):
        # The marker itself, not item.keywords: a parameter id "gpu" is a keyword too.
        marked = [item for item in items if item.get_closest_marker(platform) is not None]
        if marked and not _has(platform):
            skip = pytest.mark.skip(reason=f"needs a {platform.upper()} (JAX sees none)")
            for item in marked:
                item.add_marker(skip)


@pytest.fixture
def x64():
    """Float64 for the ground-truth references, only inside the tests that ask for it."""
    with jax.enable_x64(True):
        yield
