"""Helpers shared by the kernel and linear-block tests."""

from __future__ import annotations

import re

import numpy as np


def rel_rms(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64 on the host (the plain norm of x - ref when ref is zero)."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch: {x.shape} vs reference {ref.shape}")
    num = np.sqrt(np.mean((x - ref) ** 2))
    den = np.sqrt(np.mean(ref**2))
    if den == 0.0:
        return float(num)
    return float(num / den)


def launch_params(module: str) -> dict:
    """{kernel name: (num_warps, num_stages)} of the Triton custom calls in an exported module's text."""
    found = re.findall(r'name = "([^"]+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', module)
    return {name: (int(warps), int(stages)) for name, stages, warps in found}
