"""Run under ``torchrun`` by test_distributed.py; every phase writes per-rank results to WORK_DIR.

    torchrun --standalone --nproc-per-node 2 tests/engine/ddp_worker.py REAL.yaml TOY.yaml WORK_DIR

1. REAL (YOLOv3-tiny) trains: this rank's final weights and evaluation -> ``real_rank{r}.pt``.
2. TOY (oracle toy detector, AP far from 0) trains and evaluates -> ``toy_rank{r}.pt``.
3. TOY again with a NaN loss on rank 1 only at its third iteration -> ``nan_rank{r}.txt``.
"""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detkit.config import load_config  # noqa: E402
from detkit.engine import Trainer  # noqa: E402
from detkit.engine.dist import cleanup_distributed  # noqa: E402

import engine_helpers  # noqa: E402,F401  (registers the toy detector)

torch.set_num_threads(1)
real_cfg, toy_cfg, work_dir = load_config(sys.argv[1]), load_config(sys.argv[2]), Path(sys.argv[3])

for name, cfg in (("real", real_cfg), ("toy", toy_cfg)):
    trainer = Trainer(cfg, work_dir / name)
    results = trainer.train()
    rank = trainer.dist.rank
    torch.save({"model": trainer.model.state_dict(), "eval": results,
                "iters_per_epoch": trainer.iters_per_epoch}, work_dir / f"{name}_rank{rank}.pt")

poisoned = Trainer(toy_cfg, work_dir / "nan")
forward_train = poisoned.model.forward_train


def forward_with_nan(batch, targets):
    losses = forward_train(batch, targets)
    if rank == 1 and poisoned.iter == 2:
        losses["loss_box"] = losses["loss_box"] * math.nan
    return losses


poisoned.model.forward_train = forward_with_nan
try:
    poisoned.train()
    outcome = f"finished at iteration {poisoned.iter}"
except FloatingPointError as e:
    outcome = f"stopped at iteration {poisoned.iter}: {e}"
(work_dir / f"nan_rank{rank}.txt").write_text(outcome)
cleanup_distributed()
