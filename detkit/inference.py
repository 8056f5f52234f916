"""Predictor: a config and a checkpoint -> predictions on images, in three lines.

::

    from detkit import Predictor
    predictor = Predictor("configs/centernet/centernet_r18_shapes.yaml", "work_dirs/x/best.pth")
    result = predictor("photo.jpg")      # or a numpy HxWx3 RGB array, a PIL image, or a list

Each result is a dict with ``boxes`` Float[K,4] xyxy in *original-image* pixels (after EXIF
orientation, i.e. as the image is displayed), ``scores`` Float[K], ``labels`` Int64[K] in
0..C-1, ``label_names`` list[str] of length K and ``image_size`` (H0, W0); a segmentor adds
``sem_seg`` Int64[H0,W0], Mask R-CNN ``masks`` Bool[K,H0,W0]. Tensors are on the CPU.

Class names are looked up in this order (first hit wins), so inference works on a machine that
has the checkpoint but not the training data:

1. the ``class_names`` argument;
2. ``meta.class_names`` stored in the checkpoint by the trainer;
3. ``data.class_names`` in the config, then ``class_names`` of the val dataset's config node;
4. the val dataset built from the config (reads its annotation file) when its files exist;
5. ``class_0 .. class_{C-1}`` with a warning.
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
from typing import Any, Sequence, TypeGuard

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from .config import ConfigError, get_path, load_config, load_yaml
from .engine.architecture import describe_checkpoint, describe_model
from .engine.checkpoint import CheckpointError, load_checkpoint, load_model_weights

__all__ = ["Predictor", "CheckpointError", "InferencePipeline", "load_predictor_weights",
           "resolve_class_names", "to_rgb_uint8", "load_input"]


# ---------------------------------------------------------------------------------------------
# Checkpoints (file reading and weight loading are the trainer's, detkit.engine.checkpoint)

def _is_state_dict(obj: Any) -> TypeGuard[dict[str, Tensor]]:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


TORCHVISION_KEY = "roi_heads.box_predictor.cls_score.weight"   # marks a torchvision Faster R-CNN


def extract_state_dict(ckpt: dict, path: str | os.PathLike) -> dict[str, Tensor]:
    """The model weights of a loaded checkpoint: a detkit checkpoint's EMA weights when present
    (they are what the trainer evaluates), else its ``model``; or a bare state dict (detkit's,
    or torchvision's, which :func:`apply_checkpoint` converts)."""
    ema = ckpt.get("ema")
    state: dict[str, Tensor]
    if _is_state_dict(ema):
        state = ema
    elif _is_state_dict(ckpt.get("model")):
        state = ckpt["model"]
    elif _is_state_dict(ckpt):
        state = ckpt
    else:
        keys = ", ".join(map(str, list(ckpt)[:8]))
        raise CheckpointError(f"{path}: refused: neither a detkit checkpoint ({{'model': "
                              f"state_dict, ...}}) nor a detkit / torchvision state dict; "
                              f"top-level keys: {keys}")
    # Weights saved from a DDP-wrapped or torch.compile'd model carry a prefix.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_predictor_weights(model: nn.Module, path: str | os.PathLike) -> dict:
    """Load a checkpoint file's inference weights into ``model``; returns the checkpoint's ``meta``.

    Raises CheckpointError for an unreadable or foreign file, and for weights that do not fit
    (every mismatching key with both shapes, missing and unexpected keys).
    """
    return apply_checkpoint(model, load_checkpoint(path), path)


def apply_checkpoint(model: nn.Module, ckpt: dict, path: str | os.PathLike) -> dict:
    """:func:`load_predictor_weights` for an already loaded checkpoint dict."""
    state = extract_state_dict(ckpt, path)
    own = model.state_dict()
    if TORCHVISION_KEY in state and TORCHVISION_KEY not in own:
        from .models.convert import load_torchvision_weights

        masks = "roi_heads.mask_predictor.mask_fcn_logits.weight" in state
        try:
            load_torchvision_weights(model, state, arch="maskrcnn_resnet50_fpn" if masks
                                     else "fasterrcnn_resnet50_fpn")
        except (ValueError, KeyError, AttributeError, RuntimeError) as e:
            raise CheckpointError(f"{path}: a torchvision {'Mask' if masks else 'Faster'} R-CNN state "
                                  f"dict that does not convert to this model: {e}") from None
    elif not set(state) & set(own):
        sample = ", ".join(list(state)[:4])
        named = describe_checkpoint(ckpt)
        held = f"holds {named}, the model is {describe_model(model)}; " if named else ""
        raise CheckpointError(f"{path}: refused: {held}none of its {len(state)} keys (e.g. {sample}) "
                              f"belong to this model; a checkpoint of another model or framework?")
    else:
        load_model_weights(model, state, source=str(path), architecture=describe_checkpoint(ckpt))
    meta = dict(ckpt["meta"]) if isinstance(ckpt.get("meta"), dict) else {}
    from .models.convert import apply_converted_meta
    apply_converted_meta(model, meta)
    for key in ("class_names", "label_to_cat_id"):   # also accepted at the top level
        if key not in meta and isinstance(ckpt.get(key), (list, tuple)):
            meta[key] = list(ckpt[key])
    return meta


def _resolve_config(config, ckpt: dict | None, checkpoint) -> dict:
    """A config path / dict, or None for the resolved config the trainer stored in the checkpoint."""
    if config is not None:
        return load_config(config) if isinstance(config, (str, os.PathLike)) else copy.deepcopy(config)
    text = ckpt.get("config") if ckpt is not None else None
    if not isinstance(text, str):
        raise ConfigError("Predictor: no config given and "
                          + (f"{checkpoint} does not contain one" if ckpt is not None
                             else "no checkpoint to read one from"))
    try:
        cfg = load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{checkpoint}: the stored config is not valid YAML ({type(e).__name__}); "
                          f"give the config file as well") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{checkpoint}: the stored config is not a mapping")
    return cfg


# ---------------------------------------------------------------------------------------------
# Class names

def _val_dataset_names(cfg: dict) -> tuple[list[str] | None, list[int] | None]:
    """Class names and category ids of the config's val dataset, if its files are readable."""
    try:
        from .data import build_dataset
        split = get_path(cfg, "data.val")
        dataset = build_dataset(split, root=get_path(cfg, "data.root", None))
    except Exception:  # noqa: BLE001 - the data may legitimately be absent at inference time
        return None, None
    names = getattr(dataset, "class_names", None)
    cat_ids = getattr(dataset, "label_to_cat_id", None)
    return (list(names) if names else None), (list(cat_ids) if cat_ids else None)


def resolve_class_names(cfg: dict, meta: dict | None, num_classes: int | None,
                        explicit: Sequence[str] | None = None
                        ) -> tuple[list[str], list[int] | None, str]:
    """Class names, category ids (or None) and where they came from; order in the module doc."""
    meta = meta or {}
    cat_ids = meta.get("label_to_cat_id")
    candidates = [
        (explicit, "argument"),
        (meta.get("class_names"), "checkpoint meta"),
        (get_path(cfg, "data.class_names", None), "config data.class_names"),
        (get_path(cfg, "data.val.dataset.class_names", None), "config data.val.dataset"),
    ]
    for names, source in candidates:
        if names:
            return [str(n) for n in names], (list(cat_ids) if cat_ids else None), source
    names, ds_cat_ids = _val_dataset_names(cfg)
    if names:
        return names, list(cat_ids or ds_cat_ids or []) or None, "val dataset annotations"
    n = int(num_classes or 0)
    warnings.warn(f"Predictor: no class names in the checkpoint meta, the config or the val "
                  f"dataset; using class_0..class_{n - 1}", stacklevel=3)
    return [f"class_{i}" for i in range(n)], (list(cat_ids) if cat_ids else None), "generic"


# ---------------------------------------------------------------------------------------------
# Inputs and outputs

def to_rgb_uint8(array: np.ndarray, name: str = "image") -> np.ndarray:
    """HxWx3 uint8 RGB from an RGB array that may be grayscale (HxW, HxWx1), RGBA or 16-bit."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"{name}: expected an HxW, HxWx3 or HxWx4 image array, got shape {a.shape}")
    a = a[..., :3]
    if a.dtype == np.uint16:
        a = (a.astype(np.uint32) * 255 + 32767) // 65535
    elif a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        # Float images are taken as [0, 1] (matplotlib / skimage convention).
        a = np.clip(np.round(a * 255.0), 0, 255)
    elif a.dtype != np.uint8:
        raise ValueError(f"{name}: unsupported array dtype {a.dtype}")
    return np.ascontiguousarray(a.astype(np.uint8))


def _from_pil(image, name: str) -> np.ndarray:
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)   # as read_image does for files
    if image.mode.startswith("I"):           # 16/32-bit integer grayscale: scale, do not clip
        arr = np.array(image)
        if arr.dtype != np.uint16:
            arr = np.clip(arr, 0, 65535).astype(np.uint16 if arr.max(initial=0) > 255 else np.uint8)
        return to_rgb_uint8(arr, name)
    return np.array(image.convert("RGB"))    # a writable copy (torch.from_numpy warns otherwise)


def load_input(item: Any, index: int = 0) -> tuple[np.ndarray, str]:
    """A path / numpy RGB array / PIL image -> (HxWx3 uint8 RGB, a name for messages)."""
    if isinstance(item, (str, os.PathLike)):
        from .data.io import read_image

        return read_image(item), str(item)
    name = f"input #{index}"
    if isinstance(item, np.ndarray):
        return to_rgb_uint8(item, name), name
    try:
        from PIL import Image

        is_pil = isinstance(item, Image.Image)
    except ImportError:  # pragma: no cover - pillow is a dependency
        is_pil = False
    if is_pil:
        return _from_pil(item, name), name
    raise TypeError(f"{name}: expected a file path, a numpy HxWx3 RGB array or a PIL image, "
                    f"got {type(item).__name__}")


# ---------------------------------------------------------------------------------------------
# Predictor

def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype of inference with ``amp``: float16 on CUDA, bfloat16 elsewhere (CPU)."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


class Predictor:
    """Run a detkit model on images: test pipeline, batching, ``inference_mode``, mapping back.

    Args:
        config: path of a YAML config, an already loaded config dict, or None for the resolved
            config that detkit's trainer stores in every checkpoint.
        checkpoint: a detkit checkpoint (``{"model": state_dict, ...}``, EMA weights preferred
            when present) or a bare detkit / torchvision state dict; ``None`` keeps the freshly
            initialised weights (for smoke tests only).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ...
        score_thr: detections scoring below this are dropped (0 keeps all, e.g. for mAP).
        amp: run under ``torch.autocast`` (float16 on CUDA, bfloat16 on CPU); for an exported
            model on OpenVINO, BF16 inference (``INFERENCE_PRECISION_HINT``); onnxruntime refuses it.
        batch_size: images per forward pass when a list is given.
        class_names: overrides the names found in the checkpoint / config / dataset.
        slice_size: when set, sliced inference (:mod:`detkit.slicing`): each image is cut into
            overlapping ``slice_size`` tiles, predicted ``batch_size`` tiles at a time (tiles of
            the images of one call share batches), merged; Mask R-CNN keeps its ``masks``.
        slice_overlap: fraction of ``slice_size`` by which neighbouring tiles overlap.
        slice_merge: ``"nms"`` or ``"wbf"``: how tile (and full-image) boxes are merged (a fused
            box scores its best member's score, as with NMS).
        full_image: with slicing, also predict the whole image and merge it in.
        full_image_size: with ``full_image``, shrink the whole image to this long side first
            (the model's input size, SAHI's global view); None: as the test pipeline sizes it,
            i.e. a second full-resolution pass when the pipeline does not resize.
        backend: ``"pytorch"`` for a checkpoint; for an exported ``.onnx`` file (tools/export.py)
            ``"onnxruntime"`` (default) or ``"openvino"``: no PyTorch model is built, the same
            pipeline and mapping back run around the runtime (``detkit.deploy.runtime``); the
            config may then be None (the one stored at export is used).
        threads: intra-op threads of an ONNX Runtime / OpenVINO backend (None: its default).
        fold_bn, channels_last, compile: PyTorch speed options (``detkit.deploy.optimize``):
            BatchNorm folded into the convs, NHWC weights, ``torch.compile`` of backbone + neck.
    """

    def __init__(self, config: str | os.PathLike | dict | None, checkpoint: str | os.PathLike | None,
                 *, device: str | torch.device = "cpu", score_thr: float = 0.3, amp: bool = False,
                 batch_size: int = 4, class_names: Sequence[str] | None = None,
                 slice_size: int | None = None, slice_overlap: float = 0.2, slice_merge: str = "nms",
                 full_image: bool = True, full_image_size: int | None = None,
                 backend: str | None = None, threads: int | None = None,
                 fold_bn: bool = False, channels_last: bool = False, compile: bool = False):
        from .deploy.runtime import BACKENDS, default_backend, is_exported
        from .models import build_model
        from .slicing import SlicedInference

        self.slicer = None if slice_size is None else SlicedInference(
            slice_size=slice_size, overlap=slice_overlap, merge=slice_merge, full_image=full_image,
            full_image_size=full_image_size)

        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
        self.backend = backend or (default_backend(checkpoint) if is_exported(checkpoint) else "pytorch")
        if is_exported(checkpoint) == (self.backend == "pytorch"):
            raise ValueError(f"backend '{self.backend}' cannot run {checkpoint}: the PyTorch backend "
                             f"takes a checkpoint, onnxruntime / openvino an exported .onnx "
                             f"(openvino also an IR .xml) file")
        if self.backend != "pytorch":
            self._init_deployed(config, checkpoint, device=str(device), threads=threads, amp=amp,
                                score_thr=score_thr, batch_size=batch_size, class_names=class_names)
            return
        ckpt = load_checkpoint(checkpoint) if checkpoint is not None else None
        self.cfg = _resolve_config(config, ckpt, checkpoint)
        self.device = _check_device(device)
        self.score_thr = float(score_thr)
        self.amp = bool(amp)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.model = build_model(get_path(self.cfg, "model"))
        meta: dict = {}
        if ckpt is not None:
            assert checkpoint is not None  # ckpt was loaded from it
            meta = apply_checkpoint(self.model, ckpt, checkpoint)
        else:
            warnings.warn("Predictor: no checkpoint given, the model has random weights", stacklevel=2)
        self.model.eval().to(self.device)
        if fold_bn or channels_last or compile:
            from .deploy.optimize import apply_inference_options

            apply_inference_options(self.model, fold_bn=fold_bn, channels_last=channels_last,
                                    compile=compile)
        num_classes = get_path(self.cfg, "model.num_classes", None)
        self.class_names, self.label_to_cat_id, self.class_names_source = resolve_class_names(
            self.cfg, meta, num_classes, class_names)
        self.pipeline = InferencePipeline(self.cfg)

    def _init_deployed(self, config, path, *, device: str, threads: int | None, amp: bool,
                       score_thr: float, batch_size: int, class_names: Sequence[str] | None) -> None:
        """The exported-model backend: a ``DeployedModel`` in place of the detector (``amp``:
        OpenVINO in BF16; onnxruntime refuses it)."""
        from .deploy.runtime import DeployedModel

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = DeployedModel(path, backend=self.backend, device=device, threads=threads,
                                   precision="bf16" if amp else "f32")
        stored = self.model.stored_config()
        if config is None and stored is None:
            raise ConfigError(f"Predictor: no config given and {path}.json does not hold one")
        self.cfg = _resolve_config(config, None, path) if config is not None else stored
        self.device = torch.device("cpu")          # results come back as CPU tensors
        self.score_thr, self.amp, self.batch_size = float(score_thr), False, int(batch_size)
        meta = {"class_names": self.model.info.get("class_names") or None,
                "label_to_cat_id": self.model.info.get("label_to_cat_id") or None}
        self.class_names, self.label_to_cat_id, self.class_names_source = resolve_class_names(
            self.cfg, meta, get_path(self.cfg, "model.num_classes", None), class_names)
        self.pipeline = InferencePipeline(self.cfg)

    def __call__(self, inputs, batch_size: int | None = None):
        """One input -> one result dict; a list / tuple of inputs -> a list of result dicts."""
        if isinstance(inputs, (list, tuple)):
            return self.predict(list(inputs), batch_size)
        return self.predict([inputs], 1)[0]

    def predict(self, inputs: Sequence[Any], batch_size: int | None = None) -> list[dict]:
        """Predict a list of paths / arrays / PIL images, ``batch_size`` at a time."""
        batch_size = batch_size or self.batch_size
        results: list[dict] = []
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            images = [load_input(item, start + i)[0] for i, item in enumerate(chunk)]
            results.extend(self.predict_arrays(images))
        return results

    def predict_arrays(self, images: Sequence[np.ndarray], *, sliced: bool = True) -> list[dict]:
        """One forward pass on HxWx3 uint8 RGB arrays (already decoded); one dict per image.
        With ``slice_size`` set (and ``sliced``), the images are predicted tile by tile instead,
        ``batch_size`` tiles per forward pass whichever image they come from."""
        if sliced and self.slicer is not None:
            plain = functools.partial(self.predict_arrays, sliced=False)
            return self.slicer.predict_images(images, plain, self.batch_size)
        tensors, metas = [], []
        for image in images:
            tensor, meta = self.pipeline(image)
            tensors.append(tensor)
            metas.append(meta)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=amp_dtype(self.device),
                                                    enabled=self.amp):
            outputs = self.model([t.to(self.device, non_blocking=True) for t in tensors], metas)
        return [self._finish(out, meta) for out, meta in zip(outputs, metas)]

    def _finish(self, out: dict, meta: dict) -> dict:
        h0, w0 = (int(v) for v in meta["orig_size"])
        result: dict[str, Any] = {"image_size": (h0, w0)}
        if "boxes" in out:
            scores = out["scores"].float().cpu()
            keep = scores >= self.score_thr
            labels = out["labels"].long().cpu()[keep]
            result.update(boxes=out["boxes"].float().cpu()[keep], scores=scores[keep], labels=labels,
                          label_names=[self._name(int(i)) for i in labels])
            if out.get("masks") is not None:   # Mask R-CNN: Bool[K,H0,W0], already in original pixels
                result["masks"] = out["masks"].cpu()[keep]
        if out.get("sem_seg") is not None:
            from .evaluation.segmentation import sem_seg_to_original

            result["sem_seg"] = sem_seg_to_original(out["sem_seg"].cpu(), meta).long()
        return result

    def _name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else f"class_{label}"

    def __repr__(self) -> str:
        return (f"Predictor({type(self.model).__name__}, device={self.device}, "
                f"score_thr={self.score_thr}, classes={len(self.class_names)} "
                f"from {self.class_names_source})")


def _check_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but CUDA is not available; use device='cpu'")
    return device


class InferencePipeline:
    """The config's ``data.val.pipeline`` applied to a bare image: HxWx3 uint8 RGB ->
    (Float[3,H,W] in [0,1], meta with ``orig_size``, ``scale``, ``offset``)."""

    def __init__(self, cfg: dict):
        from .data.transforms import build_pipeline

        self.pipeline = build_pipeline(get_path(cfg, "data.val.pipeline", None), "data.val.pipeline")

    def __call__(self, image: np.ndarray) -> tuple[Tensor, dict]:
        from .data.base import to_sample

        h, w = image.shape[:2]
        raw = {"image": image, "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
               "iscrowd": np.zeros(0, bool), "image_id": 0, "orig_size": (h, w),
               "scale": (1.0, 1.0), "offset": (0.0, 0.0)}
        tensor, target = to_sample(self.pipeline(raw))
        return tensor, {k: target[k] for k in ("orig_size", "scale", "offset")}

    def __repr__(self) -> str:
        return f"InferencePipeline({self.pipeline!r})"
