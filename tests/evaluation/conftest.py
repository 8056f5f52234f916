"""The evaluation tests share fixtures through ``evaluation_helpers`` (tests/ has no packages)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
