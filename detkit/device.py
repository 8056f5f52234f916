"""``--device`` of the training tools: which device a run uses, chosen before CUDA starts.

The trainer takes ``cuda:LOCAL_RANK`` when CUDA is available (one GPU per torchrun process) and
the CPU otherwise. :func:`select_training_device` narrows what the process can see instead of
threading a device through the engine: ``cpu`` hides every GPU, ``cuda:N`` (or ``N``) shows only
GPU N (counted among those already visible), ``cuda`` changes nothing but requires a GPU. It
must run before the first CUDA call of the process, as ``CUDA_VISIBLE_DEVICES`` is read then.
"""

from __future__ import annotations

import os
import re

from .errors import DetkitError

__all__ = ["select_training_device"]


def select_training_device(device: str | None) -> None:
    """Restrict the visible devices to ``device`` (None: leave the default); errors name it."""
    if device is None:
        return
    text = device.strip().lower()
    match = re.fullmatch(r"(?:cuda:)?(\d+)", text)
    if text not in ("cpu", "cuda") and match is None:
        raise DetkitError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    import torch
    if torch.cuda.is_initialized():
        raise DetkitError(f"--device {device}: CUDA is already initialised in this process; "
                          f"set CUDA_VISIBLE_DEVICES before starting it instead")
    if text == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and match is not None:
        raise DetkitError(f"--device {device}: under torchrun every process takes the GPU of its "
                          f"LOCAL_RANK; choose the GPUs with CUDA_VISIBLE_DEVICES")
    if match is not None:
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        index = int(match.group(1))
        if visible and index >= len(visible):
            raise DetkitError(f"--device {device}: only {len(visible)} GPUs are visible "
                              f"(CUDA_VISIBLE_DEVICES={','.join(visible)})")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if visible else str(index)
    if not torch.cuda.is_available():
        raise DetkitError(f"--device {device}: no CUDA device is available (torch {torch.__version__}, "
                          f"CUDA build: {torch.version.cuda or 'none'}); use --device cpu")
