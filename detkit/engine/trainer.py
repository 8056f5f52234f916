"""The training loop: DDP, AMP, gradient accumulation, EMA, periodic evaluation, checkpoints.

An *iteration* is one optimizer step; with ``accumulate: K`` it consumes K loader batches, so
``accumulate: 2`` at batch B is the same schedule as batch 2B. An epoch is
``len(loader) // K`` iterations. ``self.iter`` counts finished iterations (resume starts there).

After an iteration: log; write ``last.pth`` when a checkpoint or an evaluation is due (before the
evaluation, so neither its failure nor a kill during it costs the training); evaluate; write
``best.pth`` / ``final.pth``. Training ends at ``max_iters``, at ``train.max_time`` or at an early
stop, each the same way (last.pth, final evaluation, final.pth); a SIGTERM saves and leaves.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import dump_config
from ..errors import DetkitError
from ..registry import ConfigError
from . import checkpoint as ckpt_io
from .dist import (
    all_gather_object,
    all_reduce_tensor,
    broadcast_buffers,
    broadcast_object,
    init_distributed,
)
from .ema import ModelEMA
from .eval_state import EvalTracker
from .evaluate import build_val, inference_on_loader
from .logging import TrainLogger, WindowMeter
from .optim import build_optimizer, build_scheduler
from .preemption import StopSignal, TrainingInterrupted, ignore_sigterm_in_workers
from .setup import dist_settings, epoch_batches, seed_everything, split_config, train_settings
from .summary import model_summary
from .trainer_state import TrainerState

__all__ = ["Trainer", "train", "EvaluationError"]


class EvaluationError(DetkitError, RuntimeError):
    """An evaluation failed after the iteration's checkpoint was written (the message says where)."""


class Trainer(TrainerState):
    """Builds everything from a resolved config; :meth:`train` runs to ``max_iters``.

    ``resume``: False (fresh start), True (latest readable checkpoint of ``work_dir``, falling
    back to older ones; fresh start when there is none) or a checkpoint path.

    A null (or absent) ``model.num_classes`` is taken from the data and a set one is checked
    against it, as ``tools/train.py`` does (:func:`detkit.data.classes.resolve_num_classes`), on a
    copy: ``cfg`` itself is not changed.
    """

    def __init__(self, cfg: dict, work_dir: str | Path, *, resume: bool | str | Path = False,
                 deterministic: bool = False):
        from ..data.classes import resolve_num_classes

        self.cfg = cfg = resolve_num_classes(copy.deepcopy(cfg))
        self.work_dir = Path(work_dir)
        self.dist = init_distributed(**dist_settings(cfg))
        self.device = self.dist.device
        s = self.settings = train_settings(cfg)
        s["deterministic"] = bool(s["deterministic"] or deterministic)
        seed_everything(s["seed"], self.dist.rank, s["deterministic"])
        if self.dist.is_main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.work_dir / "config.yaml")
            ckpt_io.remove_stale_temporaries(self.work_dir)
        epoch_unit = self._build_train_data()

        model = self.build_model(cfg["model"]).to(self.device)
        self.model = model = convert_sync_bn(model, s["sync_bn"], self.dist, log=self._log)
        frozen_ssl = ckpt_io.ssl_weights_in_frozen_bn(cfg["model"], model)
        if frozen_ssl:
            self._log(frozen_ssl)
        multiscale = getattr(model, "multiscale_train", None)
        if multiscale is not None:  # its batch sizes: seeded like the rest, resumable (rng state)
            multiscale.seed_for_rank(s["seed"], self.dist.rank)
        self.optimizer = build_optimizer(model, s["optimizer"])
        self.scheduler = build_scheduler(self.optimizer, s["scheduler"], max_iters=self.max_iters,
                                         iters_per_epoch=epoch_unit)
        amp = s["amp"]
        self.amp_dtype = torch.float16 if amp["dtype"] == "float16" else torch.bfloat16
        self.amp_enabled = bool(amp["enabled"])
        # float16 needs loss scaling against gradient underflow; bfloat16 has float32's range.
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_enabled and self.amp_dtype == torch.float16)
        self.iter, self.skipped_steps = 0, 0
        self.evals = EvalTracker(best_metric=s["checkpoint"]["best_metric"], early_stop=s["early_stop"])
        # why training ends before max_iters (max_time, early stop); an evaluation left to resume
        self._end_reason: str | None = None
        self._pending_eval = False
        self._started, self._out_of_time = time.monotonic(), False  # train.max_time
        # SIGTERM: the handler while train() runs, and whether some rank had it (agreed by all).
        self._stop_signal: StopSignal | None = None
        self._stop_agreed, self._saved_last_at = False, -1
        self._meter = WindowMeter()
        found = self._find_resume(resume) if resume else None
        if found is None and s["load_from"]:
            self._load_pretrained(s["load_from"])
        ema = s["ema"]
        self.ema = ModelEMA(model, decay=ema["decay"], tau=ema["tau"]) if ema["enabled"] else None
        if found is not None:
            self.load_state_dict(found[1], source=found[0])
            self._log(f"resumed from {found[0]} at iteration {self.iter}")
        self.ddp_model = model
        if self.dist.distributed:
            self.ddp_model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(s["find_unused_parameters"]))
        self.val = build_val(cfg, seed=s["seed"])
        for loader in (self.train_loader, self.val[1] if self.val is not None else None):
            ignore_sigterm_in_workers(loader)  # SIGTERM is the trainer's to handle (preemption.py)
        self.logger = TrainLogger(self.work_dir, enabled=self.dist.is_main,
                                  max_iters=self.max_iters, start_iter=self.iter)
        if self.dist.is_main:
            self.logger.info(self.summary())

    def summary(self) -> str:
        """One line: parameters, and GFLOPs of one training image (the train set's first sample)."""
        rng = ckpt_io.get_rng_state(self.model)  # reading a sample and a forward may draw numbers
        try:
            forward, size, what = self.summary_forward()
        except Exception:  # noqa: BLE001 - an unreadable first image is reported when training reads it
            forward, size, what = None, None, ""
        try:
            return model_summary(type(self.model).__name__, self.model, forward, size, what=what)
        finally:
            ckpt_io.set_rng_state(rng, self.model)

    def summary_forward(self) -> tuple[Callable[[], object], tuple[int, ...], str]:
        """(forward whose FLOPs the summary counts, its input size, what it covers)."""
        image = self.train_set[0][0].to(self.device)
        return (lambda: self.model([image])), tuple(image.shape), ""

    def build_model(self, cfg: dict) -> nn.Module:
        """The model from the ``model`` section (a subclass may build another kind, e.g. detkit.ssl)."""
        from ..models import build_model

        return build_model(cfg)

    def _build_train_data(self) -> int | None:
        """Train dataset/loader and the iteration counts; returns iterations per schedule epoch
        (None when ``max_iters`` makes every interval an iteration count)."""
        from ..data import build_dataloader, build_dataset

        s, data = self.settings, self.cfg.get("data") or {}
        if data.get("train") is None:
            raise ConfigError("data.train: missing (the training split)")
        split = split_config(data, "train")
        self.train_set = build_dataset(split, root=data.get("root"), path="data.train")
        self.train_loader = build_dataloader(split, self.train_set, train=True, seed=s["seed"])
        self.accumulate = int(s["accumulate"])
        self.iters_per_epoch = len(self.train_loader) // self.accumulate
        if self.iters_per_epoch < 1:
            raise ConfigError(f"data.train: {len(self.train_loader)} batches per process is fewer than "
                              f"train.accumulate={self.accumulate}; use more data or smaller batches")
        epoch_based = s["max_iters"] is None
        unit = self.iters_per_epoch if epoch_based else 1
        self.max_iters = int(s["max_epochs"]) * unit if epoch_based else int(s["max_iters"])
        self.eval_every = int(s["eval_interval"]) * unit
        self.ckpt_every = int(s["checkpoint"]["interval"]) * unit
        return unit if epoch_based else None

    # ---------------------------------------------------------------- one iteration
    def run_step(self, batches: list) -> dict[str, float]:
        """One optimizer step over K micro-batches: autocast -> sum(losses) -> scaled backward -> step."""
        self.ddp_model.train()
        losses_sum: dict[str, float] = {}
        ddp = self.ddp_model if isinstance(self.ddp_model, DistributedDataParallel) else None
        for k, (images, targets) in enumerate(batches):
            images = [im.to(self.device, non_blocking=True) for im in images]
            # DDP all-reduces gradients only on the last micro-batch of the accumulation.
            last = k == len(batches) - 1
            with (ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()):
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_enabled):
                    losses = self.ddp_model(images, targets)
                reduced = self._reduce_and_check(losses)
                # Keys without the loss_ prefix are detached scalars for the log (e.g. feature_std).
                total = sum(v for k, v in losses.items() if k.startswith("loss_"))
                self.scaler.scale(total / len(batches)).backward()
            for name, value in reduced.items():
                losses_sum[name] = losses_sum.get(name, 0.0) + value / len(batches)
        grad_norm, stepped = self._optimizer_step()
        self._last_lr = self.optimizer.param_groups[0]["lr"]  # the lr this step used
        self.scheduler.step()
        if stepped and self.ema is not None:
            self.ema.update(self.model)
        hook = getattr(self.model, "after_optimizer_step", None)
        if stepped and callable(hook):
            # Per-step updates that follow the weights (momentum encoders of detkit.ssl methods).
            hook(self.iter + 1, self.max_iters)
        losses_sum["loss"] = sum(v for k, v in losses_sum.items() if k.startswith("loss_"))
        return {**losses_sum, "grad_norm": grad_norm}

    def _optimizer_step(self) -> tuple[float, bool]:
        """Unscale, clip, step unless gradients are inf/NaN (then count a skipped step)."""
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = total_norm(grads)
        clip = self.settings["clip_grad"]
        finite = bool(torch.isfinite(norm))
        if clip is not None and finite:
            torch._foreach_mul_(grads, (float(clip["max_norm"]) / (norm + 1e-6)).clamp(max=1.0))
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the step itself when it found inf/NaN
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale  # the scale only shrinks after a skip
        else:
            stepped = finite
            if stepped:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += int(not stepped)
        return float(norm), stepped

    def _reduce_and_check(self, losses: dict) -> dict[str, float]:
        """Rank-averaged loss values; a non-finite term stops every rank at this iteration.

        The average is NaN/inf on every rank when any rank has a NaN/inf term, so all ranks
        raise together before ``backward`` (none is left waiting in a gradient all-reduce).
        """
        names = sorted(losses)
        # The SIGTERM and time-budget flags ride along as the last two elements: every rank
        # learns in this iteration whether any rank was signalled or out of time, without a
        # collective of their own.
        signalled = self._stop_signal is not None and self._stop_signal.requested is not None
        budget = self.settings["max_time"]
        out_of_time = budget is not None and time.monotonic() - self._started >= budget
        flags = torch.tensor([float(signalled), float(out_of_time)], device=self.device)
        stacked = torch.cat([torch.stack([losses[n].detach().float() for n in names]), flags])
        reduced = all_reduce_tensor(stacked, op="mean").cpu()
        self._stop_agreed |= bool(reduced[-2] > 0)
        self._out_of_time |= bool(reduced[-1] > 0)
        reduced = reduced[:-2]
        if not torch.isfinite(reduced).all():
            local_bad = [n for n in names if not torch.isfinite(losses[n]).all()]
            per_rank = all_gather_object(local_bad)
            bad = sorted({n for r in per_rank for n in r})
            where = ", ".join(f"rank {r}: {b}" for r, b in enumerate(per_rank) if b)
            raise FloatingPointError(
                f"non-finite loss at iteration {self.iter + 1} (epoch {self.iter // self.iters_per_epoch}): "
                f"{', '.join(f'{n}={reduced[names.index(n)].item()}' for n in bad)} ({where}). "
                f"Training stopped on every rank before the update; {self._saved_note()}. Lower the "
                f"lr, raise warmup, or set train.clip_grad.")
        return {n: float(v) for n, v in zip(names, reduced)}

    # ---------------------------------------------------------------- the loop
    def train(self, stop_after: int | None = None) -> dict | None:
        """Train to ``max_iters`` (or ``stop_after`` more iterations, then save and return).

        Returns the last evaluation results (None when there was no evaluation).
        """
        end = self.max_iters if stop_after is None else min(self.max_iters, self.iter + stop_after)
        self.last_eval: dict | None = None
        self._started, self._out_of_time = time.monotonic(), False
        if self._pending_eval:
            self.logger.info(f"evaluating iteration {self.iter} first: the run that saved it stopped "
                             f"before its evaluation")
            self._evaluate_and_save(final=self.iter >= self.max_iters)
            self._pending_eval = False
        if self.iter >= end:
            self.logger.info(f"nothing to train: already at iteration {self.iter} of {self.max_iters}")
            self.logger.close()
            return None
        self.logger.info(f"training iterations {self.iter + 1}..{end} of {self.max_iters} "
                         f"({self.iters_per_epoch} per epoch, {self.dist.world_size} process(es), "
                         f"device {self.device})")
        stop = self._stop_signal = StopSignal().install()
        self._stop_agreed = False
        try:
            while self.iter < end:
                epoch, done = divmod(self.iter, self.iters_per_epoch)
                batches = epoch_batches(self.train_loader, epoch, skip=done * self.accumulate)
                for _ in range(done, self.iters_per_epoch):
                    t0 = time.perf_counter()
                    chunk = [next(batches) for _ in range(self.accumulate)]
                    data_time = time.perf_counter() - t0
                    scalars = self.run_step(chunk)
                    self.iter += 1
                    if self._out_of_time and self._end_reason is None and self.iter < self.max_iters:
                        self._end_reason = (f"train.max_time ({self.settings['max_time']:.0f} s) "
                                            f"reached at iteration {self.iter} of {self.max_iters}")
                    images = sum(len(b[0]) for b in chunk) * self.dist.world_size
                    step_time = time.perf_counter() - t0
                    self._after_step(scalars, data_time, step_time, images, end)
                    if self._stop_agreed and self.iter < end and self._end_reason is None:
                        self._save_and_stop()
                    if self.iter >= end or self._end_reason is not None:
                        break
                del batches  # shuts the epoch's workers down before the next epoch starts them
                if self._end_reason is not None:
                    self.logger.info(f"{self._end_reason}: training ends here (last.pth, final.pth)")
                    break
        finally:
            stop.restore()
            self._stop_signal = None
            self.logger.close()
        return self.last_eval

    def _save_and_stop(self) -> None:
        """Some rank got SIGTERM: every rank saves ``last.pth`` at this iteration boundary and stops."""
        if self._saved_last_at != self.iter:
            self.save(last=True, eval_due=self._eval_due(final=False))
        self.logger.info(f"SIGTERM: saved last.pth at iteration {self.iter} of {self.max_iters}; "
                         f"stopping (continue with --resume)")
        raise TrainingInterrupted(self.iter)

    def _after_step(self, scalars: dict, data_time: float, step_time: float, images: int,
                    end: int) -> None:
        """Log, then checkpoint *before* evaluating (an evaluation that fails or outlasts a
        preemption never costs the training), evaluate, write best.pth / final.pth."""
        it = self.iter
        self._meter.add({**scalars, "time": step_time, "data_time": data_time,
                         "images_per_s": images / max(step_time, 1e-9)})
        self.logger.step()
        if it % int(self.settings["log_interval"]) == 0 or it == end:
            window = self._meter.pop()
            window.update(lr=self._last_lr, skipped_steps=self.skipped_steps)
            if self.device.type == "cuda":
                window["memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.logger.log_train(it, (it - 1) // self.iters_per_epoch, window)
        if self._stop_agreed and it < end and self._end_reason is None:
            return  # SIGTERM: train() saves now and stops; the evaluation runs on --resume
        final = it == self.max_iters or self._end_reason is not None
        eval_due = self._eval_due(final)
        if it % self.ckpt_every == 0 or it == end or final or eval_due:
            self.save(last=True, eval_due=eval_due)
        if eval_due:
            self._evaluate_and_save(final=final)
        elif final:
            self.save(last=False, final=True)

    def _eval_due(self, final: bool) -> bool:
        periodic = self.eval_every > 0 and self.iter % self.eval_every == 0
        return self.val is not None and (final or periodic)

    def _evaluate_and_save(self, *, final: bool) -> None:
        """Evaluate this iteration, then write best.pth if it improved and final.pth if ``final``;
        an early stop saves ``last.pth`` here too when no checkpoint was due."""
        improved, stop = self._evaluate(final=final)
        if stop is not None and not final:
            self._end_reason, final = stop, True
            if self._saved_last_at != self.iter:
                self.save(last=True)
        if improved or final:
            self.save(last=False, best=improved, final=final)

    def _evaluate(self, *, final: bool) -> tuple[bool, str | None]:
        """Evaluate the EMA (or plain) weights on every rank: (best metric improved, early-stop
        reason or None). A failure is re-raised naming the checkpoint that holds the training."""
        model = self.ema.module if self.ema is not None else self.model
        broadcast_buffers(model)  # every rank evaluates the model rank 0 saves
        _, loader, evaluator = self.val
        try:
            results = inference_on_loader(model, loader, evaluator, self.device, log=self.logger.info)
        except Exception as e:
            if final:  # final.pth as an uninterrupted run would have it (no new best)
                self.save(last=False, final=True)
            where = (f"{self.work_dir / 'last.pth'} (iteration {self._saved_last_at})"
                     + (f" and {self.work_dir / 'final.pth'}" if final else ""))
            note = (f"the evaluation at iteration {self.iter} failed; the training is saved in "
                    f"{where}: fix the cause, then tools/eval.py CONFIG CHECKPOINT, or --resume")
            if isinstance(e, DetkitError):
                raise EvaluationError(f"{e}; {note}") from e
            self.logger.info(f"error: {note}")
            raise
        self.last_eval = results
        self.logger.log_eval(self.iter, (self.iter - 1) // self.iters_per_epoch, results,
                             val_dataset=self.val[0])
        improved, stop = self.evals.update(self.iter, results, self.logger.info)
        improved, stop = broadcast_object((improved, stop))  # one decision for every rank
        if self.dist.is_main:
            self.evals.write(self.work_dir, self.iter)
        return improved, stop


def convert_sync_bn(model: nn.Module, enabled: bool, dist_info, log=print) -> nn.Module:
    """BatchNorm -> SyncBatchNorm when asked for, training with DDP, on GPUs (torch has no CPU kernel)."""
    if not enabled or not dist_info.distributed:
        return model
    if dist_info.device.type == "cpu":
        log("WARNING: train.sync_bn is ignored on CPU (SyncBatchNorm needs GPUs); BatchNorm "
            "statistics stay per process")
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients together (inf/NaN when any element is); float32 scalar."""
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def train(cfg: dict, work_dir: str | Path, resume: bool | str | Path = False,
          deterministic: bool = False, stop_after: int | None = None) -> dict | None:
    """Build a :class:`Trainer` from a resolved config and train; returns the last evaluation.

    ``stop_after``: leave after this many iterations of this call (saving ``last.pth``), e.g. to
    fit a time-limited job; ``resume=True`` continues exactly where it stopped.

    A null (or absent) ``model.num_classes`` is taken from the data (see :class:`Trainer`).
    """
    return Trainer(cfg, work_dir, resume=resume, deterministic=deterministic).train(stop_after)
