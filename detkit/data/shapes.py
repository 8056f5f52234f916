"""The built-in synthetic dataset: coloured shapes on textured backgrounds.

``python -m detkit.data.shapes --out DIR --train N --val M --size S --seed K`` writes::

    DIR/train/000000.png ...              RGB images, S x S
    DIR/val/000000.png ...
    DIR/annotations/instances_train.json  COCO detection json (bbox xywh, polygons, area, iscrowd=0)
    DIR/annotations/instances_val.json
    DIR/masks/train/000000.png ...        semantic masks: 0 = background, 1..4 = class + 1, 255 = ignore

Classes (COCO category ids 1..4): circle, square, triangle, star. Each image holds 1-8 shapes
of random colour and size (about 12 px up to 60% of the image side), drawn in order; a shape is
only placed if it hides at most ``MAX_HIDDEN`` of any shape below it, so every instance stays
recognisable. Boxes, areas and polygons are computed from the *visible* pixels of each instance
(after occlusion), so a box is tight around what can be seen. ``python -m detkit.data.shapes
--stats DIR`` prints image / instance counts and a small / medium / large histogram (COCO areas).

Same seed -> byte-identical files: every image has its own generator seeded by (seed, split,
index), PNGs are written by OpenCV (deterministic) and json with sorted keys.

``--preset small`` writes a small-object benchmark in the same layout: 1024 x 1024 canvases
(``--size``), each with ``SMALL_OBJECTS`` tiny shapes whose boxes' long sides are 8-32 px and
areas below 32^2 (all COCO "small") plus ``SMALL_DISTRACTORS`` unannotated look-alikes (rings,
bars, crosses, line segments) that are background. Shapes never touch (each keeps a 2 px gap),
so every box is the exact extent of one shape's drawn pixels. Defaults: 100 train and 20 val
canvases.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import cv2
import numpy as np

__all__ = ["CLASS_NAMES", "PRESETS", "generate", "render_image", "render_small_image", "stats",
           "format_stats"]

CLASS_NAMES = ["circle", "square", "triangle", "star"]
MAX_HIDDEN = 0.3          # a new shape may hide at most this fraction of an older shape
MIN_VISIBLE_PIXELS = 20   # instances with less visible area are dropped (masked as ignore)
_SPLITS = {"train": 0, "val": 1}
_FILE_RE = re.compile(r"^\d{6}\.png$")
# --preset small: objects per canvas, distractors per canvas, box side range (px)
SMALL_OBJECTS, SMALL_DISTRACTORS, SMALL_BOX_SIDE = (40, 90), (20, 40), (8, 32)
PRESETS = {"default": {"size": 128, "train": 1000, "val": 200},
           "small": {"size": 1024, "train": 100, "val": 20}}


def _shape_mask(cls: int, cx: float, cy: float, radius: float, angle: float, size: int) -> np.ndarray:
    """Bool[S,S] mask of one filled shape; ``radius`` is the circumscribed radius in pixels."""
    mask = np.zeros((size, size), np.uint8)
    if cls == 0:
        cv2.circle(mask, (round(cx * 4), round(cy * 4)), round(radius * 4), 1, -1,
                   lineType=cv2.LINE_8, shift=2)
        return mask.astype(bool)
    if cls == 1:
        angles = angle + np.arange(4) * (math.pi / 2)
        radii = np.full(4, radius)
    elif cls == 2:
        angles = angle + np.arange(3) * (2 * math.pi / 3)
        radii = np.full(3, radius)
    else:
        angles = angle + np.arange(10) * (math.pi / 5)
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    cv2.fillPoly(mask, [np.round(pts * 4).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=2)
    return mask.astype(bool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float[S,S,3] in 0..255: a muted colour gradient, low-frequency blotches and fine noise."""
    base = rng.uniform(40, 215, size=3)
    tilt = rng.uniform(-40, 40, size=3)
    ramp = np.linspace(-0.5, 0.5, size)
    direction = rng.uniform(0, 2 * math.pi)
    grad = (np.cos(direction) * ramp[None, :] + np.sin(direction) * ramp[:, None])[..., None] * tilt
    blotch = cv2.resize(rng.normal(0, 18, size=(6, 6, 3)).astype(np.float32), (size, size),
                        interpolation=cv2.INTER_CUBIC)
    return base + grad + blotch + rng.normal(0, 6, size=(size, size, 3))


def _vivid_colour(rng: np.random.Generator, avoid: list[np.ndarray], min_dist: float) -> np.ndarray:
    """An RGB colour at least ``min_dist`` (max channel difference) away from every colour in ``avoid``."""
    colour = rng.uniform(0, 255, size=3)
    for _ in range(50):
        colour = rng.uniform(0, 255, size=3)
        if all(np.abs(colour - a).max() >= min_dist for a in avoid):
            break
    return colour


def _place_shapes(rng: np.random.Generator, size: int, bg_mean: np.ndarray) -> list[dict]:
    """Draw 1-8 non-hiding shapes; returns dicts with ``cls``, ``colour``, ``full`` and ``visible`` masks."""
    wanted = int(rng.integers(1, 9))
    min_r, max_r = max(6.0, 0.045 * size), 0.3 * size      # diameters ~12 px .. 60% of the side
    placed: list[dict] = []
    for _ in range(wanted * 6):
        if len(placed) == wanted:
            break
        radius = math.exp(rng.uniform(math.log(min_r), math.log(max_r)))
        cls = int(rng.integers(0, len(CLASS_NAMES)))
        margin = radius + 1   # keep the whole shape inside the image
        if 2 * margin >= size:
            continue
        cx, cy = rng.uniform(margin, size - margin, size=2)
        full = _shape_mask(cls, cx, cy, radius, rng.uniform(0, 2 * math.pi), size)
        if full.sum() < MIN_VISIBLE_PIXELS:
            continue
        if any((p["visible"] & ~full).sum() < (1 - MAX_HIDDEN) * p["full"].sum() for p in placed):
            continue
        under = [p["colour"] for p in placed if (p["visible"] & full).any()]
        colour = _vivid_colour(rng, [bg_mean, *under], min_dist=70)
        for p in placed:
            p["visible"] = p["visible"] & ~full
        placed.append({"cls": cls, "colour": colour, "full": full, "visible": full.copy()})
    return placed


def _polygons(visible: np.ndarray) -> list[list[float]]:
    """COCO polygons (x1, y1, x2, y2, ...) of the outer contours of a Bool[H,W] mask."""
    contours, _ = cv2.findContours(visible.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
    if not polys:   # a sliver: fall back to its box
        ys, xs = np.nonzero(visible)
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())
        polys = [[x0, y0, x1, y0, x1, y1, x0, y1]]
    return polys


def render_image(seed: int, split: str, index: int, size: int = 128
                 ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Render one sample: UInt8[S,S,3] RGB image, UInt8[S,S] semantic mask, instance list.

    Each instance dict has ``category_id`` (1..4), ``bbox`` [x, y, w, h] (tight around the
    visible pixels, pixel-edge convention: a single pixel at column x spans x..x+1),
    ``area`` (visible pixel count) and ``segmentation`` (polygons).
    """
    rng = np.random.default_rng([seed, _SPLITS.get(split, 2), index])
    canvas = _background(rng, size)
    shapes = _place_shapes(rng, size, canvas.reshape(-1, 3).mean(0))
    sem = np.zeros((size, size), np.uint8)
    for shp in shapes:
        shade = cv2.resize(rng.normal(0, 10, size=(3, 3, 1)).astype(np.float32), (size, size),
                           interpolation=cv2.INTER_LINEAR)[..., None]
        canvas[shp["full"]] = (shp["colour"] + shade)[shp["full"]]
    canvas += rng.normal(0, 5, size=canvas.shape)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    instances = []
    for shp in shapes:
        vis = shp["visible"]
        if vis.sum() < MIN_VISIBLE_PIXELS:
            sem[vis] = 255
            continue
        sem[vis] = shp["cls"] + 1
        ys, xs = np.nonzero(vis)
        x0, y0 = int(xs.min()), int(ys.min())
        instances.append({"category_id": shp["cls"] + 1,
                          "bbox": [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)],
                          "area": float(vis.sum()), "segmentation": _polygons(vis)})
    return image, sem, instances


def _small_shape(rng: np.random.Generator, size: int, cls: int) -> tuple[int, int, np.ndarray]:
    """A random 8-32 px shape (``cls`` < 4) or distractor (4..7) drawn in its own patch with a 2 px
    margin: (top, left, Bool[P,P] mask), P = patch side."""
    radius = math.exp(rng.uniform(math.log(4.0), math.log(17.0)))
    side = 2 * math.ceil(radius) + 5
    top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    c = side / 2
    angle = rng.uniform(0, 2 * math.pi)
    if cls < len(CLASS_NAMES):
        return top, left, _shape_mask(cls, c, c, radius, angle, side)
    mask = np.zeros((side, side), np.uint8)
    ends = np.round(4 * np.array([[c + radius * math.cos(angle), c + radius * math.sin(angle)],
                                  [c - radius * math.cos(angle), c - radius * math.sin(angle)]]))
    p, q = tuple(int(v) for v in ends[0]), tuple(int(v) for v in ends[1])
    if cls == 4:     # ring: a hollow circle, not a filled one
        cv2.circle(mask, (round(c * 4), round(c * 4)), round(radius * 4), 1, 1 + int(radius > 9), shift=2)
    elif cls == 5:   # bar: a rectangle at least 3x longer than wide, unlike a square
        cv2.line(mask, p, q, 1, max(2, round(radius / 3)), shift=2)
    elif cls == 6:   # cross: two crossing strokes
        cv2.line(mask, p, q, 1, 2, shift=2)
        r = np.round(4 * (c + radius * np.array([-math.sin(angle), math.cos(angle)]))).astype(int)
        mirrored = (round(8 * c) - int(r[0]), round(8 * c) - int(r[1]))   # through the centre
        cv2.line(mask, (int(r[0]), int(r[1])), mirrored, 1, 2, shift=2)
    else:            # a thin line segment
        cv2.line(mask, p, q, 1, 1, shift=2)
    return top, left, mask.astype(bool)


def render_small_image(seed: int, split: str, index: int, size: int = 1024
                       ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """``--preset small``: one canvas with many tiny shapes and distractors; returns as
    :func:`render_image`. Shapes and distractors are placed in non-overlapping patches, so boxes
    (pixel-edge convention, exact extents of the drawn pixels) never include another object."""
    rng = np.random.default_rng([seed, _SPLITS.get(split, 2), index, 1])   # 1: not the default stream
    canvas = _background(rng, size)
    sem = np.zeros((size, size), np.uint8)
    taken = np.zeros((size, size), bool)
    wanted = [int(rng.integers(lo, hi + 1)) for lo, hi in (SMALL_OBJECTS, SMALL_DISTRACTORS)]
    instances = []
    for kind, count in enumerate(wanted):
        placed = 0
        for _ in range(count * 20):
            if placed == count:
                break
            cls = int(rng.integers(0, 4)) + 4 * kind
            top, left, mask = _small_shape(rng, size, cls)
            window = (slice(top, top + mask.shape[0]), slice(left, left + mask.shape[1]))
            ys, xs = np.nonzero(mask)
            w, h = int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
            small = SMALL_BOX_SIDE[0] <= max(w, h) <= SMALL_BOX_SIDE[1] and w * h < 32 ** 2   # COCO small
            if taken[window].any() or mask.sum() < MIN_VISIBLE_PIXELS or not (kind or small):
                continue
            taken[window] = True
            placed += 1
            colour = _vivid_colour(rng, [canvas[window].reshape(-1, 3).mean(0)], min_dist=70)
            canvas[window][mask] = colour + rng.normal(0, 4, size=(int(mask.sum()), 3))
            if kind:
                continue
            sem[window][mask] = cls + 1
            x0, y0 = left + int(xs.min()), top + int(ys.min())
            polygons = [[v + (left if k % 2 == 0 else top) for k, v in enumerate(poly)]
                        for poly in _polygons(mask)]
            instances.append({"category_id": cls + 1, "bbox": [float(x0), float(y0), float(w), float(h)],
                              "area": float(mask.sum()), "segmentation": polygons})
    canvas += rng.normal(0, 5, size=canvas.shape)
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8), sem, instances


def _clear_old(folder: Path) -> None:
    # Regenerating with fewer images must not leave stale files behind; only our own names go.
    for f in folder.glob("*.png"):
        if _FILE_RE.match(f.name):
            f.unlink()


def _write_split(out: Path, split: str, num: int, size: int, seed: int, preset: str = "default") -> dict:
    img_dir, mask_dir = out / split, out / "masks" / split
    for d in (img_dir, mask_dir):
        d.mkdir(parents=True, exist_ok=True)
        _clear_old(d)
    images: list[dict] = []
    annotations: list[dict] = []
    for i in range(num):
        render = render_small_image if preset == "small" else render_image
        image, sem, instances = render(seed, split, i, size)
        name = f"{i:06d}.png"
        cv2.imwrite(str(img_dir / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(mask_dir / name), sem)
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
        for inst in instances:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "iscrowd": 0, **inst})
    name = "detkit shapes" if preset == "default" else f"detkit shapes, preset {preset}"
    return {"info": {"description": f"{name} ({split}, seed {seed}, size {size})"},
            "images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": n, "supercategory": "shape"}
                           for k, n in enumerate(CLASS_NAMES)]}


def generate(out_dir, num_train: int, num_val: int, size: int = 128, seed: int = 0,
             preset: str = "default") -> Path:
    """Write the dataset under ``out_dir`` (layout in the module docstring); returns the folder."""
    if preset not in PRESETS:
        raise ValueError(f"shapes: unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    if size < (32 if preset == "default" else 128):
        raise ValueError(f"shapes: image size must be >= {32 if preset == 'default' else 128} "
                         f"for preset {preset}, got {size}")
    out = Path(out_dir)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, num in (("train", num_train), ("val", num_val)):
        coco = _write_split(out, split, int(num), int(size), int(seed), preset)
        with open(out / "annotations" / f"instances_{split}.json", "w", encoding="utf-8") as f:
            json.dump(coco, f, sort_keys=True, separators=(",", ":"))
    return out


def stats(out_dir) -> dict:
    """Per split: ``images``, ``instances``, ``per_class`` {name: count}, ``sizes`` {small, medium, large}.

    Size buckets follow COCO: box area < 32^2 small, < 96^2 medium, else large.
    """
    result = {}
    for split in _SPLITS:
        ann_file = Path(out_dir) / "annotations" / f"instances_{split}.json"
        if not ann_file.is_file():
            continue
        with open(ann_file, encoding="utf-8") as f:
            coco = json.load(f)
        names = {c["id"]: c["name"] for c in coco["categories"]}
        per_class = {n: 0 for n in names.values()}
        sizes = {"small": 0, "medium": 0, "large": 0}
        for a in coco["annotations"]:
            per_class[names[a["category_id"]]] += 1
            box_area = a["bbox"][2] * a["bbox"][3]
            sizes["small" if box_area < 32 ** 2 else "medium" if box_area < 96 ** 2 else "large"] += 1
        result[split] = {"images": len(coco["images"]), "instances": len(coco["annotations"]),
                         "per_class": per_class, "sizes": sizes}
    if not result:
        raise FileNotFoundError(f"shapes stats: no annotations/instances_{{train,val}}.json under {out_dir}")
    return result


def format_stats(result: dict) -> str:
    """A small text table of ``stats()``."""
    lines = []
    for split, s in result.items():
        lines.append(f"{split}: {s['images']} images, {s['instances']} instances "
                     f"({s['instances'] / max(s['images'], 1):.2f} per image)")
        lines.append("  per class: " + ", ".join(f"{k} {v}" for k, v in s["per_class"].items()))
        lines.append("  box size:  " + ", ".join(f"{k} {v}" for k, v in s["sizes"].items())
                     + "   (COCO areas: small < 32^2 <= medium < 96^2 <= large)")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m detkit.data.shapes", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="default: 128 px images, shapes of 12 px..60%% of the side; small: 1024 px "
                             "canvases with many 8-32 px shapes and distractors")
    parser.add_argument("--train", type=int, help="number of training images (default 1000; small: 100)")
    parser.add_argument("--val", type=int, help="number of validation images (default 200; small: 20)")
    parser.add_argument("--size", type=int, help="image side in pixels (default 128; small: 1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats", metavar="DIR", help="print statistics of an existing dataset and exit")
    args = parser.parse_args(argv)
    if args.stats:
        print(format_stats(stats(args.stats)))
        return
    if not args.out:
        parser.error("--out DIR is required (or --stats DIR)")
    defaults = PRESETS[args.preset]
    num_train, num_val, size = (defaults[k] if v is None else v for k, v in
                                (("train", args.train), ("val", args.val), ("size", args.size)))
    try:
        out = generate(args.out, num_train, num_val, size, args.seed, preset=args.preset)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {out}")
    print(format_stats(stats(out)))


if __name__ == "__main__":
    main()
