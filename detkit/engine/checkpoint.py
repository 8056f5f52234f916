"""Checkpoint files: atomic writes, safe loads, resume fallback, weight loading with shape reports.

A checkpoint is a dict of tensors and primitive containers only (no pickled classes) so that
``torch.load(weights_only=True)`` reads it. Training checkpoints hold::

    model, optimizer, scheduler, scaler, ema (weights, optional), ema_updates, iter, epoch,
    sampler {epoch, batches_consumed}, rng [per rank: python, numpy, torch, cuda (own device)],
    best {metric, value, iter}, skipped_steps, world_size, detkit_version, config (YAML text)

``model`` always holds the trained (non-averaged) weights; when EMA is on, ``ema`` holds the
averaged weights that evaluation used. :func:`inference_state_dict` picks the right one.

Only ``last.pth`` and ``iter_N.pth`` (its fallbacks) need all of that. ``best.pth`` and
``final.pth`` are *inference checkpoints* (:func:`inference_checkpoint`)::

    model (the EMA weights when EMA was on, else the trained ones; optionally float16),
    config, meta {class_names, label_to_cat_id, detkit_version, weights: "ema" | "model",
    dtype}, iter, epoch, best

which every reader of weights (``Predictor``, ``tools/eval.py``, ``train.load_from``) takes as
it takes a full checkpoint; ``--resume`` refuses them with a message that says so.
"""

from __future__ import annotations

import io
import os
import random
import re
from pathlib import Path
from typing import Any, Iterable, cast

import numpy as np
import torch
from torch import nn

from ..errors import DetkitError

__all__ = ["CheckpointError", "save_checkpoint", "atomic_write_bytes", "load_checkpoint",
           "resume_candidates", "load_resume_checkpoint", "prune_iter_checkpoints",
           "load_model_weights", "inference_state_dict", "get_rng_state", "set_rng_state",
           "remove_stale_temporaries", "saved_iteration", "inference_checkpoint", "INFERENCE_KEYS",
           "save_last_checkpoint", "link_or_copy", "ssl_weights_in_frozen_bn"]

ITER_PATTERN = re.compile(r"^iter_(\d+)\.pth$")


class CheckpointError(DetkitError, RuntimeError):
    """A checkpoint that cannot be read, or whose weights do not fit the model."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash at any moment leaves the old file or the new one.

    Temporary file in the same directory -> fsync -> ``os.replace`` (atomic on POSIX and
    Windows) -> fsync of the directory so the rename itself survives a power loss.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temporaries(work_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed save left behind (never a finished checkpoint)."""
    stale = list(Path(work_dir).glob(".*.pth.tmp.*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_checkpoint(state: dict, paths: Iterable[str | os.PathLike]) -> None:
    """Serialise ``state`` once and write it atomically to every path in ``paths``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    for path in paths:
        try:
            atomic_write_bytes(path, data)
        except OSError as e:   # a full or read-only disk: name the file; the old checkpoint is intact
            raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}; the previous "
                                  f"checkpoint of the work dir is unchanged (free space, then "
                                  f"--resume)") from e


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make ``target`` name the same file as ``source``: a hard link (no bytes written), or an
    atomic copy where the file system has none. An existing ``target`` is replaced atomically."""
    source, target = Path(source), Path(target)
    tmp = target.with_name(f".{target.name}.tmp.{os.getpid()}")
    try:
        os.link(source, tmp)
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write_bytes(target, source.read_bytes())


def save_last_checkpoint(state: dict, work_dir: str | os.PathLike, keep: int) -> None:
    """Write ``last.pth``; with ``keep`` > 0 the previous ``last.pth`` (iteration M) first becomes
    ``iter_M.pth`` and only the ``keep`` newest of those stay.

    ``iter_N.pth`` are the fallbacks of an unreadable ``last.pth`` (:func:`resume_candidates`), so
    none of them ever equals ``last.pth``; the old file is renamed by a hard link, not copied.
    """
    work_dir = Path(work_dir)
    last = work_dir / "last.pth"
    previous = saved_iteration(last) if keep > 0 and last.is_file() else None
    if previous is not None and previous != state.get("iter"):
        link_or_copy(last, work_dir / f"iter_{previous}.pth")
    save_checkpoint(state, [last])
    if keep > 0:
        prune_iter_checkpoints(work_dir, keep)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the likely cause."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle and unpickler errors all mean "unreadable"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ("it holds objects other than tensors and plain containers (weights_only refused "
                "them)" if "Unsupported global" in str(e)
                else "the file is truncated or corrupt (e.g. a copy or save was interrupted)")
        raise CheckpointError(f"cannot read checkpoint {path} ({size} bytes): {hint}: "
                              f"{type(e).__name__}: {reason}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, got {type(ckpt).__name__}")
    return ckpt


def saved_iteration(path: str | os.PathLike) -> int | None:
    """The ``iter`` of a training checkpoint, or None when the file is absent or unreadable.

    Memory-mapped: only the small entries are read, not the weights of a large file.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - absent, truncated or foreign: "no usable checkpoint"
        return None
    value = ckpt.get("iter") if isinstance(ckpt, dict) else None
    return int(value) if isinstance(value, int) else None


def resume_candidates(work_dir: str | os.PathLike) -> list[Path]:
    """``last.pth`` then ``iter_N.pth`` newest first: the order in which ``--resume`` tries them."""
    work_dir = Path(work_dir)
    found = []
    if (work_dir / "last.pth").is_file():
        found.append(work_dir / "last.pth")
    iters = []
    for p in work_dir.glob("iter_*.pth"):
        m = ITER_PATTERN.match(p.name)
        if m:
            iters.append((int(m.group(1)), p))
    found += [p for _, p in sorted(iters, reverse=True)]
    return found


def load_resume_checkpoint(work_dir: str | os.PathLike, explicit: str | os.PathLike | None = None,
                           log=print) -> tuple[Path, dict] | None:
    """The checkpoint to resume from, or None when the work dir has none.

    With ``explicit`` that file must load. Otherwise each of :func:`resume_candidates` is tried
    in order; an unreadable one is reported through ``log`` and the next older one is used.
    """
    if explicit is not None:
        return Path(explicit), _check_resumable(load_checkpoint(explicit), explicit)
    candidates = resume_candidates(work_dir)
    if not candidates:
        return None
    errors = []
    for path in candidates:
        try:
            ckpt = _check_resumable(load_checkpoint(path), path)
        except CheckpointError as e:
            errors.append(str(e))
            log(f"WARNING: {e}; falling back to an older checkpoint")
            continue
        if errors:
            log(f"resuming from {path} (iteration {ckpt['iter']}) instead")
        return path, ckpt
    raise CheckpointError("no readable checkpoint to resume from in "
                          f"{work_dir}:\n  " + "\n  ".join(errors))


def _check_resumable(ckpt: dict, path) -> dict:
    missing = [k for k in ("model", "optimizer", "iter") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} cannot be resumed from: it lacks "
                              f"{', '.join(missing)} (a weights-only file? use train.load_from)")
    return ckpt


def prune_iter_checkpoints(work_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``iter_N.pth``; returns the deleted paths."""
    iters = sorted((int(m.group(1)), p) for p in Path(work_dir).glob("iter_*.pth")
                   if (m := ITER_PATTERN.match(p.name)))
    doomed = [p for _, p in iters[: max(len(iters) - keep, 0)]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def inference_state_dict(ckpt: dict) -> dict:
    """The weights to predict with: EMA when the checkpoint has them, else ``model``; a bare
    state_dict is returned as is."""
    if isinstance(ckpt.get("ema"), dict) and ckpt["ema"]:
        return ckpt["ema"]
    if isinstance(ckpt.get("model"), dict):
        return ckpt["model"]
    return ckpt


INFERENCE_KEYS = ("config", "iter", "epoch", "best")   # kept beside the weights and meta


def inference_checkpoint(ckpt: dict, *, fp16: bool = False) -> dict:
    """The part of a checkpoint that inference needs (see the module doc): no optimizer,
    scheduler, scaler, RNG or sampler state, one set of weights. ``fp16`` stores floating-point
    tensors as float16 (half the size; loading casts them back to the model's dtype), except a
    tensor with values beyond float16's range (65504), which stays as it is."""
    weights = _strip_prefix(dict(inference_state_dict(ckpt)))
    if fp16:
        weights = {k: _half_if_representable(v) for k, v in weights.items()}
    meta = dict(ckpt["meta"]) if isinstance(ckpt.get("meta"), dict) else {}
    has_ema = isinstance(ckpt.get("ema"), dict) and bool(ckpt["ema"])
    meta["weights"] = "ema" if has_ema else meta.get("weights", "model")
    meta["dtype"] = "float16" if fp16 else meta.get("dtype", "float32")
    return {"model": weights, "meta": meta, **{k: ckpt[k] for k in INFERENCE_KEYS if k in ckpt}}


def _half_if_representable(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_floating_point() or tensor.dtype == torch.float16:
        return tensor
    if tensor.numel() and float(tensor.detach().abs().max()) > torch.finfo(torch.float16).max:
        return tensor
    return tensor.detach().half()


def _strip_prefix(state: dict) -> dict:
    # Weights saved from a DDP-wrapped or torch.compile'd model carry these prefixes.
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_model_weights(model: nn.Module, state: dict, *, source: str = "checkpoint",
                       allow_mismatch: bool = False, log=print,
                       architecture: str | None = None) -> dict[str, list]:
    """Load ``state`` into ``model``, reporting keys whose shapes differ (e.g. another class count).

    ``allow_mismatch=False``: any shape mismatch, missing or unexpected key is a CheckpointError.
    For a checkpoint of another model (``architecture``, the checkpoint's as
    :func:`~detkit.engine.architecture.describe_checkpoint` names it, differs from the model's,
    or fewer than half of the model's tensors fit) that error is one line naming both
    architectures and the counts; otherwise it lists the keys. ``allow_mismatch=True``
    (fine-tuning with ``load_from``): matching tensors are loaded, the others keep the fresh
    initialisation and are named through ``log``; under half matched is one warning line, none
    matched a CheckpointError. float16 weights are cast to the model's dtype. Returns the
    three key lists.
    """
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: the weights are a {type(state).__name__}, not a state dict")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{source}: not a state dict of tensors: '{bad}' is a "
                              f"{type(state[bad]).__name__}")
    state = _strip_prefix(dict(state))
    own = model.state_dict()
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    loadable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    keys = {"mismatched": [k for k, _, _ in mismatched], "missing": missing, "unexpected": unexpected}
    if not (mismatched or missing or unexpected):
        model.load_state_dict(loadable)
        return keys
    from .architecture import describe_model

    ours = describe_model(model)
    foreign = (architecture is not None and architecture != ours) or 2 * len(loadable) < len(own)
    counts = (f"{len(own) - len(loadable)} of the model's {len(own)} tensors do not match "
              f"({len(missing)} missing, {len(mismatched)} with other shapes) and {len(unexpected)} "
              f"of the file's {len(state)} are not in the model")
    names = f"{source} holds {architecture or 'a model of unknown architecture (no stored config)'}, " \
            f"the model is {ours}"
    if not allow_mismatch:
        if foreign:
            raise CheckpointError(f"{names}: a checkpoint of another model; {counts}")
        raise CheckpointError(_misfit_report(source, mismatched, missing, unexpected))
    if not loadable:
        raise CheckpointError(f"train.load_from: {names}: none of the model's {len(own)} tensors "
                              f"match, a checkpoint of another model? ({counts})")
    model.load_state_dict(loadable, strict=False)
    if 2 * len(loadable) < len(own):
        log(f"WARNING: load_from {source}: only {len(loadable)} / {len(own)} model tensors matched "
            f"({names}); the others keep their initialisation")
    else:
        _log_partial_load(source, mismatched, missing, unexpected, log)
    return keys


def _shape_lines(source: str, mismatched: list) -> list[str]:
    return [f"  {k}: {source} {list(a)} vs model {list(b)}" for k, a, b in mismatched]


def _misfit_report(source: str, mismatched: list, missing: list, unexpected: list) -> str:
    """The multi-line error of weights of the same model that do not fit (another class count)."""
    msg = [f"weights in {source} do not fit the model:"]
    if mismatched:
        msg += ["shape mismatch (a different num_classes?):", *_shape_lines(source, mismatched)]
    if missing:
        msg.append(f"missing in {source}: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        more = " ..." if len(unexpected) > 20 else ""
        msg.append(f"not in the model: {', '.join(unexpected[:20])}{more}")
    if mismatched:
        msg.append("to fine-tune on another class count, use train.load_from (mismatching "
                   "layers are re-initialised)")
    return "\n".join(msg)


def _log_partial_load(source: str, mismatched: list, missing: list, unexpected: list, log) -> None:
    if mismatched:
        layers = sorted({k.rsplit(".", 1)[0] for k, _, _ in mismatched})
        log(f"load_from {source}: re-initialised layers with mismatching shapes: {', '.join(layers)}\n"
            + "\n".join(_shape_lines(source, mismatched)))
    if missing:
        log(f"load_from {source}: {len(missing)} model keys not in the file (kept their "
            f"initialisation): {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        log(f"load_from {source}: {len(unexpected)} keys in the file ignored: "
            f"{', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")


def get_rng_state(model: nn.Module | None = None) -> dict:
    """This process's RNG states (python, numpy, torch, CUDA) as tensors and primitives, plus the
    size generator of ``model.multiscale_train`` when the model has one."""
    np_state = cast(tuple, np.random.get_state(legacy=True))   # legacy=True: the MT19937 tuple
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # This process's device only: get_rng_state_all() would open a context on every GPU.
        state["cuda"] = torch.cuda.get_rng_state()
    multiscale = getattr(model, "multiscale_train", None)
    if multiscale is not None:
        state["multiscale"] = multiscale.state_dict()
    return state


def set_rng_state(state: dict, model: nn.Module | None = None) -> None:
    """Restore what :func:`get_rng_state` returned (the CUDA state into the current device)."""
    multiscale = getattr(model, "multiscale_train", None)
    if multiscale is not None and "multiscale" in state:
        multiscale.load_state_dict(state["multiscale"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda.cpu())


def ssl_weights_in_frozen_bn(model_cfg: dict, model: nn.Module) -> str | None:
    """A one-line warning when ``model.backbone.weights`` is a detkit self-supervised checkpoint
    and the built backbone has FrozenBN layers, else None.

    Self-supervised statistics come from other images and augmentations than the detector sees;
    the MoCo paper fine-tunes such backbones with (Sync)BN, which learns them on the detection data.
    """
    backbone_cfg = model_cfg.get("backbone") if isinstance(model_cfg, dict) else None
    weights = backbone_cfg.get("weights") if isinstance(backbone_cfg, dict) else None
    backbone = getattr(model, "backbone", None)
    if not isinstance(weights, str) or not os.path.isfile(weights) or not isinstance(backbone, nn.Module):
        return None
    if not any(type(m).__name__ == "FrozenBatchNorm2d" for m in backbone.modules()):
        return None
    try:
        ckpt = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - the backbone already loaded it; nothing more to say here
        return None
    ssl = (ckpt.get("meta") or {}).get("ssl") if isinstance(ckpt, dict) else None
    if not isinstance(ssl, dict):
        return None
    return (f"WARNING: model.backbone.weights {weights} is a {ssl.get('method', '?')} self-supervised "
            f"checkpoint and the backbone uses FrozenBN, which keeps the pre-training statistics; "
            f"fine-tune it with BatchNorm as the MoCo paper does (SyncBN): --set "
            f"model.backbone.norm=BN, plus train.sync_bn=true on several GPUs")
