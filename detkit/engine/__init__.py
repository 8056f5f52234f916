"""Training engine: ``train(cfg, work_dir, resume=...)`` and its parts.

* :mod:`.trainer`    the loop (DDP, AMP, accumulation, EMA, evaluation, early stop, time budget)
* :mod:`.trainer_state` what a checkpoint holds, saving (before each evaluation), resuming
* :mod:`.eval_state` best metric and early-stop patience across evaluations and resumes
* :mod:`.summary`    parameters and GFLOPs at the training size (the first log line)
* :mod:`.checkpoint` atomic save, safe load, resume fallback, weight loading with shape reports
* :mod:`.dist`       torchrun environment -> process group (NCCL on CUDA, gloo on CPU), restart-safe
* :mod:`.preemption` SIGTERM -> save ``last.pth`` at the next iteration boundary -> exit 143
* :mod:`.optim`      SGD/AdamW/LARS with norm/bias weight-decay exclusion, warmup + multistep/cosine/poly,
                     a cosine weight-decay schedule (``weight_decay_end``)
* :mod:`.ema`        exponential moving average of the weights
* :mod:`.logging`    metrics.jsonl, TensorBoard, tqdm
"""

from .checkpoint import CheckpointError, inference_state_dict, load_checkpoint, load_model_weights
from .evaluate import evaluate_checkpoint, inference_on_loader
from .trainer import EvaluationError, Trainer, train

__all__ = ["train", "Trainer", "EvaluationError", "CheckpointError", "load_checkpoint", "load_model_weights",
           "inference_state_dict", "evaluate_checkpoint", "inference_on_loader"]
