"""`MCNConfig`: how a float model is turned into an MCN (docs/design.md section 2)."""

from __future__ import annotations

import math
import re
import reprlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal

from mcn_compress.errors import ConfigError

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 40


def _show(value: Any) -> str:
    """A short repr of ``value`` for messages (never the whole of a large value)."""
    return _REPR.repr(value)


Width = Literal["keep", "expand"]
WIDTHS: tuple[str, ...] = ("keep", "expand")


@dataclass(frozen=True)
class MCNConfig:
    """Settings of the conversion pass.

    Args:
        planes: K, the number of M-Filter planes (docs/design.md section 2). In width keep every
            converted conv needs input and output channel counts divisible by K.
        width: ``"keep"`` (tensor shapes unchanged, 1/(32K) of the conv bits) or ``"expand"``
            (the paper's widened network: every filter stays a binary filter, tensors K times
            wider, K^2 times the conv FLOPs; see `mcn_compress.passes.expand`).
        mcn1: MCNs-1 variant: each M plane is one scalar instead of a kh x kw matrix.
        clip: straight-through estimator clip; the sign's gradient passes where |C| <= clip.
        include: regular expressions on module names; when given, only matching convs convert.
        exclude: regular expressions on module names; matching convs stay float.
        grouped: also convert grouped convs whose per-group channel counts are divisible by K
            (depthwise convs never qualify for K > 1).
        init_iters: alternations of the least-squares sign / M-Filter fit at initialisation.

    Example:
        >>> cfg = MCNConfig(planes=4, exclude=(r"layer4",))

    ``VERSION`` is the version of this record's stored form (`to_dict` writes it; `from_dict`
    refuses a newer one and reads older ones, and dicts without it as version 1).
    """

    VERSION: ClassVar[int] = 1

    planes: int = 4
    width: Width = "keep"
    mcn1: bool = False
    clip: float = 1.0
    include: tuple[str, ...] = field(default_factory=tuple)
    exclude: tuple[str, ...] = field(default_factory=tuple)
    grouped: bool = False
    init_iters: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.planes, bool) or not isinstance(self.planes, int) or self.planes < 1:
            raise ConfigError(f"planes (K) must be a positive integer, got {_show(self.planes)}")
        if not isinstance(self.width, str) or self.width not in WIDTHS:
            raise ConfigError(f"width must be one of {', '.join(WIDTHS)}, got {_show(self.width)}")
        for name in ("mcn1", "grouped"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {_show(getattr(self, name))}")
        real = isinstance(self.clip, int | float) and not isinstance(self.clip, bool)
        if not real or not 0 < self.clip < math.inf:
            raise ConfigError(f"clip must be a positive number, got {_show(self.clip)}")
        if isinstance(self.init_iters, bool) or not isinstance(self.init_iters, int):
            raise ConfigError(f"init_iters must be an integer, got {_show(self.init_iters)}")
        if self.init_iters < 1:
            raise ConfigError(f"init_iters must be at least 1, got {self.init_iters}")
        for name in ("include", "exclude"):
            patterns = getattr(self, name)
            if not isinstance(patterns, list | tuple) or not all(
                isinstance(p, str) for p in patterns
            ):
                raise ConfigError(f"{name} must be a list of regex strings, got {_show(patterns)}")
            patterns = tuple(patterns)
            object.__setattr__(self, name, patterns)
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(
                        f"{name} pattern {pattern!r} is not a valid regex: {exc}"
                    ) from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain-container form, safe for `torch.save` with `weights_only` loading."""
        data: dict[str, Any] = {"version": self.VERSION, **asdict(self)}
        data["include"] = list(self.include)
        data["exclude"] = list(self.exclude)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MCNConfig:
        """Inverse of `to_dict`; unknown keys and newer versions are an error."""
        values = dict(data)
        version = values.pop("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ConfigError(f"MCN config version must be a positive integer, got {version!r}")
        if version > cls.VERSION:
            raise ConfigError(
                f"MCN config version {version} is newer than this mcn-compress reads "
                f"({cls.VERSION}): upgrade mcn-compress"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown MCN config keys: {', '.join(unknown)}")
        return cls(**values)
