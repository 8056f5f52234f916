"""Checkpoint converters: torchvision detection models (``torchvision.py``) and Hugging Face
``transformers`` model folders (``transformers.py``), side by side."""

from .torchvision import *  # noqa: F401,F403
from .torchvision import __all__ as _tv_all

__all__ = list(_tv_all)
