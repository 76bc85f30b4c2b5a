"""``TrainConfig``: every knob of one training run, readable from and written back to YAML or TOML.

A run writes its full config (defaults filled in) as ``config.yaml`` next to its results, so the folder alone
says how it was produced and ``--resume`` can rebuild the run from it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic_write import atomic_write

__all__ = ["TrainConfig", "ConfigError", "load_config", "save_config", "OPTIMIZERS", "SCHEDULES", "DTYPES"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "multistep", "cosine")
DTYPES = ("fp32", "bf16", "autocast")
SYNC_NORM = ("none", "torch", "lp", "auto")
WEIGHT_NORMS = ("none", "wn", "bwn")
NO_WEIGHT_NORM, _, BOUNDED_WEIGHT_NORM = WEIGHT_NORMS
BATCH_ORDERS = ("shuffle", "class_sorted")
#: the weight-decay mimic's rules (normmatters.optim.MIMIC_RULES; this module imports no torch)
MIMIC_RULES = ("rescale", "replay")


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the key (and the file)."""


def _kind(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_value(key: str, expected: str, value: Any) -> None:
    """Raise ConfigError unless ``value`` has the type the field annotation ``expected`` names."""
    optional = expected.endswith(" | None")
    base = expected.removesuffix(" | None")
    if value is None:
        if optional:
            return
        raise ConfigError(f"config: {key} must be {base}, got None")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": number,
        "bool": isinstance(value, bool),
        "dict[str, Any]": isinstance(value, dict) and all(isinstance(k, str) for k in value),
        "list[int]": isinstance(value, list | tuple)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
        "tuple[float, float]": isinstance(value, list | tuple)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value),
    }.get(base)
    if ok is None:  # pragma: no cover - a new field with an unlisted type
        raise TypeError(f"TrainConfig: no type check for {key}: {expected}")
    if not ok:
        words = {"str": "a string", "int": "an int", "float": "a number", "bool": "true or false (a boolean, "
                 "not a string)", "dict[str, Any]": "a mapping of option names to values",
                 "list[int]": "a list of ints", "tuple[float, float]": "two numbers"}[base]
        raise ConfigError(f"config: {key} must be {words}{' or absent' if optional else ''}, got {_kind(value)}")


def check_types(config: Any) -> None:
    """Check every field of a :class:`TrainConfig` against its annotation (YAML/TOML give any type)."""
    for f in dataclasses.fields(config):
        _check_value(f.name, str(f.type), getattr(config, f.name))


@dataclass
class TrainConfig:
    """One training run.

    Epoch-valued schedule fields (``step_size``, ``milestones``, ``warmup_epochs``) are in epochs
    and applied per step; ``batch_size`` is the *global* batch (split evenly across ranks).

    Weight decay has three groups (Hoffer et al. 2018, §5: decay on a weight followed by a normalization only
    changes its effective step size): ``wd_normalized`` for conv/linear weights that feed a normalization
    (scale-invariant), ``wd_norm`` for the normalization's own weight/bias, ``wd_other`` for everything else
    (biases, classifier). ``None`` means "use ``weight_decay``" (``wd_norm`` defaults to 0).
    """

    model: str = "resnet20"
    dataset: str = "digits"
    norm: str = "bn"
    norm_options: dict[str, Any] = field(default_factory=dict)
    width: int = 1
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    wd_normalized: float | None = None
    wd_norm: float = 0.0
    wd_other: float | None = None
    schedule: str = "cosine"
    step_size: int = 30
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_start: float = 0.1
    crop_padding: int = 0
    hflip: bool = False
    seed: int = 0
    dtype: str = "fp32"
    device: str = "cpu"
    workers: int = 0
    threads: int | None = None
    sync_norm: str = "none"
    checkpoint_every: int = 1
    log_every: int = 10
    monitor: bool = True
    weight_norm: str = "none"
    weight_norm_p: float = 2.0
    batch_order: str = "shuffle"
    record_norms: str | None = None
    mimic_weight_decay: str | None = None
    mimic_rule: str = "rescale"
    norm_schedule: bool = False
    tensorboard: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.milestones = [int(m) for m in self.milestones]
        self.validate()

    def validate(self) -> None:
        def bad(key: str, expected: str) -> ConfigError:
            return ConfigError(f"config: {key} must be {expected}, got {getattr(self, key)!r}")

        for key, choices in (
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("dtype", DTYPES),
            ("sync_norm", SYNC_NORM),
            ("weight_norm", WEIGHT_NORMS),
            ("batch_order", BATCH_ORDERS),
            ("mimic_rule", MIMIC_RULES),
        ):
            if getattr(self, key) not in choices:
                raise bad(key, f"one of {choices}")
        for key in ("epochs", "batch_size", "width", "checkpoint_every", "log_every", "step_size"):
            if getattr(self, key) < 1:
                raise bad(key, "a positive int")
        for key in ("workers", "crop_padding"):
            if getattr(self, key) < 0:
                raise bad(key, "≥ 0")
        if self.threads is not None and self.threads < 1:
            raise bad("threads", "a positive int (or absent: torch's default)")
        if not 0 <= self.seed < 2**32:
            raise bad("seed", "an int in 0 .. 2**32 - 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "a finite number > 0")
        if not 0 <= self.momentum < 1:  # NaN fails too
            raise bad("momentum", "in [0, 1)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", "two numbers in [0, 1)")
        for key in ("weight_decay", "wd_normalized", "wd_norm", "wd_other"):
            v = getattr(self, key)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise bad(key, "a finite number ≥ 0")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise bad("gamma", "a finite number > 0 (the factor each step/milestone multiplies the rate by)")
        if any(m < 1 for m in self.milestones) or sorted(set(self.milestones)) != list(self.milestones):
            raise bad("milestones", "increasing epochs ≥ 1")
        if not 0 <= self.warmup_epochs <= self.epochs:  # NaN fails too
            raise ConfigError(f"config: warmup_epochs must lie in [0, epochs={self.epochs}], "
                              f"got {self.warmup_epochs!r}")
        if not 0 <= self.warmup_start <= 1:
            raise bad("warmup_start", "in [0, 1] (a fraction of lr)")
        if not self.weight_norm_p > 0:
            raise bad("weight_norm_p", "> 0 (1, 2 or inf)")
        if self.norm_schedule and self.schedule not in ("step", "multistep"):
            raise ConfigError(f"config: norm_schedule replaces a step/multistep rate schedule, got schedule="
                              f"{self.schedule!r}")
        if self.mimic_weight_decay == "online" and self.optimizer != "sgd" and not (
                self.optimizer == "adamw" and self.mimic_rule == "replay"):
            hint = ("mimic_rule='replay' (--wd-mimic replay) models AdamW too" if self.optimizer == "adamw" else
                    "Adam's coupled decay is not modelled online; use adamw with mimic_rule='replay'")
            raise ConfigError(f"config: mimic_weight_decay='online' models SGD, got optimizer={self.optimizer!r} "
                              f"with mimic_rule={self.mimic_rule!r}; {hint}, or record a trajectory (record_norms) "
                              "of the decay run and pass its file instead")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from e

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file into a dict of TrainConfig keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it as text ({e})") from e
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise ConfigError(f"{path}: cannot parse ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, found {type(data).__name__}")
    return data


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write ``config`` as YAML (every key, defaults included)."""
    import yaml

    atomic_write(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
