"""Fine-tuning loop with the MCN loss (DESIGN.md section 3): one process or many (torchrun).

`Trainer(recipe).fit()` trains for ``optim.epochs`` epochs of train + eval (top-1/top-5),
writes ``metrics.jsonl``/``metrics.csv`` and checkpoints (``last.pt`` every epoch, ``best.pt``
on a new best top-1; DESIGN.md section 4 format, written atomically) to ``output.dir``.

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
import csv
import io
import json
import logging
import math
import os
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
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mcn_compress.checkpoint import atomic_write, checkpoint_dict, read_checkpoint
from mcn_compress.errors import CheckpointError, ConfigError, MCNError
from mcn_compress.loss import MCNLoss
from mcn_compress.recipe import Recipe, build_param_groups, dump_recipe, recipe_to_dict

_logger = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
FLOAT_FORMAT = "mcn-compress.float-run"
CALIBRATION_BATCHES = 20  # BN recalibration after on-the-fly conversion (issue: BN drift)


class TrainingDiverged(MCNError):
    """The loss became NaN or infinite."""


# ------------------------------------------------------------------------------------------
# small pieces
# ------------------------------------------------------------------------------------------
@dataclass
class EpochMetrics:
    """One row of ``metrics.jsonl``: training loss and its parts, validation accuracy, speed."""

    epoch: int
    loss: float
    softmax: float
    filter: float
    center: float
    distill: float
    train_top1: float
    val_loss: float
    val_top1: float
    val_top5: float
    lr: float
    images_per_sec: float
    seconds: float


class TrainCallbacks(Protocol):
    """Progress hooks (the CLI draws bars with them); all are called on rank 0 only."""

    def on_epoch_start(self, epoch: int, epochs: int, steps: int, done: int) -> None: ...

    def on_step(self, values: dict[str, float]) -> None: ...

    def on_eval_start(self, steps: int) -> None: ...

    def on_eval_step(self) -> None: ...

    def on_epoch_end(self, metrics: EpochMetrics, best: bool) -> None: ...


@dataclass
class DistInfo:
    """Rank layout of this process (world size 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_kind: str) -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (NCCL on CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=world,
    )
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return info


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is a `ConfigError`."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("runtime.device is cuda but no CUDA device is visible; use auto or cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def lr_factor(step: int, total_steps: int, warmup_steps: int, recipe: Recipe) -> float:
    """Multiplier of every group's base lr at ``step``: linear warmup, then cosine or step."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    optim = recipe.optim
    if optim.schedule == "cosine":
        span = max(total_steps - warmup_steps, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    steps_per_epoch = max(total_steps // optim.epochs, 1)
    epoch = step // steps_per_epoch
    return optim.gamma ** sum(1 for m in optim.milestones if epoch >= m)


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...]) -> list[int]:
    """How many samples have their target among the top-k logits, for each k."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top.eq(targets[:, None])
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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


class _EpochSampler(Sampler[int]):
    """Shuffled order that depends only on ``seed + epoch`` (single process)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=gen).tolist())


# ------------------------------------------------------------------------------------------
# model set-up
# ------------------------------------------------------------------------------------------
def build_student(recipe: Recipe, num_classes: int | None) -> nn.Module:
    """The model to fine-tune: a converted checkpoint, or a float model converted now."""
    from mcn_compress.checkpoint import load
    from mcn_compress.convert import convert
    from mcn_compress.models import load_float_model

    spec = recipe.model
    if spec.checkpoint is not None:
        return load(spec.checkpoint)
    assert spec.name is not None and spec.convert is not None
    float_model = load_float_model(
        spec.name,
        pretrained=spec.pretrained,
        weights=spec.weights,
        num_classes=spec.num_classes or num_classes,
        in_chans=spec.in_chans,
    )
    return convert(float_model.eval(), spec.convert)


def build_teacher(recipe: Recipe, student: nn.Module) -> nn.Module:
    """The float model for distillation: ``original`` rebuilds the student's float source."""
    from mcn_compress.checkpoint import load
    from mcn_compress.models import load_float_model

    teacher = recipe.model.teacher
    assert teacher is not None
    source = getattr(student, "mcn_source", None)
    if teacher == "original":
        if source is None or source.weights is None:
            raise ConfigError(
                "model.teacher 'original' needs the float weights the MCN came from; the "
                "checkpoint records none (converted with --no-pretrained?): name a weights file"
            )
        weights = None if source.weights == "pretrained" else source.weights
        model = load_float_model(
            source.display_name, pretrained=weights is None, weights=weights, **source.kwargs
        )
    elif Path(teacher).is_file():
        try:
            model = load(teacher)
        except CheckpointError:
            if source is None:
                raise
            model = load_float_model(source.display_name, weights=teacher, **source.kwargs)
    else:
        model = load_float_model(teacher, pretrained=True)
    model.eval().requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------
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

    def mean(self, name: str) -> float:
        return getattr(self, name) / max(self.steps, 1)


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
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        callbacks: TrainCallbacks | None = None,
        resume: bool | str | Path = False,
        model: nn.Module | None = None,
    ) -> None:
        from mcn_compress.data import build_datasets, default_num_classes, model_num_classes

        self.recipe = recipe
        self.callbacks = callbacks
        runtime = recipe.runtime
        kind = resolve_device(runtime.device).type
        self.dist = setup_distributed(kind)
        self.device = resolve_device(runtime.device, self.dist.local_rank)
        if runtime.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("runtime.amp fp16 needs CUDA; use bf16 or off on the CPU")
        self.run_dir = Path(recipe.output.dir)
        torch.manual_seed(runtime.seed)
        num_classes = recipe.model.num_classes or default_num_classes(recipe.data)
        self.model = model if model is not None else build_student(recipe, num_classes)
        self.num_classes = model_num_classes(self.model) or num_classes
        if self.num_classes is None:
            raise ConfigError("cannot tell the number of classes: set model.num_classes")
        self.train_set, self.val_set = build_datasets(recipe.data, self.model, seed=runtime.seed)
        self._check_labels()
        self.model.to(self.device)
        if model is None and recipe.model.name is not None and not resume:
            self._recalibrate()
        if runtime.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.criterion = MCNLoss(
            self.model,
            self.num_classes,
            theta=recipe.loss.theta,
            lambda_center=recipe.loss.lambda_center,
            alpha=recipe.loss.alpha,
        ).to(self.device)
        self.teacher = (
            build_teacher(recipe, self.model).to(self.device) if (recipe.loss.distill > 0) else None
        )
        self.optimizer = self._build_optimizer()
        self.scaler = torch.amp.GradScaler("cuda", enabled=runtime.amp == "fp16")
        self.train_loader, self.train_sampler = self._loader(self.train_set, train=True)
        self.val_loader, _ = self._loader(self.val_set, train=False)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = self.steps_per_epoch * recipe.optim.epochs
        self.warmup_steps = self.steps_per_epoch * recipe.optim.warmup_epochs
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.ddp: nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.epoch = 0
        self.step_in_epoch = 0
        self.acc = _Accumulator()
        self.history: list[EpochMetrics] = []
        self.best_top1 = -1.0
        self._stop = False
        self._parent: str | None = recipe.model.checkpoint
        if resume:
            path = self.run_dir / LAST if resume is True else Path(resume)
            self._load_state(path)

    # --- set-up helpers ------------------------------------------------------------------
    def _recalibrate(self) -> None:
        """Re-estimate BN statistics of a freshly converted model on training images."""
        from mcn_compress.calibrate import recalibrate_batchnorm

        loader = DataLoader(self.train_set, batch_size=self.recipe.data.batch_size, shuffle=False)
        gen_state = torch.get_rng_state()
        seen = recalibrate_batchnorm(
            self.model,
            ((x.to(self.device), y) for x, y in loader),
            max_batches=CALIBRATION_BATCHES,
        )
        torch.set_rng_state(gen_state)
        _logger.info("recalibrated BatchNorm on %d training images after conversion", seen)

    def _check_labels(self) -> None:
        from mcn_compress.data import dataset_classes
        from mcn_compress.errors import DataError

        classes = dataset_classes(self.train_set)
        if classes and len(classes) > self.num_classes:
            raise DataError(
                f"the dataset has {len(classes)} classes but the model predicts "
                f"{self.num_classes}: set model.num_classes (float models) or use a checkpoint "
                "converted with a matching --num-classes"
            )

    def _build_optimizer(self) -> torch.optim.Optimizer:
        optim = self.recipe.optim
        groups = build_param_groups(self.model, self.recipe)
        if optim.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=True)
        return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.momentum, 0.999))

    def _loader(self, dataset: Dataset[Any], train: bool) -> tuple[DataLoader[Any], Any]:
        data = self.recipe.data
        size = len(dataset)  # type: ignore[arg-type]
        sampler: Any
        if self.dist.enabled:
            sampler = DistributedSampler(
                dataset,
                num_replicas=self.dist.world_size,
                rank=self.dist.rank,
                shuffle=train,
                seed=self.recipe.runtime.seed,
                drop_last=train,
            )
        elif train:
            sampler = _EpochSampler(size, self.recipe.runtime.seed)
        else:
            sampler = None
        loader = DataLoader(
            dataset,
            batch_size=data.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=data.workers,
            pin_memory=self.device.type == "cuda",
            drop_last=train and size >= 2 * data.batch_size,
            persistent_workers=data.workers > 0,
        )
        return loader, sampler

    def request_stop(self) -> None:
        """Ask the loop to save a resumable checkpoint after the current step and stop."""
        self._stop = True

    # --- one step ------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        amp = self.recipe.runtime.amp
        if amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _inputs(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images = images.to(self.device, non_blocking=True)
        if self.recipe.runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets.to(self.device, non_blocking=True)

    def _distill_term(self, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            return logits.new_zeros(())
        temperature = self.recipe.loss.temperature
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        kl = F.kl_div(
            F.log_softmax(logits.float() / temperature, dim=1),
            F.log_softmax(teacher_logits / temperature, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return self.recipe.loss.distill * kl * temperature**2

    def _train_step(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        global_step = self.epoch * self.steps_per_epoch + self.step_in_epoch
        factor = lr_factor(global_step, self.total_steps, self.warmup_steps, self.recipe)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        images, targets = self._inputs(images, targets)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            logits = self.ddp(images)
        parts = self.criterion(logits, targets)
        distill = self._distill_term(images, logits)
        total = parts.total + distill
        values = {
            "loss": float(total.detach()),
            "softmax": float(parts.softmax.detach()),
            "filter": float(parts.filter.detach()),
            "center": float(parts.center.detach()),
            "distill": float(distill.detach()),
        }
        if not math.isfinite(values["loss"]):
            raise TrainingDiverged(
                f"loss became {values['loss']} at epoch {self.epoch + 1}, step "
                f"{self.step_in_epoch + 1}; the last good checkpoint is {self.run_dir / LAST}: "
                "lower optim.lr or loss.theta, or turn runtime.amp off"
            )
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        correct = topk_correct(logits.detach(), targets, (1,))[0]
        acc = self.acc
        for name in ("loss", "softmax", "filter", "center", "distill"):
            setattr(acc, name, getattr(acc, name) + values[name])
        acc.correct += correct
        acc.samples += targets.shape[0]
        acc.steps += 1
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        values["top1"] = 100.0 * acc.correct / max(acc.samples, 1)
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
            images, targets = self._inputs(images, targets)
            with self._autocast():
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
    def _train_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "criterion": self.criterion.state_dict(),
            "rng": _rng_state(self.device),
            "accumulator": asdict(self.acc),
            "history": [asdict(m) for m in self.history],
            "best_top1": self.best_top1,
            "recipe": recipe_to_dict(self.recipe),
        }

    def _payload(self, metrics: dict[str, Any]) -> dict[str, Any]:
        extra = {"train_state": self._train_state()}
        if getattr(self.model, "mcn_config", None) is not None:
            return checkpoint_dict(self.model, parent=self._parent, metrics=metrics, extra=extra)
        source = getattr(self.model, "mcn_source", None)
        return {
            "format": FLOAT_FORMAT,
            "version": 1,
            "model": source.to_dict() if source is not None else None,
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "metadata": {"metrics": metrics},
            **extra,
        }

    def _save(self, name: str, metrics: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        payload = self._payload(metrics)
        atomic_write(self.run_dir / name, lambda tmp: torch.save(payload, tmp))

    def _load_state(self, path: Path) -> None:
        if not path.is_file():
            raise CheckpointError(f"cannot resume: {path} does not exist")
        try:
            data = read_checkpoint(path, map_location="cpu")
        except CheckpointError:
            data = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(data, dict) or data.get("format") != FLOAT_FORMAT:
                raise
        state = data.get("train_state")
        if not isinstance(state, dict):
            raise CheckpointError(f"cannot resume from {path}: it holds no training state")
        self.model.load_state_dict(data["state_dict"])
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

    def _write_metrics(self) -> None:
        if not self.dist.is_main:
            return
        rows = [asdict(m) for m in self.history]
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        atomic_write(self.run_dir / "metrics.jsonl", lambda tmp: tmp.write_text(lines))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(EpochMetrics.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.run_dir / "metrics.csv", lambda tmp: tmp.write_text(buffer.getvalue()))

    # --- the loop ------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train the remaining epochs; returns the history. Stops cleanly on Ctrl-C."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_recipe(self.recipe, self.run_dir / "recipe.yaml")
        with _stop_signals(self.request_stop):
            while self.epoch < self.recipe.optim.epochs:
                stopped = self._run_epoch()
                if stopped:
                    return TrainResult(self.run_dir, self.history, self.best_top1, stopped=True)
        return TrainResult(self.run_dir, self.history, self.best_top1)

    def _stop_everywhere(self) -> bool:
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.device)
        if self.dist.enabled:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _run_epoch(self) -> bool:
        epochs = self.recipe.optim.epochs
        if self.train_sampler is not None:
            self.train_sampler.set_epoch(self.epoch)
        if self.step_in_epoch == 0:
            torch.manual_seed(self.recipe.runtime.seed * 1000 + self.epoch)
        batches = iter(self.train_loader)
        for _ in range(self.step_in_epoch):  # mid-epoch resume: skip the batches already done
            next(batches)
        resume_rng = getattr(self, "_resume_rng", None)
        if resume_rng is not None:  # restored after skipping, so skipped loads do not shift it
            _set_rng_state(resume_rng, self.device)
            self._resume_rng = None
        if self.callbacks and self.dist.is_main:
            self.callbacks.on_epoch_start(
                self.epoch, epochs, self.steps_per_epoch, self.step_in_epoch
            )
        self.model.train()
        self.criterion.train()
        start = time.perf_counter()
        for images, targets in batches:
            values = self._train_step(images, targets)
            self.step_in_epoch += 1
            if self.callbacks and self.dist.is_main:
                self.callbacks.on_step(values)
            if self._stop_everywhere():
                self.acc.seconds += time.perf_counter() - start
                self._save(LAST, {"interrupted": True})
                _logger.warning("stopped at epoch %d step %d", self.epoch + 1, self.step_in_epoch)
                return True
        self.acc.seconds += time.perf_counter() - start
        val_loss, top1, top5 = self.evaluate()
        metrics = self._epoch_metrics(val_loss, top1, top5)
        self.history.append(metrics)
        best = top1 > self.best_top1
        self.best_top1 = max(self.best_top1, top1)
        self.epoch += 1
        self.step_in_epoch = 0
        self.acc = _Accumulator()
        summary = {"epoch": metrics.epoch, "val_top1": top1, "val_top5": top5}
        self._save(LAST, summary)
        if best:
            self._save(BEST, summary)
        self._write_metrics()
        if self.callbacks and self.dist.is_main:
            self.callbacks.on_epoch_end(metrics, best)
        return False

    def _epoch_metrics(self, val_loss: float, top1: float, top5: float) -> EpochMetrics:
        acc = self.acc
        sums = torch.tensor(
            [
                acc.loss,
                acc.softmax,
                acc.filter,
                acc.center,
                acc.distill,
                acc.correct,
                acc.samples,
                acc.steps,
            ],
            dtype=torch.float64,
            device=self.device,
        )
        if self.dist.enabled:
            dist.all_reduce(sums)
        loss, softmax, filt, center, distill, correct, samples, steps = sums.tolist()
        steps = max(steps, 1.0)
        return EpochMetrics(
            epoch=self.epoch + 1,
            loss=loss / steps,
            softmax=softmax / steps,
            filter=filt / steps,
            center=center / steps,
            distill=distill / steps,
            train_top1=100.0 * correct / max(samples, 1.0),
            val_loss=val_loss,
            val_top1=top1,
            val_top5=top5,
            lr=self.optimizer.param_groups[0]["lr"],
            images_per_sec=samples / max(acc.seconds, 1e-9),
            seconds=acc.seconds,
        )

    def close(self) -> None:
        """Leave the process group (call once at the end of a distributed run)."""
        self.criterion.remove_hook()
        if self.dist.enabled and dist.is_initialized():
            dist.barrier()  # no rank tears the group down while another still talks to it
            dist.destroy_process_group()
