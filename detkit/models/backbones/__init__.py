from ..._imports import import_all

__all__ = import_all(__name__, globals())
