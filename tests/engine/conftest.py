"""Fixtures of the engine tests: one small shapes dataset per session, one torch thread."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The test modules import engine_helpers as a top-level module (tests/ has no packages).
sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_helpers  # noqa: E402,F401  (registers the toy detector)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    from detkit.data.shapes import generate

    root = tmp_path_factory.mktemp("shapes")
    generate(root, num_train=16, num_val=8, size=64, seed=0)
    return root

