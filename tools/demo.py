#!/usr/bin/env python
"""The ``make demo`` driver: built-in dataset -> statistics -> train -> evaluate -> annotated images.

    python tools/demo.py [--data data/shapes] [--work-dir work_dirs/demo] [--config CONFIG]
        [--iters N] [--num-train 1000] [--num-val 200] [--size 128] [--num-images 8] [--device cpu]
        [--skip-train] [--set key=value ...]

1. generates the built-in shapes dataset under ``--data`` unless it is already there;
2. prints its statistics (images, instances per class, small / medium / large boxes);
3. trains the config (default: CenterNet-R18 on shapes) into ``--work-dir`` (``--iters`` shortens
   the schedule; ``--skip-train`` reuses the work dir's checkpoint);
4. evaluates the best checkpoint on the val split (COCO mAP, per class);
5. runs the Predictor on the first ``--num-images`` val images and writes annotated copies to
   ``<work-dir>/predictions/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.config import ConfigError, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "centernet" / "centernet_r18_shapes.yaml"


def banner(step: int, text: str) -> None:
    print(f"\n=== [{step}/5] {text}", flush=True)


def prepare_data(data: Path, num_train: int, num_val: int, size: int) -> None:
    from detkit.data import shapes

    banner(1, f"dataset: {data}")
    if (data / "annotations" / "instances_val.json").is_file() \
            and (data / "annotations" / "instances_train.json").is_file():
        print("found an existing dataset (delete the folder to regenerate it)")
    else:
        start = time.perf_counter()
        shapes.generate(data, num_train, num_val, size=size)
        print(f"generated {num_train} train / {num_val} val images in "
              f"{time.perf_counter() - start:.1f} s")
    banner(2, "dataset statistics")
    print(shapes.format_stats(shapes.stats(data)))


def run_training(cfg: dict, work_dir: Path, skip: bool) -> Path:
    from detkit.engine import train

    banner(3, f"training -> {work_dir}")
    if skip and (work_dir / "last.pth").is_file():
        print(f"--skip-train: using the checkpoints in {work_dir}")
    else:
        t = cfg["train"]
        print(f"{t.get('max_iters')} iterations, batch {cfg['data']['train']['batch_size']}, "
              f"{t['optimizer']['type']} lr {t['optimizer']['lr']}")
        start = time.perf_counter()
        train(cfg, work_dir)
        print(f"training took {(time.perf_counter() - start) / 60:.1f} min")
    for name in ("best.pth", "last.pth"):
        if (work_dir / name).is_file():
            return work_dir / name
    raise FileNotFoundError(f"no checkpoint in {work_dir} after training")


def run_evaluation(cfg: dict, checkpoint: Path, device: str) -> dict:
    from detkit.engine import evaluate_checkpoint
    from detkit.evaluation.report import metrics_table

    banner(4, f"evaluation of {checkpoint.name} on the val split")
    metrics = evaluate_checkpoint(cfg, checkpoint, device=device)
    main = {k: v for k, v in metrics.items() if "-" not in k.split("/")[-1]}
    print(metrics_table(main))
    per_class = {k.split("/AP-", 1)[1]: v for k, v in metrics.items() if "/AP-" in k}
    if per_class:
        print("per-class AP: " + ", ".join(f"{k} {v:.3f}" for k, v in per_class.items()))
    return metrics


def run_inference(cfg: dict, checkpoint: Path, data: Path, out: Path, num_images: int,
                  device: str) -> list[Path]:
    import cv2
    import numpy as np

    from detkit.data.io import read_image
    from detkit.inference import Predictor
    from detkit.visualize import draw_result

    banner(5, f"inference on {num_images} val images")
    predictor = Predictor(cfg, checkpoint, device=device, score_thr=0.3)
    files = sorted((data / "val").glob("*.png"))[:num_images]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    images = [read_image(f) for f in files]
    for file, image, result in zip(files, images, predictor.predict_arrays(images)):
        # The shapes images are 128 px: enlarge before drawing so that the captions are legible.
        factor = 3 if max(image.shape[:2]) < 400 else 1
        big = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
        shown = dict(result, boxes=result["boxes"] * factor)
        if result.get("sem_seg") is not None:
            shown["sem_seg"] = cv2.resize(result["sem_seg"].numpy().astype(np.uint8), None, fx=factor,
                                          fy=factor, interpolation=cv2.INTER_NEAREST)
        names = predictor.class_names
        skip = (0,) if names and names[0] == "background" else ()
        canvas = draw_result(big, shown, names, seg_skip_labels=skip)
        target = out / file.name
        cv2.imwrite(str(target), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        written.append(target)
        found = ", ".join(f"{n} {s:.2f}" for n, s in zip(result["label_names"], result["scores"].tolist()))
        if "sem_seg" in result:
            found = "classes in the mask: " + ", ".join(
                names[i] if i < len(names) else str(i) for i in result["sem_seg"].unique().tolist())
        print(f"  {file.name}: {found or 'nothing above 0.3'}")
    return written


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/shapes", help="built-in dataset folder")
    parser.add_argument("--work-dir", default="work_dirs/demo")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--iters", type=int, help="override train.max_iters")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--size", type=int, default=128, help="image side of a generated dataset")
    parser.add_argument("--num-images", type=int, default=8, help="val images to annotate")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--skip-train", action="store_true", help="reuse the work dir's checkpoint")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    return parser.parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    args = parse_args(argv)
    data, work_dir = Path(args.data), Path(args.work_dir)
    overrides = [f"data.root={data}"] + ([f"train.max_iters={args.iters}"] if args.iters else [])
    try:
        cfg = load_config(args.config, overrides + list(args.set))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    prepare_data(data, args.num_train, args.num_val, args.size)
    checkpoint = run_training(cfg, work_dir, args.skip_train)
    metrics = run_evaluation(cfg, checkpoint, args.device)
    written = run_inference(cfg, checkpoint, data, work_dir / "predictions", args.num_images,
                            args.device)
    keys = [k for k in ("bbox/AP", "bbox/AP50", "sem_seg/mIoU") if k in metrics]
    summary = ", ".join(f"{k} {metrics[k]:.3f}" for k in keys)
    print(f"\ndemo finished in {(time.perf_counter() - start) / 60:.1f} min: {summary}")
    print(f"annotated val images: {work_dir / 'predictions'}/ ({len(written)} files)")
    print(f"more: python tools/infer.py {args.config} {checkpoint} {data}/val --out "
          f"{work_dir}/infer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
