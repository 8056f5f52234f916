"""Augmentation pipelines built from YAML lists: albumentations 2.x plus detkit's own transforms.

A pipeline config is a list of ``{type: Name, **kwargs}``. ``Name`` is a detkit transform
registered in ``TRANSFORMS`` (``ResizeShortestEdge``, ``Letterbox``, ``PadToMultiple``, ...) or
any albumentations transform (``HorizontalFlip``, ``RandomBrightnessContrast``, ``OneOf`` with a
nested ``transforms`` list ...). Images stay UInt8[H,W,3] RGB; do not add ``Normalize`` or
``ToTensorV2`` (the model normalises, ``to_sample`` converts).

Image, boxes (xyxy pixel edges), per-box fields (labels, iscrowd, difficult, instance ``masks``)
and ``sem_seg`` move together. Boxes are clipped to the image and dropped when nothing is left of them.

Scale / offset: the pipeline also pushes three probe points (0,0), (W0,0), (0,H0) through every
transform and reads the resulting axis-aligned map ``transformed = original * scale + offset``.
For resize / letterbox / pad / crop pipelines this is exact (detkit's transforms map the probes
with the same per-axis factors as the pixels); a horizontal flip shows as a negative ``sx``;
rotations and shears are not axis-aligned and only approximated.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import albumentations as A
import cv2
import numpy as np

from ..registry import TRANSFORMS, ConfigError, check_kwargs, closest

__all__ = ["Pipeline", "build_pipeline", "build_transform", "until_epoch", "ResizeShortestEdge", "Letterbox",
           "PadToMultiple"]


def _resized_shape(h: int, w: int, scale: float) -> tuple[int, int]:
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


class _Geometric(A.DualTransform):
    """Resize by per-axis factors to (nh, nw), then pad to (out_h, out_w) at (top, left).

    Subclasses only compute those numbers in ``get_params_dependent_on_data``; the pixel, mask,
    box and keypoint maps below all use the same ones, so boxes stay on their pixels.
    """

    pad_value: float = 0
    mask_pad_value: int = 255
    interpolation: int = cv2.INTER_LINEAR

    def _geometry(self, h: int, w: int) -> dict:
        raise NotImplementedError

    def get_params_dependent_on_data(self, params, data):
        return self._geometry(*params["shape"][:2])

    @staticmethod
    def _warp(img, nh, nw, top, left, out_h, out_w, value, interpolation):
        keep_channel = img.ndim == 3 and img.shape[2] == 1   # cv2 drops a trailing 1-channel axis
        if img.shape[:2] != (nh, nw):
            img = cv2.resize(img, (nw, nh), interpolation=interpolation)
        bottom, right = out_h - nh - top, out_w - nw - left
        if top or left or bottom or right:
            if img.ndim == 3:
                value = [value] * img.shape[2]
            img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=value)
        return img[..., None] if keep_channel and img.ndim == 2 else img

    def apply(self, img, nh, nw, top, left, out_h, out_w, **params):
        return self._warp(img, nh, nw, top, left, out_h, out_w, self.pad_value, self.interpolation)

    def apply_to_mask(self, mask, nh, nw, top, left, out_h, out_w, **params):
        return self._warp(mask, nh, nw, top, left, out_h, out_w, self.mask_pad_value, cv2.INTER_NEAREST)

    def apply_to_masks(self, masks, nh, nw, top, left, out_h, out_w, **params):
        # Instance masks: padding is background (0), not the semantic map's "ignore" value.
        return np.stack([self._warp(m, nh, nw, top, left, out_h, out_w, 0, cv2.INTER_NEAREST) for m in masks])

    def apply_to_bboxes(self, bboxes, nh, nw, top, left, out_h, out_w, **params):
        # albumentations hands boxes normalised by the input size: renormalise by the output size.
        out = np.array(bboxes, dtype=np.float64, copy=True)
        out[:, [0, 2]] = (out[:, [0, 2]] * nw + left) / out_w
        out[:, [1, 3]] = (out[:, [1, 3]] * nh + top) / out_h
        return out.astype(np.asarray(bboxes).dtype)

    def apply_to_keypoints(self, keypoints, nh, nw, top, left, out_h, out_w, shape_in, **params):
        out = np.array(keypoints, dtype=np.float64, copy=True)
        out[:, 0] = out[:, 0] * (nw / shape_in[1]) + left
        out[:, 1] = out[:, 1] * (nh / shape_in[0]) + top
        return out.astype(np.asarray(keypoints).dtype)


@TRANSFORMS.register()
class ResizeShortestEdge(_Geometric):
    """Resize so the short side is ``short_edge`` (one picked at random from a list) and the long
    side at most ``max_size``; aspect ratio kept (detectron2's multi-scale training resize)."""

    def __init__(self, short_edge: int | list[int] = 800, max_size: int | None = 1333,
                 interpolation: int = cv2.INTER_LINEAR, p: float = 1.0):
        super().__init__(p=p)
        edges = [short_edge] if isinstance(short_edge, int) else list(short_edge)
        if not edges or any(not isinstance(e, int) or e <= 0 for e in edges):
            raise ValueError("ResizeShortestEdge: short_edge must be a positive int or a list of them, "
                             f"got {short_edge!r}")
        self.short_edge = short_edge
        self.max_size = max_size
        self.interpolation = interpolation

    def _geometry(self, h, w):
        edges = [self.short_edge] if isinstance(self.short_edge, int) else list(self.short_edge)
        short = self.py_random.choice(edges) if len(edges) > 1 else edges[0]
        scale = short / min(h, w)
        if self.max_size and max(h, w) * scale > self.max_size:
            scale = self.max_size / max(h, w)
        nh, nw = _resized_shape(h, w, scale)
        return {"nh": nh, "nw": nw, "top": 0, "left": 0, "out_h": nh, "out_w": nw, "shape_in": (h, w)}


@TRANSFORMS.register()
class Letterbox(_Geometric):
    """Fit the image into ``size`` (int or [h, w]) keeping its aspect ratio, and pad the rest with
    ``pad_value`` (masks with ``mask_pad_value`` = ignore), centred as in YOLO inference.
    ``scale_up: false`` never enlarges small images."""

    def __init__(self, size: int | list[int] = 640, pad_value: int = 114, mask_pad_value: int = 255,
                 center: bool = True, scale_up: bool = True, interpolation: int = cv2.INTER_LINEAR,
                 p: float = 1.0):
        super().__init__(p=p)
        self.size = size
        self.pad_value = pad_value
        self.mask_pad_value = mask_pad_value
        self.center = center
        self.scale_up = scale_up
        self.interpolation = interpolation

    def _geometry(self, h, w):
        out_h, out_w = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        scale = min(out_h / h, out_w / w)
        if not self.scale_up:
            scale = min(scale, 1.0)
        nh, nw = min(_resized_shape(h, w, scale)[0], out_h), min(_resized_shape(h, w, scale)[1], out_w)
        top, left = ((out_h - nh) // 2, (out_w - nw) // 2) if self.center else (0, 0)
        return {"nh": nh, "nw": nw, "top": top, "left": left, "out_h": out_h, "out_w": out_w,
                "shape_in": (h, w)}


@TRANSFORMS.register()
class PadToMultiple(_Geometric):
    """Pad bottom / right so both sides are multiples of ``divisor`` (no resize, offset stays 0)."""

    def __init__(self, divisor: int = 32, pad_value: int = 0, mask_pad_value: int = 255, p: float = 1.0):
        super().__init__(p=p)
        self.divisor = divisor
        self.pad_value = pad_value
        self.mask_pad_value = mask_pad_value

    def _geometry(self, h, w):
        d = self.divisor
        return {"nh": h, "nw": w, "top": 0, "left": 0, "out_h": -(-h // d) * d, "out_w": -(-w // d) * d,
                "shape_in": (h, w)}


_BOX_INDEX = "box_index"   # the one albumentations label field: carries every per-box array along


class Pipeline:
    """Callable ``raw dict -> raw dict`` (keys in ``detkit.data.base``) around one ``A.Compose``.

    ``set_seed(seed)`` makes the random choices reproducible (the data loader calls it per
    sample). ``transforms`` is the list of albumentations / detkit transform objects.
    ``until_epochs`` (one per transform, None = always) switches a transform off from that
    training epoch on: D-FINE / DEIM's ``stop_epoch``, Ultralytics' ``close_mosaic``. The loader
    calls ``set_augment_epoch(epoch)`` per sample; without it every transform runs.
    """

    def __init__(self, transforms: list, *, seed: int = 0, until_epochs: list[int | None] | None = None):
        self.transforms = list(transforms)
        self.until_epochs = list(until_epochs) if until_epochs is not None else [None] * len(self.transforms)
        if len(self.until_epochs) != len(self.transforms):
            raise ValueError("Pipeline: until_epochs needs one entry per transform")
        self._composes: dict[tuple[bool, ...], Any] = {}
        self.compose = self._compose_for(tuple(True for _ in self.transforms), seed)

    def _compose_for(self, active: tuple[bool, ...], seed: int = 0):
        """The (cached) ``A.Compose`` of the transforms flagged in ``active``; None when none is."""
        if active not in self._composes:
            chosen = [t for t, on in zip(self.transforms, active) if on]
            compose = None
            if chosen:
                with warnings.catch_warnings():   # pixel-only pipelines need no box processor: fine
                    warnings.filterwarnings("ignore", message="Got processor for")
                    compose = self._compose(chosen, seed)
            self._composes[active] = compose
        return self._composes[active]

    def set_augment_epoch(self, epoch: int) -> None:
        """Run only the transforms whose ``until_epoch`` is unset or later than ``epoch``."""
        active = tuple(u is None or int(epoch) < u for u in self.until_epochs)
        self.compose = self._compose_for(active)

    @staticmethod
    def _compose(transforms: list, seed: int):
        return A.Compose(
            transforms, seed=seed,
            bbox_params=A.BboxParams(format="pascal_voc", label_fields=[_BOX_INDEX], clip=True,
                                     filter_invalid_bboxes=True),
            keypoint_params=A.KeypointParams(format="xy", remove_invisible=False))

    def set_seed(self, seed: int) -> None:
        if self.compose is not None:
            self.compose.set_random_seed(int(seed))

    def __repr__(self) -> str:
        return f"Pipeline({[type(t).__name__ for t in self.transforms]})"

    def __call__(self, raw: dict) -> dict:
        if self.compose is None:
            return raw
        image = raw["image"]
        h0, w0 = image.shape[:2]
        boxes = np.asarray(raw["boxes"], np.float32).reshape(-1, 4)
        data = {"image": image, "bboxes": boxes, _BOX_INDEX: np.arange(len(boxes)),
                "keypoints": np.array([[0, 0], [w0, 0], [0, h0]], np.float32)}
        if raw.get("sem_seg") is not None:
            data["mask"] = raw["sem_seg"]
        masks = raw.get("masks")
        if masks is not None and len(masks):   # albumentations cannot stack an empty list
            data["masks"] = np.asarray(masks)
        out = self.compose(**data)
        new_boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)[:, :4]
        index = np.asarray(out[_BOX_INDEX], np.float64).astype(np.int64).reshape(-1)
        keep = (new_boxes[:, 2] > new_boxes[:, 0]) & (new_boxes[:, 3] > new_boxes[:, 1])
        index, new_boxes = index[keep], new_boxes[keep]
        result = dict(raw, image=out["image"], boxes=new_boxes)
        for key in ("labels", "iscrowd", "difficult"):
            if raw.get(key) is not None:
                result[key] = np.asarray(raw[key])[index]
        if "mask" in out:
            result["sem_seg"] = out["mask"]
        if masks is not None:
            result["masks"] = (np.asarray(out["masks"])[index] if len(masks)
                               else np.zeros((0, *out["image"].shape[:2]), np.uint8))
        probe = np.asarray(out["keypoints"], np.float64)[:, :2]
        sx, sy = (probe[1, 0] - probe[0, 0]) / w0, (probe[2, 1] - probe[0, 1]) / h0
        (s0x, s0y), (o0x, o0y) = raw.get("scale", (1.0, 1.0)), raw.get("offset", (0.0, 0.0))
        result["scale"] = (sx * s0x, sy * s0y)
        result["offset"] = (sx * o0x + probe[0, 0], sy * o0y + probe[0, 1])
        return result


def _albumentations_names() -> list[str]:
    return sorted(n for n, obj in vars(A).items() if inspect.isclass(obj)
                  and issubclass(obj, (A.BasicTransform, A.BaseCompose)))


def build_transform(cfg: dict, path: str):
    """One ``{type: Name, **kwargs}`` -> a transform object (detkit's registry first, then albumentations)."""
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ConfigError(f"{path}: expected a mapping with a 'type' key, got {cfg!r}")
    name, kwargs = cfg["type"], {k: v for k, v in cfg.items() if k not in ("type", "until_epoch")}
    if name in TRANSFORMS:
        cls = TRANSFORMS.get(name, f"{path}.type")
    else:
        album_cls = getattr(A, str(name), None)
        if not (inspect.isclass(album_cls) and issubclass(album_cls, (A.BasicTransform, A.BaseCompose))):
            raise ConfigError(f"{path}.type: unknown transform '{name}'"
                              f"{closest(name, TRANSFORMS.names() + _albumentations_names())}; use a detkit "
                              f"transform ({', '.join(TRANSFORMS.names())}) or any albumentations transform")
        cls = album_cls
    if isinstance(kwargs.get("transforms"), list):   # OneOf / SomeOf / Sequential
        for i, c in enumerate(kwargs["transforms"]):
            if isinstance(c, dict) and "until_epoch" in c:
                raise ConfigError(f"{path}.transforms.{i}.until_epoch: only a pipeline's own entries "
                                  f"take until_epoch; put it on {path}")
        kwargs["transforms"] = [build_transform(c, f"{path}.transforms.{i}")
                                for i, c in enumerate(kwargs["transforms"])]
    check_kwargs(cls, kwargs, path, str(name))
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:   # pydantic's ValidationError is a ValueError
        raise ConfigError(f"{path} ({name}): {e}") from None
    if not isinstance(obj, (A.BasicTransform, A.BaseCompose)):
        raise ConfigError(f"{path} ({name}): not an albumentations-compatible transform")
    return obj


def build_pipeline(cfg: list | None, path: str = "pipeline", *, seed: int = 0) -> Pipeline:
    """A ``Pipeline`` from a YAML list of transform configs (``None`` or ``[]``: identity)."""
    if cfg is None:
        cfg = []
    if not isinstance(cfg, (list, tuple)):
        raise ConfigError(f"{path}: expected a list of transforms, got {type(cfg).__name__}")
    transforms = [build_transform(c, f"{path}.{i}") for i, c in enumerate(cfg)]
    stops = [until_epoch(c, f"{path}.{i}") for i, c in enumerate(cfg)]
    return Pipeline(transforms, seed=seed, until_epochs=stops)


def until_epoch(cfg: dict, path: str) -> int | None:
    """A pipeline entry's (or Mosaic's) ``until_epoch``: the first training epoch without it."""
    value = cfg.get("until_epoch")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{path}.until_epoch: expected an epoch number >= 0, got {value!r}")
    return value
