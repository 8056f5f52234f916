#!/usr/bin/env python
"""Self-supervised pre-training -> low-label detection fine-tuning on shapes (README table).

    python tools/benchmarks/self_supervised.py [--methods moco_v2 byol ...] [--fractions 0.1 1.0]
        [--pretrain-iters 120] [--pretrain-batch 32] [--finetune-iters 150 300 600]
        [--work-dir work_dirs/ssl_bench] [--lock /tmp/detkit_heavy.lock] [--pretrain-set k=v ...]
        [--pretrained-set k=v ...] [--seeds 0 1 2]

For each method: ``tools/pretrain.py configs/pretrain/<method>_r18_shapes.yaml`` at the given
budget; then for each label fraction and each fine-tuning budget CenterNet-R18
(``configs/centernet/centernet_r18_shapes.yaml``) is fine-tuned with ``data.train.subset=<fraction>``
from scratch and from every pre-trained backbone, with the same recipe and iterations, and
evaluated once at the end on shapes val; finally a weighted 20-NN classifier of frozen pooled c5
features on object crops (train objects as the bank, val objects as queries, 64 x 64) and the
effective rank of those features on the val crops check the representations. Each cell is the
mean over ``--seeds``; "gain" is the mean AP50 gain over scratch and, after "min", the smallest
gain of a seed over scratch with the same seed. Steps whose outputs exist are skipped, so an
interrupted run continues. ``--lock``: each training holds this file
lock (flock) so that heavy jobs of a shared machine run one at a time; times exclude the wait
(they are the sums of the logged step times). ``tools/benchmark.py self_supervised`` prints the
table of the results already in ``--work-dir``. ``--pretrain-set`` passes overrides to every
pre-training (a recipe variant: use its own ``--work-dir``); ``--pretrained-set`` passes overrides
to the fine-tuning of pre-trained backbones only (the fine-tuning recipe for a pre-trained
backbone, e.g. a lower backbone learning rate; scratch keeps the detector config's recipe). It is
stored in ``recipe.json`` of the work dir and printed with the table. (Not named ``ssl.py``: run
as a script, that name would shadow Python's ``ssl`` module.)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1]
REPO = TOOLS.parent
sys.path.insert(0, str(REPO))

METHODS = ("moco_v2", "simclr", "byol", "simsiam", "dino")
METHOD_SET = {"moco_v2": ["model.bn_splits=2"]}   # 16 images per BN split at batch 32
DETECTOR = "configs/centernet/centernet_r18_shapes.yaml"


def step_seconds(run: Path) -> float | None:
    """Sum of logged step times (each record averages ``time`` over the iterations since the last)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    total, last = 0.0, 0
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("mode") == "train":
            total += record["time"] * (record["iter"] - last)
            last = record["iter"]
    return total


def final_eval(run: Path) -> dict | None:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    vals = [json.loads(x) for x in path.read_text().splitlines() if '"mode": "val"' in x]
    return vals[-1] if vals else None


def finished(run: Path, iters: int) -> bool:
    import torch

    last = run / "last.pth"
    return last.is_file() and int(torch.load(last, map_location="cpu", weights_only=True)["iter"]) >= iters


def run_locked(cmd: list[str], lock: str | None, log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with open(lock or os.devnull, "a") as handle:
        if lock:
            fcntl.flock(handle, fcntl.LOCK_EX)
        with open(log, "w") as out:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def pretrain(args, method: str) -> Path:
    run = args.work_dir / method
    if not finished(run, args.pretrain_iters):
        cmd = [sys.executable, "tools/pretrain.py", f"configs/pretrain/{method}_r18_shapes.yaml",
               "--work-dir", str(run), "--set", f"train.max_iters={args.pretrain_iters}",
               f"data.train.batch_size={args.pretrain_batch}", "data.train.num_workers=1",
               "train.checkpoint.interval=50", *METHOD_SET.get(method, []), *args.pretrain_set]
        print("running:", " ".join(cmd), flush=True)
        run_locked(cmd, args.lock, args.work_dir / f"{method}.log")
    return run / "last.pth"


def ft_dir(init: str, fraction: float, iters: int, seed: int) -> str:
    """Fine-tuning run name; seed 0 (the detector config's own seed) has no seed suffix."""
    return f"ft_{init}_{fraction:g}_{iters}it" + (f"_s{seed}" if seed else "")


FT_DIR = re.compile(r"ft_scratch_([0-9.]+)_(\d+)it(?:_s(\d+))?")


def finetune(args, init: str, fraction: float, weights: Path | None, n: int, seed: int = 0) -> dict:
    name = ft_dir(init, fraction, n, seed)
    run = args.work_dir / name
    if not finished(run, n):
        sets = [f"data.train.subset={fraction}", f"train.max_iters={n}", f"train.eval_interval={n}",
                f"train.checkpoint.interval={n}", "train.checkpoint.best_metric=null",
                "data.train.num_workers=1", "data.val.num_workers=1",
                f"train.scheduler.warmup_iters={min(100, n // 5)}"]
        if seed:
            sets.append(f"train.seed={seed}")
        if weights is not None:
            sets += [f"model.backbone.weights={weights}", *args.pretrained_set]
        cmd = [sys.executable, "tools/train.py", DETECTOR, "--work-dir", str(run), "--set", *sets]
        print("running:", " ".join(cmd), flush=True)
        run_locked(cmd, args.lock, args.work_dir / f"{name}.log")
    return {"eval": final_eval(run), "seconds": step_seconds(run)}


def pooled_c5(weights: Path | None, *image_sets) -> list:
    """Float[N,512] pooled c5 features of each image set, from one frozen ResNet-18 (random init
    when ``weights`` is None)."""
    import torch

    from detkit.models.backbones import ResNet
    from detkit.models.detectors.base import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    net = ResNet(depth=18, out_features=["c5"], weights=str(weights) if weights else None).eval()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return [torch.cat([net((x - mean) / std)["c5"].mean(dim=(2, 3)) for x in images.split(256)])
                for images in image_sets]


def knn_accuracy(bank, bank_labels, queries, labels) -> float:
    """Weighted 20-NN top-1 accuracy of the query features against the labelled bank features."""
    from detkit.ssl.knn import knn_predict

    predicted = knn_predict(bank, bank_labels, queries, num_classes=4, k=20)
    return float((predicted == labels).float().mean())


def effective_rank(features) -> float:
    """exp(entropy) of the normalised spectrum of the centred Float[N,C] features (Roy & Vetterli,
    2007): C for isotropic features, 1 when one direction holds all the variance (dimensional
    collapse, which ``feature_std`` of the pre-training log does not see)."""
    import torch

    s2 = torch.linalg.svdvals(features - features.mean(0)).double() ** 2
    p = s2[s2 > 0] / s2.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def stem_lowpass(weights: Path | None) -> float:
    """||spatial mean of conv1's 7 x 7 kernels|| / ||conv1||: about 1/7 for a random (or edge-like)
    stem, 1 for a stem that only averages colour (what short SGD pre-training drifts to)."""
    import torch

    from detkit.models.backbones import ResNet

    torch.manual_seed(0)
    w = ResNet(depth=18, out_features=["c5"], weights=str(weights) if weights else None).conv1.weight.detach()
    return float(w.mean(dim=(2, 3), keepdim=True).expand_as(w).norm() / w.norm())


def load_crops(root: str):
    from detkit.data import build_dataset
    from detkit.ssl.knn import object_crops

    def split(name):
        cfg = {"dataset": {"type": "CocoDetection", "img_dir": name,
                           "ann_file": f"annotations/instances_{name}.json"}, "batch_size": 1}
        return object_crops(build_dataset(cfg, root=root), 64)

    return split("train"), split("val")


def seed_evals(args, init: str, fraction: float, iters: int) -> list[dict | None]:
    return [final_eval(args.work_dir / ft_dir(init, fraction, iters, seed)) for seed in args.seeds]


def cell(evals: list[dict | None], base: list[dict | None] | None) -> str:
    """Mean AP50 / AP over the seeds done, each seed's AP50, and the gain over ``base`` (scratch)."""
    done = [ev for ev in evals if ev]
    if not done:
        return "not run"
    ap50, ap = (sum(ev[k] for ev in done) / len(done) for k in ("bbox/AP50", "bbox/AP"))
    text = f"{ap50:.3f} / {ap:.3f}"
    if len(evals) > 1:
        text += " (" + ", ".join(f"{ev['bbox/AP50']:.3f}" if ev else "-" for ev in evals) + ")"
    gains = [ev["bbox/AP50"] - b["bbox/AP50"] for ev, b in zip(evals, base or []) if ev and b]
    if gains:
        text += f"; gain {sum(gains) / len(gains):+.3f}"
        text += f", min {min(gains):+.3f}" if len(gains) > 1 else ""
    return text


def table(args, methods, fractions, knn: dict | None) -> str:
    budgets = args.finetune_iters
    head = ["backbone init", f"pre-training ({args.pretrain_iters} it x {args.pretrain_batch})"]
    head += [f"AP50 / AP, {f:.0%} labels, {n} it" for f in fractions for n in budgets]
    head += ["k-NN acc.", "c5 eff. rank", "stem low-pass"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for init in ["scratch", *methods]:
        seconds = step_seconds(args.work_dir / init) if init != "scratch" else None
        cells = [init, f"{seconds / 60:.1f} min" if seconds else "-"]
        for f in fractions:
            for n in budgets:
                base = seed_evals(args, "scratch", f, n) if init != "scratch" else None
                cells.append(cell(seed_evals(args, init, f, n), base))
        acc = (knn or {}).get(init)
        cells.append(f"{acc:.3f}" if acc is not None else "-")
        rank = (knn or {}).get(f"{init}/rank")
        cells.append(f"{rank:.1f}" if rank is not None else "-")
        weights = args.work_dir / init / "last.pth"
        cells.append(f"{stem_lowpass(weights if init != 'scratch' else None):.2f}"
                     if init == "scratch" or weights.is_file() else "-")
        rows.append("| " + " | ".join(cells) + " |")
    recipe = " ".join(args.pretrained_set) or "the detector config's own"
    return "\n".join(rows) + f"\nfine-tuning recipe of pre-trained backbones: {recipe}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--fractions", nargs="+", type=float, default=[0.1])
    p.add_argument("--pretrain-iters", type=int, default=120)
    p.add_argument("--pretrain-batch", type=int, default=32)
    p.add_argument("--finetune-iters", nargs="+", type=int, default=[150],
                   help="fine-tuning budgets; each gets its own runs and table column")
    p.add_argument("--data-root", default="data/shapes")
    p.add_argument("--work-dir", type=Path, default=Path("work_dirs/ssl_bench"))
    p.add_argument("--lock", default=None, help="flock this file around every training run")
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="fine-tuning seeds (train.seed); the table shows the mean AP and each seed's AP50")
    p.add_argument("--skip-knn", action="store_true")
    p.add_argument("--pretrain-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="overrides for every pre-training run (e.g. train.optimizer.type=LARS)")
    p.add_argument("--pretrained-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="overrides for fine-tuning from a pre-trained backbone only "
                        "(e.g. 'train.optimizer.lr_mult={backbone: 0.1}')")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.work_dir = args.work_dir if args.work_dir.is_absolute() else REPO / args.work_dir
    args.work_dir.mkdir(parents=True, exist_ok=True)
    knn_file = args.work_dir / "knn.json"
    knn = json.loads(knn_file.read_text()) if knn_file.is_file() else {}
    recipe_file = args.work_dir / "recipe.json"
    if recipe_file.is_file() and json.loads(recipe_file.read_text()) != args.pretrained_set:
        raise SystemExit(f"{recipe_file} holds another --pretrained-set "
                         f"({json.loads(recipe_file.read_text())}); use another --work-dir")
    recipe_file.write_text(json.dumps(args.pretrained_set))
    crops = None

    def check(init: str, weights: Path | None) -> None:
        """k-NN accuracy and c5 effective rank of ``init``, saved as soon as they are known (a
        cut-short run keeps them)."""
        nonlocal crops
        if args.skip_knn or (init in knn and f"{init}/rank" in knn):
            return
        import torch

        torch.set_num_threads(1)
        crops = crops or load_crops(str(REPO / args.data_root))
        (bank, bank_labels), (queries, labels) = crops
        bank_features, query_features = pooled_c5(weights, bank, queries)
        knn[init] = knn_accuracy(bank_features, bank_labels, query_features, labels)
        knn[f"{init}/rank"] = effective_rank(query_features)
        knn_file.write_text(json.dumps(knn, indent=1))

    # Results arrive in order (scratch, then method by method) so a cut-short run still has a table.
    check("scratch", None)
    for fraction in args.fractions:
        for n in args.finetune_iters:
            for seed in args.seeds:
                finetune(args, "scratch", fraction, None, n, seed)
    for m in args.methods:
        weights = pretrain(args, m)
        check(m, weights)
        for fraction in args.fractions:
            for n in args.finetune_iters:
                for seed in args.seeds:
                    finetune(args, m, fraction, weights, n, seed)
    print(table(args, args.methods, args.fractions, knn))


def run(args: argparse.Namespace) -> None:
    """``tools/benchmark.py self_supervised``: the table of results already measured (runs nothing)."""
    saved = parse_args([])
    saved.work_dir = REPO / saved.work_dir
    knn_file = saved.work_dir / "knn.json"
    knn = json.loads(knn_file.read_text()) if knn_file.is_file() else None
    recipe_file = saved.work_dir / "recipe.json"
    saved.pretrained_set = json.loads(recipe_file.read_text()) if recipe_file.is_file() else []
    methods = [m for m in METHODS if (saved.work_dir / m).is_dir()]
    # the fine-tuning work dirs ft_scratch_<fraction>_<iters>it[_s<seed>] (the .log files share the prefix)
    runs = [FT_DIR.fullmatch(p.name) for p in saved.work_dir.glob("ft_scratch_*") if p.is_dir()]
    runs = [m for m in runs if m]
    if not runs:
        print(f"no results in {saved.work_dir}; measure with: python "
              f"tools/benchmarks/self_supervised.py --lock /tmp/detkit_heavy.lock")
        return
    fractions = sorted({float(m.group(1)) for m in runs})
    saved.finetune_iters = sorted({int(m.group(2)) for m in runs})
    saved.seeds = sorted({int(m.group(3) or 0) for m in runs})
    print(table(saved, methods, fractions, knn))


if __name__ == "__main__":
    main()
