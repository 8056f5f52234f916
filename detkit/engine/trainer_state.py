"""The checkpoint side of :class:`~detkit.engine.trainer.Trainer`: what a checkpoint holds, how it
is written (rank 0, after a collective RNG gather) and how a run continues from one (``--resume``,
``train.load_from``, the evaluation state of :mod:`.eval_state`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import dump_config
from . import checkpoint as ckpt_io
from .architecture import describe_checkpoint
from .dist import all_gather_object, barrier, broadcast_object
from .ema import ModelEMA
from .eval_state import EvalTracker
from .setup import seed_everything

__all__ = ["TrainerState"]


class TrainerState:
    """Base of the Trainer: ``state_dict`` / ``save`` / ``load_state_dict`` and resume lookup."""

    # set by Trainer.__init__
    cfg: dict
    work_dir: Path
    settings: dict
    dist: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    ema: ModelEMA | None
    evals: EvalTracker
    train_set: Any
    iter: int
    iters_per_epoch: int
    accumulate: int
    ckpt_every: int
    skipped_steps: int
    _saved_last_at: int
    _pending_eval: bool

    def _log(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, flush=True)

    @property
    def best(self) -> dict | None:
        """{metric, value, iter} of the best evaluation so far (None before one)."""
        return self.evals.best

    def _saved_note(self) -> str:
        """Which checkpoint a stopped run can be continued from, for the error message."""
        last = self.work_dir / "last.pth"
        saved = ckpt_io.saved_iteration(last)
        if saved is None:
            return (f"no checkpoint has been written yet (the first is due at iteration "
                    f"{self.ckpt_every}), so there is nothing to resume from")
        return f"{last} (iteration {saved}) holds the last finite weights; --resume continues from it"

    def state_dict(self) -> dict:
        """Everything needed to continue exactly; tensors and primitives only (weights_only)."""
        done = self.iter % self.iters_per_epoch
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "iter": self.iter,
            "epoch": self.iter // self.iters_per_epoch,
            "sampler": {"epoch": self.iter // self.iters_per_epoch,
                        "batches_consumed": done * self.accumulate,
                        "iters_per_epoch": self.iters_per_epoch},
            "rng": all_gather_object(ckpt_io.get_rng_state(self.model)),
            "best": self.best,
            "early_stop": self.evals.watch,
            "skipped_steps": self.skipped_steps,
            "world_size": self.dist.world_size,
            "meta": {"detkit_version": __version__,
                     "class_names": list(getattr(self.train_set, "class_names", []) or []),
                     "label_to_cat_id": list(getattr(self.train_set, "label_to_cat_id", []) or [])},
            "config": dump_config(self.cfg),
        }

    def save(self, *, last: bool = True, best: bool = False, final: bool = False,
             eval_due: bool = False) -> None:
        """On rank 0: ``last.pth`` (the whole training state; the previous one becomes
        ``iter_N.pth`` while ``keep`` allows), ``best.pth``, ``final.pth``. best/final are
        inference checkpoints (weights, config, class names); final.pth is a hard link to
        best.pth when both are written at once. ``eval_due``: this iteration's evaluation comes
        after the save (a resume runs it when the run stopped before it finished)."""
        for name, p in self.model.named_parameters():
            if not torch.isfinite(p).all():  # never let a checkpoint carry NaN weights
                raise FloatingPointError(f"parameter {name} is not finite at iteration {self.iter}; "
                                         f"not saving a checkpoint")
        state = self.state_dict()  # collective (RNG gather): every rank takes part
        state["eval_due"] = bool(eval_due)
        if self.dist.is_main:
            if last:
                ckpt_io.save_last_checkpoint(state, self.work_dir,
                                             int(self.settings["checkpoint"]["keep"]))
            lean = [self.work_dir / "best.pth"] if best else [self.work_dir / "final.pth"] if final else []
            if lean:
                fp16 = bool(self.settings["checkpoint"]["fp16_inference"])
                ckpt_io.save_checkpoint(ckpt_io.inference_checkpoint(state, fp16=fp16), lean)
            if best and final:
                ckpt_io.link_or_copy(self.work_dir / "best.pth", self.work_dir / "final.pth")
        if last:
            self._saved_last_at = self.iter
        barrier()

    def _load_pretrained(self, path: str) -> None:
        ckpt = ckpt_io.load_checkpoint(path)
        ckpt_io.load_model_weights(self.model, ckpt_io.inference_state_dict(ckpt), source=str(path),
                                   allow_mismatch=True, log=self._log,
                                   architecture=describe_checkpoint(ckpt))

    def _load_eval_state(self, ckpt: dict, source: str) -> None:
        """Best metric and early-stop state: from eval_state.json when the evaluation after this
        checkpoint finished, else the checkpoint's (and that evaluation is run first)."""
        self.evals.load_state_dict({"best": ckpt.get("best"), "watch": ckpt.get("early_stop")})
        own = Path(source).resolve().parent == self.work_dir.resolve()
        saved = EvalTracker.read(self.work_dir) if own and self.dist.is_main else None
        saved = broadcast_object(saved)
        if saved is not None and saved["iter"] == self.iter:
            self.evals.load_state_dict(saved)
        elif ckpt.get("eval_due") and self.val_configured():
            self._pending_eval = True

    def val_configured(self) -> bool:
        return (self.cfg.get("data") or {}).get("val") is not None and self.cfg.get("evaluation") is not None

    def _find_resume(self, resume: bool | str | Path) -> tuple[str, dict] | None:
        explicit = None if isinstance(resume, bool) else resume
        # Rank 0 chooses (and reports fallbacks once); the others load the file it chose.
        found = None
        if self.dist.is_main:
            try:
                found = ckpt_io.load_resume_checkpoint(self.work_dir, explicit, log=self._log)
            except ckpt_io.CheckpointError as e:
                broadcast_object(f"error: {e}")
                raise
        path = broadcast_object(str(found[0]) if found else None)
        if path is not None and path.startswith("error: "):
            raise ckpt_io.CheckpointError(f"rank 0 could not resume: {path[7:]}")
        if path is None:
            self._log(f"--resume: no checkpoint in {self.work_dir}; starting from scratch")
            return None
        return path, (found[1] if found else ckpt_io.load_checkpoint(path))

    def load_state_dict(self, ckpt: dict, source: str = "checkpoint") -> None:
        ckpt_io.load_model_weights(self.model, ckpt["model"], source=source,
                                   architecture=describe_checkpoint(ckpt))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if ckpt.get("ema"):
                self.ema.load_state_dict(ckpt["ema"], ckpt.get("ema_updates", 0))
            else:
                self.ema = ModelEMA(self.model, decay=self.ema.decay, tau=self.ema.tau)
        self.iter = int(ckpt["iter"])
        self.skipped_steps = int(ckpt.get("skipped_steps", 0))
        self._load_eval_state(ckpt, source)
        sampler = ckpt.get("sampler") or {}
        if sampler.get("iters_per_epoch", self.iters_per_epoch) != self.iters_per_epoch:
            self._log(f"WARNING: {source} was saved with {sampler['iters_per_epoch']} iterations per "
                      f"epoch, now {self.iters_per_epoch} (batch size or process count changed): "
                      f"the data order after resuming differs from an uninterrupted run")
        rng = ckpt.get("rng") or []
        if len(rng) == self.dist.world_size:
            ckpt_io.set_rng_state(rng[self.dist.rank], self.model)
        else:
            self._log(f"WARNING: {source} has RNG states of {len(rng)} processes, now "
                      f"{self.dist.world_size}: reseeding instead of restoring them")
            seed_everything(self.settings["seed"] + 1000 * self.iter, self.dist.rank, False)
