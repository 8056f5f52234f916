#!/usr/bin/env python
"""Run a trained detkit model on images, folders, globs or videos.

    python tools/infer.py [CONFIG] CHECKPOINT INPUT [INPUT ...] --out DIR
        [--score-thr 0.3] [--batch-size 4] [--device cpu|cuda] [--amp] [--coco-gt ANN.json]
        [--no-draw] [--slice S [--slice-overlap F] [--slice-merge nms|wbf] [--no-full-image]
         [--full-image-size N]]
        [--backend pytorch|onnxruntime|openvino] [--threads N] [--nms-iou 0.5|off] [--set key=value ...]
    python tools/infer.py CHECKPOINT --source 0 --out DIR      (webcam 0 until Ctrl-C; or INPUT 0)

CONFIG is optional: a checkpoint of ``tools/train.py`` (and an export) holds its resolved config.
CHECKPOINT may also be a model exported by ``tools/export.py`` (``model.onnx``): it then runs with
ONNX Runtime alone (``--backend openvino`` for OpenVINO), no PyTorch model is built, and the
pre-processing, mapping back and outputs are the same as with the checkpoint; ``--device cuda``
uses ONNX Runtime's CUDA provider when installed (else the CPU, with a warning).

INPUT is an image file, a folder (searched recursively for image extensions), a glob such as
``"photos/**/*.jpg"`` (quote it), a video file (an annotated copy is written) or a camera index
(``0``, also as ``--source 0``; read with OpenCV until it stops or Ctrl-C, written as
``camera0.mp4``; no camera that opens is exit code 2). Writes to
``--out``: one annotated image per input (same relative path as under its folder), for
segmentors the class map as ``masks/<name>.png`` (in the dataset's own mask values, e.g. 0 / 7 /
26 for ``classes: {0: background, 7: road, 26: car}``; overlays carry a legend), and
``predictions.json``: a COCO results list
``[{image_id, file_name, path, category_id, category_name, bbox: [x, y, w, h], score}, ...]``
(Mask R-CNN adds ``segmentation``, the instance mask as a COCO compressed RLE; drawn masks too)
in original-image pixels (``file_name`` relative to its input folder, ``path`` as found; video
detections also carry ``frame``). With ``--coco-gt`` the image ids
and category ids are those of that annotation file (matched by file name), so the json can be
scored by ``tools/eval.py --coco-gt ANN.json --coco-dt predictions.json``.

CenterNet predicts without NMS (as its paper); on photos that draws duplicate boxes, so the
drawings of a CenterNet whose ``model.head.nms_iou_thresh`` is null get a class-wise NMS at
``--nms-iou`` (default 0.5; on shapes it changes AP by < 0.001, README "CenterNet"), with the
checkpoint or an export alike; ``--nms-iou off`` draws every box. ``predictions.json`` keeps the
model's own output, so that it scores as ``tools/eval.py`` does.

``--slice S`` predicts each image as overlapping S x S tiles (``--slice-overlap``, default 0.2)
plus, unless ``--no-full-image``, one pass over the whole image, merged by ``--slice-merge``
(``detkit/slicing.py``; README "Small objects"): for small objects in images much larger than
the training images.

Unreadable, truncated or non-image files are reported by name and skipped; the exit code is 1
when any input failed, 2 for a bad config / checkpoint / argument.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.cli import add_debug_flag, run_cli  # noqa: E402
from detkit.config import get_path, load_config  # noqa: E402
from detkit.errors import DetkitError  # noqa: E402
from detkit.inference import Predictor  # noqa: E402
from detkit.seg_output import SegOutputWriter  # noqa: E402
from detkit.visualize import draw_result  # noqa: E402

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
WRITABLE_EXTS = {".jpg", ".jpeg", ".png", ".bmp"}
BACKGROUND_NAMES = {"background", "bg", "__background__", "_background_"}


@dataclass
class Item:
    path: Path
    name: str          # output-relative name (relative path under its folder, or the file name)
    video: bool = False
    camera: int | None = None   # an OpenCV camera index (a webcam) instead of a file


def expand_inputs(inputs: list[str]) -> tuple[list[Item], list[tuple[str, str]]]:
    """Files to process (in order, de-duplicated) and (input, reason) for inputs that match nothing."""
    items, missing, seen = [], [], set()

    def add(path: Path, name: str) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            items.append(Item(path, name, path.suffix.lower() in VIDEO_EXTS))

    for text in inputs:
        path = Path(text)
        if text.isdigit() and not path.exists():   # "0": a camera, as OpenCV numbers them
            items.append(Item(path, f"camera{int(text)}.mp4", video=True, camera=int(text)))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
            if not files:
                missing.append((text, "folder has no image files"))
            for p in files:
                add(p, p.relative_to(path).as_posix())
        elif path.is_file():
            add(path, path.name)
        elif glob.has_magic(text):
            files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not files:
                missing.append((text, "glob matches no file"))
            for p in files:
                add(p, p.name)
        else:
            missing.append((text, "no such file or folder"))
    return items, missing


def unique_output_names(items: list[Item]) -> list[str]:
    """Output file names: the input's relative name (made unique), non-writable suffixes -> .png."""
    used, out = set(), []
    for item in items:
        p = Path(item.name)
        suffix = ".mp4" if item.video else (p.suffix.lower() if p.suffix.lower() in WRITABLE_EXTS else ".png")
        stem, candidate, k = p.with_suffix(""), None, 0
        while candidate is None or candidate in used:
            candidate = f"{stem}{'' if k == 0 else f'_{k}'}{suffix}"
            k += 1
        used.add(candidate)
        out.append(candidate)
    return out


class ResultWriter:
    """Collects COCO-style records and writes annotated images / masks under ``out_dir``."""

    def __init__(self, out_dir: Path, predictor: Predictor, gt_file: str | None, draw: bool,
                 nms_iou: float | None = None):
        self.out_dir, self.predictor, self.draw, self.nms_iou = out_dir, predictor, draw, nms_iou
        self.records: list[dict] = []
        self.num_detections = 0
        self.file_to_id, self.cat_ids = self._ids_from_gt(gt_file)
        self.next_id = max(self.file_to_id.values(), default=0) + 1
        names = predictor.class_names
        # A segmentation "background" class stays unpainted so that the objects stand out.
        self.seg_skip = (0,) if names and names[0].lower() in BACKGROUND_NAMES else ()
        self.seg = SegOutputWriter(class_names=names, label_to_cat_id=predictor.label_to_cat_id,
                                   num_labels=get_path(predictor.cfg, "model.num_classes", None),
                                   skip_labels=self.seg_skip)

    def _ids_from_gt(self, gt_file: str | None) -> tuple[dict[str, int], list[int] | None]:
        cat_ids = self.predictor.label_to_cat_id
        if gt_file is None:
            return {}, cat_ids
        with open(gt_file, encoding="utf-8") as f:
            gt = json.load(f)
        file_to_id = {}
        for img in gt.get("images", []):
            file_to_id.setdefault(img["file_name"], img["id"])
            file_to_id.setdefault(Path(img["file_name"]).name, img["id"])
        # Without a stored mapping, the COCO convention: labels follow sorted category ids.
        return file_to_id, cat_ids or sorted(c["id"] for c in gt.get("categories", []))

    def image_id(self, item: Item) -> int:
        for key in (item.name, item.path.name):
            if key in self.file_to_id:
                return self.file_to_id[key]
        if self.file_to_id:
            tqdm.write(f"warning: {item.path} is not in the --coco-gt images; id {self.next_id}")
        self.next_id += 1
        return self.next_id - 1

    def add(self, image_id: int, item: Item, result: dict, frame: int | None = None) -> None:
        if "boxes" not in result:
            return
        names = self.predictor.class_names
        xyxy = result["boxes"].float().reshape(-1, 4)
        # xywh computed in float32 exactly as COCOEvaluator does, so both score identically.
        xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1)
        rles = _rles(result["masks"]) if result.get("masks") is not None else None
        for i, (box, score, label) in enumerate(zip(xywh.tolist(), result["scores"].float().tolist(),
                                                    result["labels"].tolist())):
            rec = {"image_id": image_id, "file_name": item.name, "path": str(item.path),
                   "category_id": self.cat_ids[label] if self.cat_ids else label,
                   "category_name": names[label] if label < len(names) else str(label),
                   "bbox": box, "score": score}
            if rles is not None:
                rec["segmentation"] = rles[i]
            if frame is not None:
                rec["frame"] = frame
            self.records.append(rec)
        self.num_detections += len(xyxy)

    def annotate(self, image: np.ndarray, result: dict) -> np.ndarray:
        if self.nms_iou is not None and "boxes" in result:
            result = classwise_nms(result, self.nms_iou)
        drawn = draw_result(image, result, self.predictor.class_names, seg_skip_labels=self.seg_skip)
        return self.seg.legend(drawn, result["sem_seg"]) if result.get("sem_seg") is not None else drawn

    def write_image(self, out_name: str, image: np.ndarray, result: dict) -> None:
        if not self.draw:
            return
        target = self.out_dir / out_name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(target), cv2.cvtColor(self.annotate(image, result), cv2.COLOR_RGB2BGR)):
            raise OSError(f"cannot write {target}")
        if result.get("sem_seg") is not None:   # in the dataset's own mask values
            self.seg.write_png(self.out_dir / "masks" / Path(out_name).with_suffix(".png"), result["sem_seg"])

    def save_json(self) -> Path:
        path = self.out_dir / "predictions.json"
        path.write_text(json.dumps(self.records), encoding="utf-8")
        return path


def _rles(masks: torch.Tensor) -> list[dict]:
    """Bool[K,H,W] instance masks -> COCO compressed RLEs (``counts`` as str, for json)."""
    from pycocotools import mask as mask_utils

    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.numpy().astype(np.uint8).transpose(1, 2, 0)))
    return [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in rles]


def run_images(items, names, predictor: Predictor, writer: ResultWriter, batch_size: int,
               failed: list) -> int:
    """Predict images in batches; returns the number processed. Unreadable files go to ``failed``."""
    from detkit.data.io import read_image

    done, batch = 0, []

    def flush() -> None:
        results = predictor.predict_arrays([image for _, _, image in batch])
        for (item, out_name, image), result in zip(batch, results):
            writer.add(writer.image_id(item), item, result)
            writer.write_image(out_name, image, result)
        batch.clear()

    for item, out_name in tqdm(list(zip(items, names)), desc="infer", unit="img", disable=None):
        try:
            image = read_image(item.path)
        except (ValueError, OSError) as e:   # ImageReadError is a ValueError
            failed.append((str(item.path), str(e)))
            tqdm.write(f"skipped {item.path}: {e}")
            continue
        batch.append((item, out_name, image))
        done += 1
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return done


def run_video(item: Item, out_name: str, predictor: Predictor, writer: ResultWriter,
              batch_size: int) -> int:
    """Annotate every frame of a video into ``out/<name>.mp4``; returns the number of frames."""
    cap = cv2.VideoCapture(item.camera if item.camera is not None else str(item.path))
    if not cap.isOpened():
        if item.camera is not None:   # bad input of the user's (exit 2), not one skipped file
            raise DetkitError(f"cannot open camera {item.camera} with OpenCV (no such camera, no "
                              f"permission, or another program uses it)")
        raise ValueError(f"cannot open video {item.path}")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    target = writer.out_dir / out_name
    target.parent.mkdir(parents=True, exist_ok=True)
    video_out, frames, count = None, [], 0
    image_id = writer.image_id(item)
    bar = tqdm(total=total, desc=item.path.name, unit="frame", disable=None)
    try:
        while True:
            try:
                ok, bgr = cap.read()
            except KeyboardInterrupt:   # how a webcam run ends: keep what was recorded
                ok = False
            if ok:
                frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            if frames and (not ok or len(frames) == batch_size):
                for frame, result in zip(frames, predictor.predict_arrays(frames)):
                    if video_out is None:
                        h, w = frame.shape[:2]
                        video_out = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                        if not video_out.isOpened():
                            raise OSError(f"OpenCV cannot write an mp4v video to {target}")
                    writer.add(image_id, item, result, frame=count)
                    video_out.write(cv2.cvtColor(writer.annotate(frame, result), cv2.COLOR_RGB2BGR))
                    count += 1
                bar.update(len(frames))
                frames = []
            if not ok:
                break
    finally:
        cap.release()
        bar.close()
        if video_out is not None:
            video_out.release()
    if count == 0:
        raise ValueError(f"no frame could be decoded from {item.path}")
    return count


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="[CONFIG] CHECKPOINT INPUT",
                        help="a YAML config (optional: the checkpoint's own by default), the checkpoint "
                             "or exported .onnx, then images, folders, globs or videos")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--score-thr", type=float, default=0.3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU)")
    parser.add_argument("--coco-gt", help="annotation json whose image / category ids to use")
    parser.add_argument("--no-draw", action="store_true", help="only write predictions.json")
    parser.add_argument("--slice", type=int, metavar="S", help="sliced inference with S x S tiles")
    parser.add_argument("--slice-overlap", type=float, default=0.2, metavar="F",
                        help="overlap of neighbouring tiles, a fraction of S in [0, 1) (default 0.2)")
    parser.add_argument("--slice-merge", choices=("nms", "wbf"), default="nms",
                        help="merge tile boxes by NMS or weighted boxes fusion (default nms)")
    parser.add_argument("--no-full-image", action="store_true",
                        help="with --slice: skip the extra pass over the whole image")
    parser.add_argument("--full-image-size", type=int, metavar="N",
                        help="with --slice: shrink the whole image to a long side of N px for that "
                             "pass (the model's input size); default: as the test pipeline sizes it")
    parser.add_argument("--backend", choices=("pytorch", "onnxruntime", "openvino"),
                        help="default: pytorch for a checkpoint, onnxruntime for an exported .onnx")
    parser.add_argument("--threads", type=int, help="threads of an onnxruntime / openvino backend")
    parser.add_argument("--source", action="append", default=[], metavar="INPUT",
                        help="an input as well, e.g. --source 0 for camera 0")
    parser.add_argument("--nms-iou", default="0.5", metavar="IOU|off",
                        help="class-wise NMS for a model predicting without (CenterNet); default 0.5")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides (put it last)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    has_config = Path(args.paths[0]).suffix.lower() in (".yaml", ".yml")
    args.config = args.paths[0] if has_config else None
    args.checkpoint, *args.inputs = args.paths[1:] if has_config else args.paths
    args.inputs += args.source
    if not args.inputs:
        parser.error("give the CHECKPOINT and at least one INPUT")
    if args.set and args.config is None:
        parser.error("--set overrides a CONFIG: give the YAML config before the checkpoint")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.slice is not None and args.slice < 1:
        parser.error(f"--slice must be >= 1 pixel, got {args.slice}")
    if not 0.0 <= args.slice_overlap < 1.0:
        parser.error(f"--slice-overlap must be in [0, 1), got {args.slice_overlap}")
    if args.full_image_size is not None and args.full_image_size < 1:
        parser.error(f"--full-image-size must be >= 1 pixel, got {args.full_image_size}")
    try:
        args.nms_iou = None if args.nms_iou == "off" else float(args.nms_iou)
    except ValueError:
        parser.error(f"--nms-iou must be an IoU in (0, 1] or off, got {args.nms_iou!r}")
    if args.nms_iou is not None and not 0.0 < args.nms_iou <= 1.0:
        parser.error(f"--nms-iou must be an IoU in (0, 1] or off, got {args.nms_iou}")
    return args


def drawing_nms_iou(cfg: dict, iou: float | None) -> float | None:
    """``iou`` for a CenterNet predicting without NMS (``model.head.nms_iou_thresh`` null), else
    None: the drawings of other models are their predictions."""
    head = get_path(cfg, "model.head", None)
    if iou is None or not isinstance(head, dict) or head.get("type") != "CenterNetHead":
        return None
    return iou if head.get("nms_iou_thresh") is None else None


def classwise_nms(result: dict, iou: float) -> dict:
    """``result`` without the boxes that overlap a higher-scoring box of their class by more
    than ``iou`` (torchvision's batched_nms; masks and other per-box entries follow)."""
    from torchvision.ops import batched_nms

    boxes = result["boxes"].float().reshape(-1, 4)
    keep = batched_nms(boxes, result["scores"].float(), result["labels"], iou)
    return {k: v[keep] if torch.is_tensor(v) and v.shape[:1] == boxes.shape[:1] and k != "sem_seg" else v
            for k, v in result.items()}


def infer_main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set) if args.config else None   # None: the checkpoint's
        predictor = Predictor(cfg, args.checkpoint, device=args.device, score_thr=args.score_thr,
                              amp=args.amp, batch_size=args.batch_size, slice_size=args.slice,
                              slice_overlap=args.slice_overlap, slice_merge=args.slice_merge,
                              full_image=not args.no_full_image, full_image_size=args.full_image_size,
                              backend=args.backend,
                              threads=args.threads)
    except (ValueError, OSError) as e:   # the config / checkpoint / device the user named
        if isinstance(e, DetkitError):
            raise
        raise DetkitError(str(e)) from e
    nms_iou = drawing_nms_iou(predictor.cfg, args.nms_iou)
    if nms_iou is not None and not args.no_draw:
        print(f"drawings: class-wise NMS at IoU {nms_iou} (CenterNet predicts without; --nms-iou off)")
    items, failed = expand_inputs(args.inputs)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ResultWriter(out_dir, predictor, args.coco_gt, draw=not args.no_draw, nms_iou=nms_iou)
    names = unique_output_names(items)
    start = time.perf_counter()
    images = [(i, n) for i, n in zip(items, names) if not i.video]
    processed = run_images([i for i, _ in images], [n for _, n in images], predictor, writer,
                           args.batch_size, failed)
    for item, name in zip(items, names):
        if item.video:
            try:
                processed += run_video(item, name, predictor, writer, args.batch_size)
            except (ValueError, OSError) as e:
                failed.append((str(item.path), str(e)))
                print(f"skipped {item.path}: {e}", file=sys.stderr)
    elapsed = time.perf_counter() - start
    json_path = writer.save_json()
    print(f"{processed} images, {writer.num_detections} detections (score >= {args.score_thr}), "
          f"{processed / max(elapsed, 1e-9):.1f} images/s; {len(failed)} failed")
    print(f"annotated images in {out_dir}/, predictions in {json_path}" if not args.no_draw
          else f"predictions in {json_path}")
    for path, reason in failed:
        print(f"FAILED {path}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None) -> int:
    """Exit code: 0 all inputs done, 1 some input failed, 2 bad config / checkpoint / argument."""
    return run_cli(infer_main, argv)


if __name__ == "__main__":
    sys.exit(main())
