"""Cross-rank negatives: 2 gloo processes of batch B equal one process of batch 2B."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detkit.ssl import build_method
from detkit.ssl.losses import nt_xent

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ssl_helpers import TINY_DARKNET  # noqa: E402


@pytest.mark.slow
def test_gathered_negatives_equal_one_process_with_the_doubled_batch(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "ssl_ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5).requires_grad_(), torch.randn(6, 5).requires_grad_()
    single = nt_xent(z1, z2, 0.5)
    single.backward()
    # The global loss is the mean of the ranks' losses; DDP averages the gradients over ranks.
    assert ((ranks[0]["loss"] + ranks[1]["loss"]) / 2).item() == pytest.approx(single.item(), rel=1e-6)
    assert not torch.allclose(ranks[0]["loss"], nt_xent(z1[:3], z2[:3], 0.5))   # negatives were gathered
    for r in (0, 1):
        rows = slice(3 * r, 3 * r + 3)
        assert torch.allclose(ranks[r]["g1"] / 2, z1.grad[rows], atol=1e-6)
        assert torch.allclose(ranks[r]["g2"] / 2, z2.grad[rows], atol=1e-6)

    # MoCo's Shuffle BN (key encoder in train mode): rank j encodes the j-th half of rank 0's
    # permutation of the 6 images, with BatchNorm over that half; each rank gets back the keys
    # of its own images in order; queues agree.
    images = ranks[0]["images"]
    moco = build_method({"type": "MoCoV2", "backbone": dict(TINY_DARKNET), "proj_hidden_dim": 16,
                         "queue_size": 8})
    torch.manual_seed(103)      # rank 0's draw in the worker
    perm = torch.randperm(6)
    assert set(perm[:3].tolist()) not in ({0, 1, 2}, {3, 4, 5})   # each half mixes both ranks' images
    encoded = []
    for j in (0, 1):
        moco.encoder_k.load_state_dict(ranks[0]["key_encoder"])
        with torch.no_grad():
            encoded.append(moco.encoder_k(images[perm[3 * j:3 * j + 3]]))
    expected = torch.empty(6, encoded[0].shape[1])
    expected[perm] = torch.cat(encoded)
    for r in (0, 1):
        assert torch.allclose(ranks[r]["keys"], expected[3 * r:3 * r + 3], atol=1e-5)
        moco.encoder_k.load_state_dict(ranks[0]["key_encoder"])
        with torch.no_grad():
            unshuffled = moco.encoder_k(images[3 * r:3 * r + 3])
        assert not torch.allclose(ranks[r]["keys"], unshuffled, atol=1e-3)   # the shuffle matters
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"])
    assert torch.allclose(ranks[0]["queue"][:6], torch.cat([ranks[0]["keys"], ranks[1]["keys"]]), atol=1e-6)
