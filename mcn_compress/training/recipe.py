"""Fine-tuning recipes: a typed YAML schema, ``--set`` overrides and the resolved dump.

A recipe is a YAML file with the sections ``model``, ``data``, ``optim``, ``loss`` (the weights
of Eq. 3.18, docs/design.md section 3), ``runtime`` and ``output``. `load_recipe` validates it
against the dataclasses below and raises one `ConfigError` that names the file, every bad key
path and what was expected. As in timm's ``train.py``, the file sets the values, command-line
``--set key.path=value`` overrides them, and the resolved recipe is written next to the run
(`dump_recipe`) so that every run can be reproduced.

YAML 1.1 caveats handled here: ``1e-4`` (read by PyYAML as a string) is accepted where a number
is expected, and ``off`` / ``on`` (read as booleans) are accepted where those words are choices.

Example:
    >>> recipe = load_recipe("recipes/cifar10.yaml", ["optim.lr=0.01", "data.batch_size=64"])
    >>> groups = build_param_groups(model, recipe)
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mcn_compress.config import MCNConfig
from mcn_compress.errors import ConfigError
from mcn_compress.limits import check_file, file_problem
from mcn_compress.training.safe_yaml import MAX_YAML_BYTES, load_yaml
from mcn_compress.training.schema import (
    INVALID,
    Mismatch,
    build_dataclass,
    coerce,
    describe_type,
    join_key,
    problems_error,
    raise_if,
    show_value,
    strip_optional,
    type_hints,
)

DatasetName = Literal["imagefolder", "cifar10", "cifar100", "fashion_mnist", "synthetic"]
OptimizerName = Literal["sgd", "adamw"]
ScheduleName = Literal["cosine", "step"]
DeviceName = Literal["auto", "cpu", "cuda"]
AmpMode = Literal["off", "bf16", "fp16"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

_logger = logging.getLogger(__name__)

#: the keys of ``model`` that say where the model comes from, by source
MODEL_SOURCES: dict[str, tuple[str, ...]] = {
    "checkpoint": ("checkpoint",),
    "name": ("name", "weights", "convert", "pretrained"),
}
#: recipe keys holding input paths, resolved against the current or the recipe's folder
INPUT_PATHS: tuple[tuple[str, str], ...] = (
    ("model", "checkpoint"),
    ("model", "weights"),
    ("model", "teacher"),
    ("data", "root"),
)
QUICKSTART_HINT = "quickstart/float/"  # the float model `mcn-compress quickstart` trains

MAX_SEED = 2**32 - 1  # numpy's and the data loader workers' seeds are 32-bit
MAX_IMAGE_SIZE = 4096  # data.image_size: a 4096 x 4096 RGB batch of 128 is already 25 GB
MAX_BATCH = 65_536
MAX_WORKERS = 256
MAX_EPOCHS = 100_000
MAX_SYNTHETIC = 1_000_000  # synthetic samples: every epoch draws a permutation of them


def at_most(problems: list[tuple[str, str]], key: str, value: int | None, most: int | None) -> None:
    """Add a problem when ``value`` is above ``most`` (None: no bound, or no value)."""
    if value is not None and most is not None and value > most:
        problems.append((key, f"expected at most {most:,}, got {value:,}"))


AS_WRITTEN = "_as_written"
"""Attribute of a recipe section holding the values the user wrote for its derived keys."""
DERIVED_OPTIM = ("lr_mfilter", "warmup_epochs", "milestones")
"""Keys of ``optim`` whose value is derived from others when left out or out of range:
``lr_mfilter`` (``lr / 10``), ``warmup_epochs`` (clamped below ``epochs``), ``milestones``
(1/2 and 3/4 of ``epochs``)."""

#: datasets whose ``data.root`` has no default location
ROOT_REQUIRED: tuple[str, ...] = ("imagefolder", "cifar10", "cifar100")


# ------------------------------------------------------------------------------------------
# schema
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ModelRecipe:
    """What to fine-tune: a converted checkpoint, or a float model converted on the fly.

    Exactly one of ``checkpoint`` (a ``.pt`` written by ``mcn-compress convert``) and ``name``
    (a timm name, ``tv:NAME`` or ``hf-hub:ID``) is given. With ``name``, ``convert`` holds the
    `MCNConfig` options (planes, width, mcn1, clip, include, exclude, grouped, init_iters) and
    defaults to ``MCNConfig()``; ``pretrained`` / ``weights`` say where the float weights come
    from. ``num_classes`` / ``in_chans`` default to the dataset's. ``teacher`` (optional) is
    a model name or checkpoint used for distillation (``loss.distill``).
    """

    checkpoint: str | None = None
    name: str | None = None
    convert: MCNConfig | None = None
    pretrained: bool = True
    weights: str | None = None
    num_classes: int | None = None
    in_chans: int | None = None
    teacher: str | None = None

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        if (self.checkpoint is None) == (self.name is None):
            problems.append(
                (
                    "",
                    "expected exactly one of checkpoint (a converted .pt) or name (a float model "
                    "to convert)",
                )
            )
        if self.checkpoint is not None:
            for key in ("convert", "weights"):
                if getattr(self, key) is not None:
                    problems.append((key, "not allowed with checkpoint (it fixes the model)"))
        elif self.name is not None and self.convert is None:
            object.__setattr__(self, "convert", MCNConfig())
        for key in ("num_classes", "in_chans"):
            value = getattr(self, key)
            if value is not None and value < 1:
                problems.append((key, f"expected a positive integer, got {value}"))
        for key in ("checkpoint", "name", "weights", "teacher"):
            if getattr(self, key) == "":
                problems.append((key, "expected a non-empty string or null"))
        raise_if(problems)


@dataclass(frozen=True, kw_only=True)
class DataRecipe:
    """Which data: ``dataset`` and its ``root``; sizes; optional deterministic subset caps.

    ``root`` is required for imagefolder (``root/train``, ``root/val``) and CIFAR (torchvision
    layout); Fashion-MNIST defaults to Debian's ``/usr/share/datasets/fashion-mnist``.
    ``image_size`` defaults to the dataset's native size (the model's for imagefolder).
    ``batch_size`` is per process (per GPU): the global batch is ``batch_size * world_size``.
    ``augment`` turns on random training augmentation (padded crop + horizontal flip for
    small images, timm's training transform for imagefolder); ``false`` trains on the
    evaluation transform, which suits small models that underfit (Fashion-MNIST, README).
    """

    dataset: DatasetName
    root: str | None = None
    image_size: int | None = None
    batch_size: int = 128
    workers: int = 4
    train_samples: int | None = None
    val_samples: int | None = None
    augment: bool = True

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        if self.dataset in ROOT_REQUIRED and not self.root:
            problems.append(("root", f"required for dataset {self.dataset} (a directory)"))
        if self.image_size is not None and self.image_size < 8:
            problems.append(("image_size", f"expected an integer >= 8, got {self.image_size}"))
        if self.batch_size < 1:
            problems.append(("batch_size", f"expected a positive integer, got {self.batch_size}"))
        if self.workers < 0:
            problems.append(("workers", f"expected an integer >= 0, got {self.workers}"))
        for key in ("train_samples", "val_samples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                problems.append((key, f"expected a positive integer or null, got {value}"))
        synthetic = MAX_SYNTHETIC if self.dataset == "synthetic" else None
        for key, most in (
            ("image_size", MAX_IMAGE_SIZE),
            ("batch_size", MAX_BATCH),
            ("workers", MAX_WORKERS),
            ("train_samples", synthetic),
            ("val_samples", synthetic),
        ):
            at_most(problems, key, getattr(self, key), most)
        raise_if(problems)


@dataclass(frozen=True, kw_only=True)
class OptimRecipe:
    """Optimiser and schedule. Latent C uses ``lr`` (eta1), the M-Filters ``lr_mfilter``
    (eta2, docs/design.md section 3; default ``lr / 10``) without weight decay. ``momentum`` is
    SGD's momentum or AdamW's beta1. ``milestones`` / ``gamma`` shape the ``step`` schedule (default
    milestones at 1/2 and 3/4 of the epochs).
    """

    optimizer: OptimizerName = "adamw"
    epochs: int = 10
    lr: float = 1e-3
    lr_mfilter: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: ScheduleName = "cosine"
    warmup_epochs: int = 0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        # what the user wrote, before the values derived below (resume compares these)
        written = {key: getattr(self, key) for key in DERIVED_OPTIM}
        object.__setattr__(self, AS_WRITTEN, {k: _plain(v) for k, v in written.items()})
        problems: list[tuple[str, str]] = []
        if self.epochs < 1:
            problems.append(("epochs", f"expected a positive integer, got {self.epochs}"))
        at_most(problems, "epochs", self.epochs, MAX_EPOCHS)
        if not self.lr > 0:
            problems.append(("lr", f"expected a number > 0, got {self.lr}"))
        if self.lr_mfilter is None:
            object.__setattr__(self, "lr_mfilter", self.lr / 10)
        elif self.lr_mfilter < 0:
            problems.append(("lr_mfilter", f"expected a number >= 0, got {self.lr_mfilter}"))
        if not 0 <= self.momentum < 1:
            problems.append(("momentum", f"expected a number in [0, 1), got {self.momentum}"))
        if self.weight_decay < 0:
            problems.append(("weight_decay", f"expected a number >= 0, got {self.weight_decay}"))
        if self.warmup_epochs < 0:
            problems.append(("warmup_epochs", f"expected an integer >= 0: {self.warmup_epochs}"))
        elif self.epochs >= 1 and self.warmup_epochs >= self.epochs:
            clamped = self.epochs - 1
            _logger.warning(
                "optim.warmup_epochs %d is not shorter than the run (%d epochs): using %d",
                self.warmup_epochs,
                self.epochs,
                clamped,
            )
            object.__setattr__(self, "warmup_epochs", clamped)
        milestones = tuple(self.milestones)
        if self.schedule == "step" and not milestones:
            milestones = tuple(
                sorted({e for e in (self.epochs // 2, self.epochs * 3 // 4) if 0 < e < self.epochs})
            )
        object.__setattr__(self, "milestones", milestones)
        if list(milestones) != sorted(set(milestones)) or any(
            not 0 < m < self.epochs for m in milestones
        ):
            problems.append(
                ("milestones", f"expected increasing epochs in (0, epochs), got {list(milestones)}")
            )
        if not 0 < self.gamma <= 1:
            problems.append(("gamma", f"expected a number in (0, 1], got {self.gamma}"))
        raise_if(problems)


@dataclass(frozen=True, kw_only=True)
class LossRecipe:
    """Weights of Eq. 3.18 (``theta``, ``lambda_center``), the centre rate ``alpha`` of Wen et
    al. 2016, and optional distillation (``distill`` weight, 0 = off; ``temperature``).
    """

    theta: float = 1e-4
    lambda_center: float = 1e-2
    alpha: float = 0.5
    distill: float = 0.0
    temperature: float = 4.0

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        for key in ("theta", "lambda_center", "distill"):
            if getattr(self, key) < 0:
                problems.append((key, f"expected a number >= 0, got {getattr(self, key)}"))
        if not 0 < self.alpha <= 1:
            problems.append(("alpha", f"expected a number in (0, 1], got {self.alpha}"))
        if not self.temperature > 0:
            problems.append(("temperature", f"expected a number > 0, got {self.temperature}"))
        raise_if(problems)


@dataclass(frozen=True, kw_only=True)
class RuntimeRecipe:
    """Where and how to run: ``device``, mixed precision ``amp``, memory format, ``seed``;
    ``compile`` runs the model and the MCN loss through ``torch.compile`` with ``compile_mode``
    (`training.compile`; the same maths, so it may change on resume).
    """

    device: DeviceName = "auto"
    amp: AmpMode = "off"
    channels_last: bool = False
    seed: int = 0
    compile: bool = False
    compile_mode: CompileMode = "default"

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        if self.amp == "fp16" and self.device == "cpu":
            problems.append(("amp", "fp16 autocast needs a CUDA device; use bf16 on cpu"))
        if self.seed < 0:
            problems.append(("seed", f"expected an integer >= 0, got {self.seed}"))
        at_most(problems, "seed", self.seed, MAX_SEED)
        raise_if(problems)


@dataclass(frozen=True, kw_only=True)
class OutputRecipe:
    """``dir``: the run folder (checkpoints, resolved recipe, logs)."""

    dir: str

    def __post_init__(self) -> None:
        raise_if([("dir", "expected a non-empty path")] if not self.dir else [])


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A whole fine-tuning recipe; build it with `load_recipe` or `recipe_from_dict`."""

    model: ModelRecipe
    data: DataRecipe
    optim: OptimRecipe = field(default_factory=OptimRecipe)
    loss: LossRecipe = field(default_factory=LossRecipe)
    runtime: RuntimeRecipe = field(default_factory=RuntimeRecipe)
    output: OutputRecipe

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        if self.loss.distill > 0 and self.model.teacher is None:
            problems.append(("loss.distill", "distillation needs model.teacher"))
        raise_if(problems)


# ------------------------------------------------------------------------------------------
# generic validation of nested dataclasses
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------
def recipe_from_dict(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate plain data (as read from YAML) into a `Recipe`; ``source`` names it in errors."""
    if data is None:
        raise ConfigError(f"{source}: the recipe is empty")
    problems: list[tuple[str, str]] = []
    recipe = build_dataclass(Recipe, data, "", problems)
    if problems or recipe is INVALID:
        raise problems_error(source, problems or [("", "invalid recipe")])
    return recipe


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override (``key.path=value`` strings) and validate the recipe file ``path``."""
    path = Path(path)
    problem = file_problem(path)
    if problem == "is a directory":
        raise ConfigError(f"recipe {path} does not exist (a directory)")
    check_file(path, ConfigError, "recipe ")
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(
                f"recipe {path} is {path.stat().st_size:,} bytes; mcn-compress reads recipes up "
                f"to {MAX_YAML_BYTES:,}"
            )
        data = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc}") from exc
    if data is None:
        raise ConfigError(f"{path}: the recipe is empty")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected {describe_type(Recipe)}, got {show_value(data)}")
    if overrides:
        data = apply_overrides(data, overrides)
        data = replace_model_source(data, overrides)
    data = resolve_recipe_paths(data, path.parent, overrides)
    return recipe_from_dict(data, source=str(path))


def _set_keys(overrides: Sequence[str]) -> set[str]:
    return {text.partition("=")[0].replace(" ", "") for text in overrides}


def replace_model_source(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """When ``overrides`` give the model's other source (``model.checkpoint`` for a recipe
    that names a float model, or ``model.name`` for one that names a checkpoint), drop the
    recipe's keys of the source it replaces (`MODEL_SOURCES`), with one log line."""
    result = dict(data)
    model = result.get("model")
    given = _set_keys(overrides)
    if not isinstance(model, Mapping):
        return result
    for new, other in (("checkpoint", "name"), ("name", "checkpoint")):
        if f"model.{new}" not in given or model.get(new) is None:
            continue
        dropped = [k for k in MODEL_SOURCES[other] if k in model and f"model.{k}" not in given]
        if dropped:
            result["model"] = {k: v for k, v in model.items() if k not in dropped}
            _logger.warning(
                "model.%s replaces the recipe's model source: ignoring %s",
                new,
                ", ".join(f"model.{k}" for k in dropped),
            )
        break
    return result


def resolve_recipe_paths(
    data: Mapping[str, Any], recipe_dir: Path, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Resolve the relative input paths of a recipe file (`INPUT_PATHS`, not those given by
    ``overrides``): a path that exists from the current folder is kept, else one that exists
    from ``recipe_dir`` (the recipe's folder) is rewritten to it; one log line says which (a
    warning when the path is rewritten or exists in both places).
    Paths found in neither place are left as they are (the step that needs them says so)."""
    result = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    given = _set_keys(overrides)
    for section, key in INPUT_PATHS:
        block = result.get(section)
        value = block.get(key) if isinstance(block, dict) else None
        if not isinstance(value, str) or not value or f"{section}.{key}" in given:
            continue
        if Path(value).is_absolute() or value == "original":
            continue
        beside = recipe_dir / value
        if Path(value).exists():
            where = "the current folder"
            both = beside.exists() and beside.resolve() != Path(value).resolve()
            if both:
                where += f" (not the recipe's folder {recipe_dir})"
            level = logging.WARNING if both else logging.INFO  # a warning only when it is unclear
            _logger.log(level, "%s.%s %s: relative to %s", section, key, value, where)
        elif beside.exists():
            assert isinstance(block, dict)
            block[key] = str(beside)
            _logger.warning(
                "%s.%s %s: relative to the recipe's folder (%s)", section, key, value, beside
            )
    return result


def _override_type(keys: list[str], text: str) -> Any:
    """The schema type at ``keys``; unknown keys raise `ConfigError`."""
    tp: Any = Recipe
    for depth, key in enumerate(keys):
        tp = strip_optional(tp)
        prefix = ".".join(keys[:depth])
        if not (dataclasses.is_dataclass(tp) and isinstance(tp, type)):
            raise ConfigError(f"--set {text}: {prefix} is a value, not a section")
        names = [f.name for f in dataclasses.fields(tp)]
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {join_key(prefix, close[0])}?)" if close else ""
            raise ConfigError(
                f"--set {text}: unknown key {join_key(prefix, key)}{hint}; expected one of "
                f"{', '.join(names)}"
            )
        tp = type_hints(tp)[key]
    return tp


def apply_overrides(recipe_dict: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``recipe_dict`` with ``"key.path=value"`` overrides applied, in order.

    Values are parsed with ``yaml.safe_load`` (``0.01`` is a number, ``true`` a bool, ``null``
    None, ``[a, b]`` a list). Unknown keys and values of the wrong type raise `ConfigError`.
    """
    if not isinstance(recipe_dict, Mapping):
        raise ConfigError(f"the recipe must be a mapping, got {show_value(recipe_dict)}")
    result: dict[str, Any] = copy.deepcopy(dict(recipe_dict))
    for text in overrides:
        key_text, sep, raw = text.partition("=")
        keys = [k.strip() for k in key_text.split(".")]
        if not sep or not all(keys):
            raise ConfigError(f"--set {text!r}: expected key.path=value, e.g. optim.lr=0.01")
        tp = _override_type(keys, text)
        try:
            value = load_yaml(raw, f"--set {key_text}")
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {text}: the value is not valid YAML") from exc
        leaf = strip_optional(tp)
        if not dataclasses.is_dataclass(leaf):
            try:
                coerce(value, tp, key_text, [])
            except Mismatch:
                raise ConfigError(
                    f"--set {text}: expected {describe_type(tp)}, got {show_value(value)}"
                ) from None
        node = result
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    return result


def _plain(value: Any, as_written: bool = False) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {
            f.name: _plain(getattr(value, f.name), as_written) for f in dataclasses.fields(value)
        }
        if as_written:
            fields.update(getattr(value, AS_WRITTEN, {}))
        return fields
    if isinstance(value, list | tuple):
        return [_plain(v, as_written) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, as_written) for k, v in value.items()}
    return value


def recipe_to_dict(recipe: Recipe, as_written: bool = False) -> dict[str, Any]:
    """The resolved recipe as plain containers (loadable again by `recipe_from_dict`); with
    ``as_written`` the derived keys (`DERIVED_OPTIM`) hold what the user wrote instead (None
    where nothing was written), which is what a resumed run compares."""
    return _plain(recipe, as_written)


def dump_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write the resolved recipe to ``path`` as YAML, atomically; returns the path."""
    from mcn_compress.formats.atomic import atomic_write

    text = "# resolved mcn-compress recipe (defaults filled in, overrides applied)\n"
    text += yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=False)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return Path(path)
