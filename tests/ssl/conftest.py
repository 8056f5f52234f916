import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))   # ssl_helpers (--import-mode=importlib)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A tiny shapes dataset (20 train / 4 val images of 64 x 64)."""
    from detkit.data.shapes import generate

    root = tmp_path_factory.mktemp("ssl_shapes")
    generate(root, num_train=20, num_val=4, size=64, seed=0)
    return root
