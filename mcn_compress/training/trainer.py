"""Fine-tuning loop with the MCN loss (docs/design.md section 3): one process or many (torchrun).

`Trainer(recipe).fit()` trains for ``optim.epochs`` epochs of train + eval (top-1/top-5),
writes ``metrics.jsonl``/``metrics.csv`` and checkpoints (``last.pt`` every epoch, ``best.pt``
on a new best top-1; docs/design.md section 4 format, written atomically) to ``output.dir``
(`training.run_dir`).

Determinism and resume: the data order of epoch ``e`` depends only on ``runtime.seed + e``,
the learning rate only on the global step, and a stop request (Ctrl-C / SIGTERM, or
`Trainer.request_stop`) is honoured between steps: the checkpoint then records the step and
the RNG state, so ``resume`` continues exactly where the run stopped (bit-identical results
to an uninterrupted run with ``data.workers: 0`` on the same machine).

Distributed: under torchrun (``WORLD_SIZE > 1``) the model is wrapped in
DistributedDataParallel (NCCL on GPUs, gloo on CPU), each rank reads its shard through a
`DistributedSampler`, metrics are all-reduced, the centre update sees the features of every
rank (so centres stay identical) and only rank 0 writes files or reports progress.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mcn_compress.errors import ConfigError, TrainingDiverged
from mcn_compress.evaluate import topk_correct
from mcn_compress.formats.atomic import atomic_write
from mcn_compress.formats.checkpoint import load_model_state
from mcn_compress.passes.distill import kl_to_teacher
from mcn_compress.training.compile import compiled
from mcn_compress.training.distributed import (
    any_rank,
    autocast,
    resolve_device,
    rng_state,
    set_rng_state,
    setup_distributed,
    to_device,
    wrap_ddp,
)
from mcn_compress.training.loaders import build_loader
from mcn_compress.training.loss import MCNLoss
from mcn_compress.training.optim import build_optimizer, lr_factor
from mcn_compress.training.recipe import Recipe, dump_recipe, recipe_to_dict
from mcn_compress.training.run_dir import (
    BEST,
    LAST,
    RUN_RECIPE,
    TRAIN_LOSS_KEYS,
    EpochMetrics,
    claim_run_dir,
    last_good,
    read_resume_checkpoint,
    recipe_changes,
    run_checkpoint,
    write_metrics,
)
from mcn_compress.training.student import build_teacher, prepare_student

_logger = logging.getLogger(__name__)


DIVERGED_HINT = "lower optim.lr or loss.theta, or turn runtime.amp off"


class TrainCallbacks(Protocol):
    """Progress hooks (the CLI draws bars with them); all are called on rank 0 only."""

    def on_epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None: ...

    def on_step(self, values: dict[str, float]) -> None: ...

    def on_eval_start(self, steps: int) -> None: ...

    def on_eval_step(self) -> None: ...

    def on_epoch_end(self, metrics: EpochMetrics, best: bool) -> None: ...


@contextlib.contextmanager
def _stop_signals(handler: Callable[[], None]) -> Iterator[None]:
    """Route SIGINT/SIGTERM to ``handler`` while training (main thread only)."""
    try:
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, lambda *_: handler())
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass
class _Accumulator:
    """Sums over the steps of an epoch so far (saved with mid-epoch checkpoints)."""

    loss: float = 0.0
    softmax: float = 0.0
    filter: float = 0.0
    center: float = 0.0
    distill: float = 0.0
    correct: float = 0.0
    samples: float = 0.0
    steps: int = 0
    seconds: float = 0.0

    def add(self, values: dict[str, float], correct: int, samples: int) -> None:
        """Add one step's loss parts, top-1 hits and batch size."""
        for name in TRAIN_LOSS_KEYS:
            setattr(self, name, getattr(self, name) + values[name])
        self.correct += correct
        self.samples += samples
        self.steps += 1

    def epoch_metrics(
        self,
        epoch: int,
        val: tuple[float, float, float],
        lr: float,
        device: torch.device,
        all_ranks: bool,
    ) -> EpochMetrics:
        """The epoch's `EpochMetrics`; with ``all_ranks`` the sums of every rank (all-reduced
        on ``device``). ``val`` is ``(val_loss, val_top1, val_top5)``."""
        names = [*TRAIN_LOSS_KEYS, "correct", "samples", "steps"]
        sums = torch.tensor([getattr(self, n) for n in names], dtype=torch.float64, device=device)
        if all_ranks:
            dist.all_reduce(sums)
        totals = dict(zip(names, sums.tolist(), strict=True))
        steps = max(totals["steps"], 1.0)
        return EpochMetrics(
            epoch=epoch,
            **{name: totals[name] / steps for name in TRAIN_LOSS_KEYS},
            train_top1=100.0 * totals["correct"] / max(totals["samples"], 1.0),
            val_loss=val[0],
            val_top1=val[1],
            val_top5=val[2],
            lr=lr,
            images_per_sec=totals["samples"] / max(self.seconds, 1e-9),
            seconds=self.seconds,
        )


def _check_same_recipe(state: dict[str, Any], recipe: Recipe, path: Path, run_dir: Path) -> None:
    """Refuse to resume the run of ``state`` (a checkpoint's ``train_state``) with ``recipe``
    when they differ in more than `run_dir.RESUMABLE_CHANGES`, compared as the user wrote them
    (`run_dir.recipe_changes`)."""
    saved, written = state.get("recipe"), state.get("recipe_as_written")
    if not saved:
        return
    changes = recipe_changes(
        saved,
        recipe_to_dict(recipe),
        written if isinstance(written, dict) else None,
        recipe_to_dict(recipe, as_written=True),
    )
    if changes:
        raise ConfigError(
            f"cannot resume {path}: the recipe differs from the run's ({'; '.join(changes)}); "
            f"resume with the run's settings ({run_dir / RUN_RECIPE}) or start anew "
            "with --overwrite"
        )


@dataclass
class TrainResult:
    """What `Trainer.fit` produced."""

    run_dir: Path
    history: list[EpochMetrics] = field(default_factory=list)
    best_top1: float = 0.0
    stopped: bool = False


class Trainer:
    """Fine-tunes the recipe's model with the MCN loss; see the module docstring.

    Args:
        recipe: the validated recipe.
        callbacks: progress hooks (rank 0 only).
        resume: continue from ``output.dir/last.pt`` (True) or from the given checkpoint.
        model: use this model instead of building one from ``recipe.model`` (float models
            train with the plain cross-entropy since they have no MCConv2d).
        overwrite: replace a run already in ``output.dir`` (without it that is refused).
    The run folder is locked for the trainer's life (`training.lock`); call `close` at the end.
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        callbacks: TrainCallbacks | None = None,
        resume: bool | str | Path = False,
        model: nn.Module | None = None,
        overwrite: bool = False,
    ) -> None:
        self.recipe = recipe
        self.callbacks = callbacks
        runtime = recipe.runtime
        self.dist = setup_distributed(resolve_device(runtime.device).type)
        self.device = resolve_device(runtime.device, self.dist.local_rank)
        if runtime.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("runtime.amp fp16 needs CUDA; use bf16 or off on the CPU")
        self.run_dir = Path(recipe.output.dir)
        self._lock = None
        if self.dist.is_main:
            start = recipe.model.checkpoint
            self._lock = claim_run_dir(
                self.run_dir, resume=bool(resume), overwrite=overwrite, start=start
            )
        try:
            self._set_up(model, resume)
        except BaseException:
            self.close()
            raise

    def _set_up(self, model: nn.Module | None, resume: bool | str | Path) -> None:
        recipe, runtime = self.recipe, self.recipe.runtime
        torch.manual_seed(runtime.seed)
        student = prepare_student(recipe, model, self.device, recalibrate=not resume)
        self.model, self.num_classes, self.train_set, self.val_set = student
        loss = recipe.loss
        self.criterion = MCNLoss.from_recipe(self.model, self.num_classes, loss).to(self.device)
        self.teacher = build_teacher(recipe, self.model).to(self.device) if loss.distill else None
        self.optimizer = build_optimizer(self.model, recipe)
        self.scaler = torch.amp.GradScaler("cuda", enabled=runtime.amp == "fp16")
        options = {"seed": runtime.seed, "dist": self.dist, "pin": self.device.type == "cuda"}
        self.train_loader, self.train_sampler = build_loader(
            self.train_set, recipe.data, train=True, **options
        )
        self.val_loader, _ = build_loader(self.val_set, recipe.data, train=False, **options)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = self.steps_per_epoch * recipe.optim.epochs
        self.warmup_steps = self.steps_per_epoch * recipe.optim.warmup_epochs
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.ddp = wrap_ddp(compiled(self.model, self.criterion, runtime), self.dist, self.device)
        self.epoch = self.step_in_epoch = 0
        self.acc = _Accumulator()
        self.history: list[EpochMetrics] = []
        self.best_top1 = -1.0
        self._stop = False
        self._resume_rng: dict[str, Any] | None = None
        self._parent: str | None = recipe.model.checkpoint
        if resume:
            self._load_state(self.run_dir / LAST if resume is True else Path(resume))

    def request_stop(self) -> None:
        """Ask the loop to save a resumable checkpoint after the current step and stop."""
        self._stop = True

    # --- one step ------------------------------------------------------------------------
    def _train_step(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        global_step = self.epoch * self.steps_per_epoch + self.step_in_epoch
        factor = lr_factor(global_step, self.total_steps, self.warmup_steps, self.recipe)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        images, targets = to_device(images, targets, self.device, self.recipe.runtime)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.recipe.runtime.amp):
            logits = self.ddp(images)
        parts = self.criterion(logits, targets)
        distill = logits.new_zeros(())
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            loss = self.recipe.loss
            distill = loss.distill * kl_to_teacher(logits, teacher_logits, loss.temperature)
        total = parts.total + distill
        terms = {"loss": total, **parts._asdict(), "distill": distill}
        values = {name: float(terms[name].detach()) for name in TRAIN_LOSS_KEYS}
        if not math.isfinite(values["loss"]):
            where = f"epoch {self.epoch + 1}, step {self.step_in_epoch + 1}"
            where += f"; {last_good(self.run_dir)}"
            raise TrainingDiverged(f"loss became {values['loss']} at {where}: {DIVERGED_HINT}")
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        correct = topk_correct(logits.detach(), targets, (1,))[0]
        self.acc.add(values, correct, targets.shape[0])
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        values["top1"] = 100.0 * self.acc.correct / max(self.acc.samples, 1)
        return values

    # --- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> tuple[float, float, float]:
        """Validation ``(loss, top1, top5)`` in percent, reduced over ranks."""
        self.model.eval()
        self.criterion.eval()
        if self.callbacks and self.dist.is_main:
            self.callbacks.on_eval_start(len(self.val_loader))
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        for images, targets in self.val_loader:
            images, targets = to_device(images, targets, self.device, self.recipe.runtime)
            with autocast(self.device, self.recipe.runtime.amp):
                logits = self.model(images)
            self.criterion.pop_features()  # captured by the hook; evaluation does not use them
            loss = F.cross_entropy(logits.float(), targets, reduction="sum")
            top1, top5 = topk_correct(logits.float(), targets, (1, 5))
            sums += torch.tensor(
                [float(loss), top1, top5, targets.shape[0]], dtype=torch.float64, device=self.device
            )
            if self.callbacks and self.dist.is_main:
                self.callbacks.on_eval_step()
        if self.dist.enabled:
            dist.all_reduce(sums)
        count = max(float(sums[3]), 1.0)
        return float(sums[0]) / count, 100 * float(sums[1]) / count, 100 * float(sums[2]) / count

    # --- state ---------------------------------------------------------------------------
    def _save(self, names: tuple[str, ...], metrics: dict[str, Any]) -> None:
        """Write one checkpoint (built and hashed once) to each of ``names``."""
        if not self.dist.is_main:
            return
        state = {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "criterion": self.criterion.state_dict(),
            "rng": rng_state(self.device),
            "accumulator": asdict(self.acc),
            "history": [asdict(m) for m in self.history],
            "best_top1": self.best_top1,
            "recipe": recipe_to_dict(self.recipe),
            "recipe_as_written": recipe_to_dict(self.recipe, as_written=True),
        }
        payload = run_checkpoint(self.model, state, parent=self._parent, metrics=metrics)
        for name in names:
            atomic_write(self.run_dir / name, lambda tmp: torch.save(payload, tmp))

    def _load_state(self, path: Path) -> None:
        data = read_resume_checkpoint(path)
        state = data["train_state"]
        _check_same_recipe(state, self.recipe, path, self.run_dir)
        load_model_state(self.model, data, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.criterion.load_state_dict(state["criterion"])
        self.criterion.to(self.device)
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.acc = _Accumulator(**state["accumulator"])
        self.history = [EpochMetrics(**m) for m in state["history"]]
        self.best_top1 = float(state["best_top1"])
        self._resume_rng = state["rng"]
        _logger.info(
            "resuming from %s at epoch %d step %d", path, self.epoch + 1, self.step_in_epoch
        )

    # --- the loop ------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train the remaining epochs; returns the history. Stops cleanly on Ctrl-C."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_recipe(self.recipe, self.run_dir / RUN_RECIPE)
        with _stop_signals(self.request_stop):
            while self.epoch < self.recipe.optim.epochs:
                if self._run_epoch():
                    return TrainResult(self.run_dir, self.history, self.best_top1, stopped=True)
        return TrainResult(self.run_dir, self.history, self.best_top1)

    def _run_epoch(self) -> bool:
        """One epoch (or its rest after a resume); True when a stop request ended it."""
        main = self.dist.is_main and self.callbacks is not None
        if self.train_sampler is not None:
            self.train_sampler.set_epoch(self.epoch)
        if self.step_in_epoch == 0:
            torch.manual_seed(self.recipe.runtime.seed * 1000 + self.epoch)
        batches = iter(self.train_loader)
        for _ in range(self.step_in_epoch):  # mid-epoch resume: skip the batches already done
            next(batches)
        if self._resume_rng is not None:  # restored after skipping: skipped loads do not shift it
            set_rng_state(self._resume_rng, self.device)
            self._resume_rng = None
        if main:
            self.callbacks.on_epoch_start(  # type: ignore[union-attr]
                self.epoch, self.recipe.optim.epochs, self.steps_per_epoch, self.step_in_epoch
            )
        self.model.train()
        self.criterion.train()
        start = time.perf_counter()
        for images, targets in batches:
            values = self._train_step(images, targets)
            self.step_in_epoch += 1
            if main:
                self.callbacks.on_step(values)  # type: ignore[union-attr]
            if any_rank(self._stop, self.device, self.dist.enabled):
                self.acc.seconds += time.perf_counter() - start
                self._save((LAST,), {"interrupted": True})
                _logger.warning("stopped at epoch %d step %d", self.epoch + 1, self.step_in_epoch)
                return True
        self.acc.seconds += time.perf_counter() - start
        val = self.evaluate()
        lr = self.optimizer.param_groups[0]["lr"]
        metrics = self.acc.epoch_metrics(self.epoch + 1, val, lr, self.device, self.dist.enabled)
        self.history.append(metrics)
        best = val[1] > self.best_top1
        self.best_top1 = max(self.best_top1, val[1])
        self.epoch += 1
        self.step_in_epoch = 0
        self.acc = _Accumulator()
        summary = {"epoch": metrics.epoch, "val_top1": val[1], "val_top5": val[2]}
        self._save((LAST, BEST) if best else (LAST,), summary)
        if self.dist.is_main:
            write_metrics(self.run_dir, self.history)
        if main:
            self.callbacks.on_epoch_end(metrics, best)  # type: ignore[union-attr]
        return False

    def close(self) -> None:
        """Release the run folder and leave the process group (call once at the end)."""
        if self._lock is not None:
            self._lock.release()
        if hasattr(self, "criterion"):
            self.criterion.remove_hook()
        if self.dist.enabled and dist.is_initialized():
            dist.barrier()  # no rank tears the group down while another still talks to it
            dist.destroy_process_group()
