"""torchrun --nproc-per-node 2 (gloo, CPU): identical weights, sharded eval, NaN stop on all ranks."""

import os
import subprocess
import sys

import pytest
import torch

from detkit.config import dump_config
from detkit.engine import evaluate_checkpoint, load_checkpoint

from engine_helpers import REPO, base_config, read_metrics


@pytest.mark.slow
def test_torchrun_two_processes(shapes_root, tmp_path):
    # 16 images, batch 2 per rank, accumulate 2 (DDP no_sync on the first micro-batch): 2
    # iterations per epoch, so 5 iterations cross two epoch boundaries.
    real = base_config(shapes_root, iters=5, batch=2, workers=1, sync_bn=True, accumulate=2,
                       checkpoint={"interval": 5, "keep": 0, "best_metric": None})
    toy = base_config(shapes_root, toy=True, iters=3, batch=2, workers=0,
                      checkpoint={"interval": 3, "keep": 0, "best_metric": "bbox/AP"})
    toy["model"]["oracle"] = True
    toy["data"]["val"]["batch_size"] = 3  # 4 val images per rank: batches of 3 + 1
    dump_config(real, tmp_path / "real.yaml")
    dump_config(toy, tmp_path / "toy.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # --standalone: torchrun picks a free port itself (the multi-node form is in the README).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tests/engine/ddp_worker.py"), str(tmp_path / "real.yaml"),
           str(tmp_path / "toy.yaml"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sync_bn is ignored on CPU" in proc.stdout

    # 1. parameters (and, after the final evaluation, BN statistics) identical on both ranks
    ranks = [torch.load(tmp_path / f"real_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["iters_per_epoch"] == 2  # each rank trains on its half of the data
    for k, v in ranks[0]["model"].items():
        assert torch.equal(v, ranks[1]["model"][k]), k
    last = load_checkpoint(tmp_path / "real" / "last.pth")
    assert last["iter"] == 5 and len(last["rng"]) == 2
    for k, v in last["model"].items():
        assert torch.equal(v, ranks[0]["model"][k]), k
    assert not torch.equal(last["rng"][0]["torch"], last["rng"][1]["torch"])  # per-rank RNG kept
    # one metrics file (rank 0), one record per iteration
    assert [r["iter"] for r in read_metrics(tmp_path / "real")] == [1, 2, 3, 4, 5]

    # 2. the sharded evaluation equals a single-process evaluation of the saved checkpoint
    toy_ranks = [torch.load(tmp_path / f"toy_rank{r}.pt", weights_only=True) for r in (0, 1)]
    sharded = toy_ranks[0]["eval"]
    assert sharded == toy_ranks[1]["eval"]
    assert 0.05 < sharded["bbox/AP"] < 0.95  # far from trivial: a lost or doubled image shows
    single = evaluate_checkpoint(toy, tmp_path / "toy" / "best.pth", device="cpu")
    assert single.keys() == sharded.keys()
    for k, v in single.items():
        assert v == pytest.approx(sharded[k], abs=1e-9), k

    # 3. a NaN loss on rank 1 only stops both ranks in the same iteration, naming term and iteration
    for r in (0, 1):
        text = (tmp_path / f"nan_rank{r}.txt").read_text()
        assert text.startswith("stopped at iteration 2: non-finite loss at iteration 3"), text
        assert "loss_box=nan" in text and "rank 1: ['loss_box']" in text
    assert [r["iter"] for r in read_metrics(tmp_path / "nan")] == [1, 2]
