"""Tests marked `gpu` (or `tpu`) skip themselves where JAX sees no such device."""

import jax
import pytest


def _has(platform: str) -> bool:
    try:
        return bool(jax.devices(platform))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    for platform in ("gpu", "tpu"):
        marked = [item for item in items if platform in item.keywords]
        if marked and not _has(platform):
            skip = pytest.mark.skip(reason=f"needs a {platform.upper()} (JAX sees none)")
            for item in marked:
                item.add_marker(skip)
