"""Run by test_ssl_distributed.py under ``torchrun --standalone --nproc-per-node 2`` (gloo).

Writes ``rank{r}.pt`` into OUT_DIR: the NT-Xent loss and input gradients of this rank's half of a
fixed batch, and MoCo's Shuffle-BN keys and queue.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ssl_helpers import TINY_DARKNET  # noqa: E402

from detkit.ssl import build_method  # noqa: E402
from detkit.ssl.losses import gather_no_grad, nt_xent  # noqa: E402
from detkit.ssl.moco import enqueue  # noqa: E402

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)                      # the same "global batch" on both ranks
z1_all, z2_all = torch.randn(6, 5), torch.randn(6, 5)
mine = slice(3 * rank, 3 * rank + 3)
z1, z2 = z1_all[mine].clone().requires_grad_(), z2_all[mine].clone().requires_grad_()
loss = nt_xent(z1, z2, 0.5)
loss.backward()

moco = build_method({"type": "MoCoV2", "backbone": dict(TINY_DARKNET), "proj_hidden_dim": 16,
                     "queue_size": 8})
# The key encoder in train mode, as in training: BatchNorm normalises each rank's shuffled half of
# the global batch, which is what Shuffle BN is for.
images = torch.rand(6, 3, 32, 32)
key_encoder = {k: v.clone() for k, v in moco.encoder_k.state_dict().items()}
torch.manual_seed(103 + rank)             # different permutation draws: rank 0's must be used
keys = moco._keys(images[mine])
enqueue(moco.queue, moco.queue_ptr, gather_no_grad(keys))
torch.save({"loss": loss.detach(), "g1": z1.grad, "g2": z2.grad, "keys": keys, "images": images,
            "key_encoder": key_encoder, "queue": moco.queue.clone()}, Path(sys.argv[1]) / f"rank{rank}.pt")
dist.destroy_process_group()
