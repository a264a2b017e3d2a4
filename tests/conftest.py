"""Shared test set-up: float32 with 'highest' matmul precision, a persistent compilation cache,
and the read-only reference data in ../shared (or $MGDN_SHARED)."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

from mgdn_jax import runtime

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MGDN_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"

# The dataset test modules import helpers from, and take fixtures of, this module: its asserts are
# rewritten only if it is registered before any of them imports it.
pytest.register_assert_rewrite("dataset_fixtures")

os.environ.setdefault("MGDN_JAX_CACHE", str(REPO / ".jax_cache"))
runtime.configure()  # the same XLA flags and compilation cache as the command-line tools
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def reference() -> Path:
    """../shared/reference; missing data fails under CI=true and skips elsewhere."""
    if not REFERENCE.is_dir():
        message = f"reference data not found at {REFERENCE} (set MGDN_SHARED)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return REFERENCE
