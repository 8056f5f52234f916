#!/usr/bin/env python
"""Export a detkit detector to ONNX: the network up to the raw head outputs, checked with onnxruntime.

    python tools/export.py CONFIG CHECKPOINT --out model.onnx [--size 512 512] [--batch 1]
        [--opset 17] [--dynamic] [--no-check] [--set key=value ...]

What is in the graph: input ``images`` Float[B,3,H,W] RGB in [0,1] (H, W multiples of the
model's ``size_divisibility``, 32 by default) -> ImageNet normalisation -> backbone -> neck ->
head ``forward``. Its outputs are the head's raw tensors, flattened in order and named by their
place in the head's output structure (``heatmap``, ``wh``, ``offset`` for CenterNet; ``0``,
``1``, ``2`` per level for YOLO; ``sem_seg`` logits for segmentors). A two-stage detector is
exported up to its RPN outputs (the RoI stage needs proposals, i.e. data-dependent shapes).

What is not in the graph (post-processing, done on the outputs):

* resizing/letterboxing the image (the config's ``data.val.pipeline``) and mapping boxes back;
* decoding: CenterNet = sigmoid, 3x3 max-pool peaks, top-K, ``box = (cell + offset -/+ wh/2) *
  stride``; YOLO = sigmoid / exp decoding against the anchors of each level, score threshold,
  class-wise NMS. The exact code is the head's ``predict``; the simplest way to post-process is
  to hand the onnxruntime outputs back to it::

      outputs = unflatten(dict(zip(names, session.run(None, {"images": x}))))   # torch tensors
      detections = model.head.predict(outputs, [(H, W)] * B)

The output names and the structure are also written to ``<out>.json`` next to the model.
``--check`` (default on) runs onnxruntime and PyTorch on the same random input and reports the
largest absolute difference per output; exit code 1 when it exceeds ``--atol``.
Deformable convolutions (DCN backbones / CenterNet DCN neck) have no ONNX operator.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detkit.config import ConfigError, load_config  # noqa: E402
from detkit.inference import CheckpointError, load_predictor_weights  # noqa: E402
from detkit.models import build_model  # noqa: E402


def flatten(outputs, prefix: str = "") -> list[tuple[str, Tensor]]:
    """Nested dict / list / tuple of tensors -> [(dotted name, tensor)] in order."""
    if isinstance(outputs, Tensor):
        return [(prefix or "output", outputs)]
    if isinstance(outputs, dict):
        items = outputs.items()
    elif isinstance(outputs, (list, tuple)):
        items = enumerate(outputs)
    else:
        raise TypeError(f"cannot export a head output of type {type(outputs).__name__} at "
                        f"'{prefix or 'outputs'}'")
    flat = []
    for key, value in items:
        flat.extend(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def unflatten(named: dict[str, object]):
    """Inverse of :func:`flatten`: numeric keys become list indices; numpy -> torch tensors."""
    root: dict = {}
    for name, value in named.items():
        node, parts = root, name.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = torch.as_tensor(value) if isinstance(value, np.ndarray) else value

    def fix(node):
        if not isinstance(node, dict):
            return node
        if node and all(k.isdigit() for k in node):
            return [fix(node[k]) for k in sorted(node, key=int)]
        return {k: fix(v) for k, v in node.items()}

    out = fix(root)
    return out["output"] if isinstance(out, dict) and list(out) == ["output"] else out


class RawOutputs(nn.Module):
    """Normalise -> backbone -> neck -> head.forward, returning the flattened raw outputs."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector
        self.names: list[str] = []

    def raw(self, images: Tensor):
        d = self.detector
        x = (images - d.pixel_mean) / d.pixel_std
        feats = d.backbone(x)
        if getattr(d, "neck", None) is not None:
            feats = d.neck(feats)
        for attr in ("head", "sem_seg_head", "seg_head", "rpn"):
            if getattr(d, attr, None) is not None:
                return getattr(d, attr)(feats)
        raise TypeError(f"{type(d).__name__}: no head / seg head / rpn to export")

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        flat = flatten(self.raw(images))
        self.names = [n for n, _ in flat]
        return tuple(t for _, t in flat)


def export_onnx(model: nn.Module, out: Path, height: int, width: int, *, batch: int = 1,
                opset: int = 17, dynamic: bool = False) -> list[str]:
    """Trace ``model`` (eval mode) into ``out``; returns the output names."""
    div = int(getattr(model, "size_divisibility", 1) or 1)
    if height % div or width % div:
        raise ValueError(f"--size {height} {width}: must be multiples of the model's "
                         f"size_divisibility ({div})")
    wrapper = RawOutputs(model.eval())
    example = torch.rand(batch, 3, height, width)
    with torch.no_grad():
        wrapper(example)
    names = wrapper.names
    axes = None
    if dynamic:
        axes = {"images": {0: "batch", 2: "height", 3: "width"}}
        axes.update({n: {0: "batch"} for n in names})
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the TorchScript exporter announces its deprecation
        torch.onnx.export(wrapper, (example,), str(out), input_names=["images"], output_names=names,
                          opset_version=opset, dynamic_axes=axes, dynamo=False)
    return names


def check_onnx(model: nn.Module, path: Path, height: int, width: int, batch: int = 1,
               seed: int = 0) -> dict[str, float]:
    """Max |onnxruntime - PyTorch| per output on one random input."""
    import onnxruntime as ort

    x = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    wrapper = RawOutputs(model.eval())
    with torch.no_grad():
        expected = wrapper(x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})
    return {name: float(np.abs(g - e.numpy()).max()) if g.size else 0.0
            for name, g, e in zip(wrapper.names, got, expected)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("checkpoint", help="checkpoint, or 'none' for random weights")
    parser.add_argument("--out", required=True, help="output .onnx file")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--dynamic", action="store_true", help="dynamic batch / height / width")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    parser.add_argument("--atol", type=float, default=1e-3)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    height, width = args.size
    try:
        cfg = load_config(args.config, args.set)
        model = build_model(cfg["model"])
        if args.checkpoint.lower() != "none":
            load_predictor_weights(model, args.checkpoint)
        names = export_onnx(model, out, height, width, batch=args.batch, opset=args.opset,
                            dynamic=args.dynamic)
    except (ConfigError, CheckpointError, ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = {"input": {"name": "images", "shape": [args.batch, 3, height, width],
                      "format": "RGB float in [0,1]; normalisation is inside the graph"},
            "outputs": names, "config": str(args.config), "detector": type(model).__name__,
            "postprocess": "unflatten(outputs) -> model.head.predict(outputs, image_sizes); "
                           "see tools/export.py"}
    Path(f"{out}.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB), outputs: {', '.join(names)}")
    if args.no_check:
        return 0
    diffs = check_onnx(model, out, height, width, args.batch)
    worst = max(diffs.values(), default=0.0)
    for name, diff in diffs.items():
        print(f"  {name}: max |onnxruntime - pytorch| = {diff:.2e}")
    ok = worst <= args.atol
    print(f"onnxruntime check {'passed' if ok else 'FAILED'} (atol {args.atol})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
