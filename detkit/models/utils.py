"""Model utilities shared by backbones, the trainer and checkpoint code."""

from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn

__all__ = ["load_state_dict_checked"]


def _short_list(keys, limit: int = 10) -> str:
    keys = list(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_dict_checked(module: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True,
                            source: str = "state dict"):
    """``module.load_state_dict`` with errors that name every bad key.

    Raises ValueError listing each key whose shape differs (``key: expected (...), got (...)``),
    and, when ``strict``, the missing and unexpected keys. ``source`` (e.g. a file path) is
    included in the message. Returns torch's ``(missing_keys, unexpected_keys)`` result.
    Checks happen before anything is copied.
    """
    own = module.state_dict()
    mismatched = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(v.shape)}"
                  for k, v in state_dict.items()
                  if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise ValueError(f"{source}: {len(mismatched)} tensor(s) have the wrong shape for "
                         f"{type(module).__name__}:\n  " + "\n  ".join(mismatched))
    # Checked before loading so that a failed strict load leaves the module untouched. BN step
    # counters are ignored both ways: FrozenBatchNorm2d has none, BN checkpoints always do.
    def counted(k: str) -> bool:
        return not k.endswith("num_batches_tracked")

    missing = [k for k in own if k not in state_dict and counted(k)]
    unexpected = [k for k in state_dict if k not in own and counted(k)]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short_list(unexpected)}")
        raise ValueError(f"{source} does not match {type(module).__name__}: " + "; ".join(parts))
    return module.load_state_dict(dict(state_dict), strict=False)
