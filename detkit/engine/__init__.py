"""Training engine: ``train(cfg, work_dir, resume=...)`` and its parts.

* :mod:`.trainer`    the loop (DDP, AMP, accumulation, EMA, evaluation, checkpoint policy)
* :mod:`.checkpoint` atomic save, safe load, resume fallback, weight loading with shape reports
* :mod:`.dist`       torchrun environment -> process group (NCCL on CUDA, gloo on CPU), restart-safe
* :mod:`.preemption` SIGTERM -> save ``last.pth`` at the next iteration boundary -> exit 143
* :mod:`.optim`      SGD/AdamW with norm/bias weight-decay exclusion, warmup + multistep/cosine/poly
* :mod:`.ema`        exponential moving average of the weights
* :mod:`.logging`    metrics.jsonl, TensorBoard, tqdm
"""

from .checkpoint import CheckpointError, inference_state_dict, load_checkpoint, load_model_weights
from .evaluate import evaluate_checkpoint, inference_on_loader
from .trainer import Trainer, train

__all__ = ["train", "Trainer", "CheckpointError", "load_checkpoint", "load_model_weights",
           "inference_state_dict", "evaluate_checkpoint", "inference_on_loader"]
