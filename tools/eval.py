#!/usr/bin/env python
"""Evaluate a detkit model, or score prediction files without a model.

    python tools/eval.py [CONFIG] CHECKPOINT [--set key=value ...] [--out metrics.json] [--pr-curves DIR]
        [--device cpu|cuda|cuda:N]
    torchrun --nproc-per-node 8 tools/eval.py CONFIG CHECKPOINT ...
    python tools/eval.py --coco-gt GT.json --coco-dt DT.json [--iou-type bbox|segm] [--out M.json]
                         [--backend faster|pycocotools]
    python tools/eval.py --seg-gt DIR --seg-pred DIR --num-classes N [--ignore-index 255] [--out M.json]

A checkpoint written by ``tools/train.py`` holds its resolved config: CONFIG may be left out
(``--set`` then overrides the stored config, e.g. ``data.root=`` where the data lives now).
CHECKPOINT may also be an exported model (``.onnx``, INT8 ``.onnx``, OpenVINO ``.xml``; its
metadata holds the config): the same loader, evaluator and report, run by ONNX Runtime or
OpenVINO, so the accuracy of what is deployed is measured (``detkit.deploy.evaluate``).
With a config, the model is evaluated on the config's ``data.val`` split with its ``evaluation``
evaluator (every rank predicts its shard; the evaluator gathers). The report (COCO summary block,
per-class table) is printed and the flat metrics dict is written as json (NaN as null) to
``--out`` or ``metrics.json`` next to the checkpoint. ``--seg-gt``/``--seg-pred`` pair PNG masks by
file name (palette PNGs are read as indices). Exit code 2 for bad arguments, configs or files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.cli import add_debug_flag, run_cli  # noqa: E402
from detkit.config import (  # noqa: E402
    ConfigError,
    apply_overrides,
    load_config,
    load_yaml,
    propagate_ignore_index,
    propagate_image_size,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML config (model mode; optional: the checkpoint's own)")
    p.add_argument("checkpoint", nargs="?", help="checkpoint file (model mode)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="config overrides, e.g. data.root=/data/coco data.val.batch_size=4")
    p.add_argument("--out", help="metrics json path (default: metrics.json next to the checkpoint; "
                                 "file modes: not written unless given)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--amp", action="store_true",
                   help="model mode: a checkpoint under autocast (bf16 on CPU, fp16 on CUDA); an "
                        "exported model on OpenVINO in BF16 (onnxruntime refuses it)")
    p.add_argument("--pr-curves", metavar="DIR", help="write per-class PR-curve PNGs (COCO/VOC evaluators)")
    p.add_argument("--coco-gt", help="COCO annotation json (file mode)")
    p.add_argument("--coco-dt", help="COCO results json: a list of detections (file mode)")
    p.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox")
    p.add_argument("--backend", choices=("faster", "pycocotools"),
                   help="COCO evaluation engine (default: the config's evaluation.backend, else faster: "
                        "faster-coco-eval, same numbers as pycocotools)")
    p.add_argument("--seg-gt", help="folder of ground-truth mask PNGs (file mode)")
    p.add_argument("--seg-pred", help="folder of predicted mask PNGs, same file names")
    p.add_argument("--num-classes", type=int, help="number of classes of the masks (with --seg-gt)")
    p.add_argument("--ignore-index", type=int, default=255)
    add_debug_flag(p)
    args = p.parse_args(argv)
    modes = [bool(args.config or args.checkpoint), bool(args.coco_gt or args.coco_dt),
             bool(args.seg_gt or args.seg_pred)]
    if sum(modes) != 1:
        p.error("give exactly one of: CONFIG CHECKPOINT | --coco-gt/--coco-dt | --seg-gt/--seg-pred")
    if modes[0] and not args.checkpoint:
        if Path(args.config).suffix.lower() in (".yaml", ".yml"):
            p.error("model mode needs a CHECKPOINT (the config alone has no weights)")
        args.config, args.checkpoint = None, args.config   # a checkpoint alone: its stored config
    if modes[1] and not (args.coco_gt and args.coco_dt):
        p.error("--coco-gt and --coco-dt go together")
    if modes[2] and not (args.seg_gt and args.seg_pred and args.num_classes):
        p.error("--seg-gt, --seg-pred and --num-classes go together")
    return args


def evaluate_model(args) -> tuple[dict, str]:
    """Evaluate CHECKPOINT on the config's val split; returns (metrics, report) on every rank."""
    import torch

    from detkit.data.classes import resolve_num_classes
    from detkit.deploy.runtime import is_exported
    from detkit.engine import inference_on_loader, inference_state_dict, load_checkpoint, load_model_weights
    from detkit.engine.dist import init_distributed
    from detkit.models import build_model
    from detkit.models.convert import apply_converted_meta

    info = init_distributed()
    if args.config is not None:   # the config's data problems first: no checkpoint needed to see them
        cfg = resolve_num_classes(load_config(args.config, args.overrides), check=False)
        built = _build_val(args, cfg)
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    if is_exported(args.checkpoint):
        return _evaluate_exported(args, cfg if args.config is not None else None)
    ckpt = load_checkpoint(args.checkpoint)
    if args.config is None:
        cfg = resolve_num_classes(_config_of(args, ckpt), check=False)
        built = _build_val(args, cfg)
    _, loader, evaluator = built
    device = torch.device(args.device) if args.device else info.device
    model = build_model(cfg["model"]).to(device)
    from detkit.engine.architecture import describe_checkpoint

    load_model_weights(model, inference_state_dict(ckpt), source=args.checkpoint,
                       architecture=describe_checkpoint(ckpt))
    apply_converted_meta(model, ckpt.get("meta") or {})
    from detkit.inference import amp_dtype

    with torch.autocast(device.type, dtype=amp_dtype(device), enabled=args.amp):
        metrics = inference_on_loader(model, loader, evaluator, device)
    report = evaluator.report() if hasattr(evaluator, "report") else ""
    if not report:
        from detkit.evaluation import metrics_table
        report = metrics_table(metrics)
    return metrics, report


def _build_val(args, cfg: dict):
    from detkit.engine.evaluate import build_val

    if args.pr_curves and cfg.get("evaluation", {}).get("type") in ("COCOEvaluator", "VOCEvaluator"):
        cfg["evaluation"]["pr_curve_dir"] = args.pr_curves
    if args.backend and cfg.get("evaluation", {}).get("type") == "COCOEvaluator":
        cfg["evaluation"]["backend"] = args.backend
    built = build_val(cfg)
    if built is None:
        raise ConfigError(f"{args.config or args.checkpoint}: needs data.val and evaluation sections "
                          f"to evaluate")
    return built


def _evaluate_exported(args, cfg: dict | None) -> tuple[dict, str]:
    """An exported .onnx / INT8 .onnx / OpenVINO .xml on the config's val split (the config from
    CONFIG, else the one stored in its metadata at export)."""
    from detkit.deploy.evaluate import evaluate_exported
    from detkit.deploy.runtime import DeployedModel, default_backend
    from detkit.evaluation import metrics_table

    if cfg is None:
        stored = DeployedModel(args.checkpoint, backend=default_backend(args.checkpoint)).stored_config()
        if stored is None:
            raise ConfigError(f"{args.checkpoint}: its metadata holds no config; give CONFIG")
        from detkit.config import apply_overrides
        from detkit.data.classes import resolve_num_classes
        cfg = resolve_num_classes(apply_overrides(stored, args.overrides), check=False)
    _build_val(args, cfg)          # the same checks and evaluator options as for a checkpoint
    metrics = evaluate_exported(cfg, args.checkpoint, threads=None, precision="bf16" if args.amp else "f32")
    return metrics, metrics_table(metrics)


def _config_of(args, ckpt: dict) -> dict:
    """CONFIG with ``--set``, or else the resolved config the trainer stored in the checkpoint."""
    if args.config is not None:
        return load_config(args.config, args.overrides)
    text = ckpt.get("config")
    stored = load_yaml(text) if isinstance(text, str) else text
    if not isinstance(stored, dict):
        raise ConfigError(f"{args.checkpoint}: holds no config (not written by tools/train.py?); "
                          f"give the YAML config before the checkpoint")
    return propagate_image_size(propagate_ignore_index(apply_overrides(stored, args.overrides)))


def evaluate_seg_dirs(args) -> tuple[dict, str]:
    """PNG masks of ``--seg-pred`` against ``--seg-gt`` (matched by file name)."""
    import torch

    from detkit.data.io import read_mask
    from detkit.evaluation import SegEvaluator

    gt_dir, pred_dir = Path(args.seg_gt), Path(args.seg_pred)
    for d in (gt_dir, pred_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"mask folder not found: {d}")
    gt_files = sorted(gt_dir.glob("*.png"))
    if not gt_files:
        raise FileNotFoundError(f"no .png masks in {gt_dir}")
    evaluator = SegEvaluator(num_classes=args.num_classes, ignore_index=args.ignore_index)
    for gt_file in gt_files:
        pred_file = pred_dir / gt_file.name
        if not pred_file.is_file():
            raise FileNotFoundError(f"no prediction {pred_file} for ground truth {gt_file}")
        gt = torch.from_numpy(read_mask(gt_file).astype("int64"))
        pred = torch.from_numpy(read_mask(pred_file).astype("int64"))
        if gt.shape != pred.shape:
            raise ValueError(f"{pred_file}: size {tuple(pred.shape)} != ground truth {tuple(gt.shape)}")
        try:
            evaluator.process([{"image_id": gt_file.stem, "sem_seg": gt}], [{"sem_seg": pred}])
        except ValueError as e:
            raise ValueError(f"{gt_file.name}: {e}") from None
    metrics = evaluator.evaluate()
    return metrics, f"{len(gt_files)} masks from {gt_dir}\n{evaluator.report()}"


def write_metrics(metrics: dict, path: Path) -> None:
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean, indent=2) + "\n", encoding="utf-8")


def eval_main(argv=None) -> int:
    args = parse_args(argv)
    from detkit.engine.dist import cleanup_distributed, get_rank
    from detkit.evaluation import evaluate_coco_files

    try:
        if args.checkpoint:
            metrics, report = evaluate_model(args)
            out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "metrics.json"
        elif args.coco_gt:
            metrics, report = evaluate_coco_files(args.coco_gt, args.coco_dt, args.iou_type,
                                                  backend=args.backend or "faster")
            out = Path(args.out) if args.out else None
        else:
            metrics, report = evaluate_seg_dirs(args)
            out = Path(args.out) if args.out else None
        if get_rank() == 0:
            print(report)
            if out is not None:
                write_metrics(metrics, out)
                print(f"metrics written to {out}")
    finally:
        cleanup_distributed()
    return 0


def main(argv=None) -> int:
    """Exit code 0, or 2 with one ``error:`` line for a bad config, checkpoint or file (a
    ValueError here comes from a malformed json or mask)."""
    return run_cli(eval_main, argv, user_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
