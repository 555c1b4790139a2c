"""Typed, frozen configuration: dataclass defaults, YAML overrides, ``--set`` overrides.

Every default lives in the dataclasses below and is documented, one line each, in
``tfpneumo/configs/base.yaml`` (a test keeps the two equal). The shipped configs are package
data (:func:`shipped_configs`), so a non-editable install finds them by name (``demo``). Experiment files hold overrides
only. Unknown keys and invalid values raise :class:`ConfigError` naming the key.

Over ~500 lines on purpose: the schema, its validation and the loader that refuses hostile
YAML are one contract (every key's type, range and message), kept in one place.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tfpneumo.errors import TfpneumoError, first_line

# data.service: local worker processes (local or local:N) or a dispatcher's address.
SERVICE_RE = r"local(:[1-9][0-9]*)?|(grpc://)?(?!local:)[A-Za-z0-9.\-\[\]:]+:[0-9]+"


class ConfigError(TfpneumoError):
    """A config key is unknown or its value is invalid."""


# Values quoted in error messages: depth, items and length bounded while formatting (a plain
# repr of a huge value would build the whole string first), then cut to SHOWN_CHARS.
SHOWN_CHARS = 80
_FOLDER_NAME = re.compile(r"[A-Za-z0-9._+-]{1,128}")  # experiment: one portable folder name
_REPR = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_REPR.maxlevel, _REPR.maxlong, _REPR.maxstring, _REPR.maxother = 3, 40, SHOWN_CHARS, SHOWN_CHARS
_REPR.maxtuple = _REPR.maxlist = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 6
_REPR.maxdict = 4


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, at most :data:`SHOWN_CHARS` (+ ``...``) long."""
    text = _REPR.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


class _AliasRefused(yaml.YAMLError):
    def __init__(self, mark) -> None:
        super().__init__(f"line {mark.line + 1}: YAML aliases (*name) are not allowed in "
                         "configs; write the value out")


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, mark, key) -> None:
        super().__init__(f"line {mark.line + 1}: key {shown(key)} appears twice in one mapping")


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses aliases: nested anchors expand exponentially (a
    400-byte "billion laughs" file is a 10⁹-item list), and configs never need them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _AliasRefused(self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        # PyYAML keeps the last of two equal keys without a word; in a config that hides a typo
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _DuplicateKey(key_node.start_mark, key)
            seen.add(key) if isinstance(key, (str, int, float, bool)) else None
        return super().construct_mapping(node, deep=deep)


def _safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)


@dataclass(frozen=True)
class PrepareConfig:
    size: int = 512
    folds: int = 5
    group_by_patient: bool = False
    clahe: bool = False
    shard_size: int = 256
    workers: int = 0
    seed: int = 42

    def validate(self, prefix: str) -> None:
        _check(self.size >= 32, prefix, "size", "must be >= 32")
        _check(self.folds >= 2, prefix, "folds", "must be >= 2")
        _check(self.shard_size >= 1, prefix, "shard_size", "must be >= 1")
        _check(self.workers >= 0, prefix, "workers", "must be >= 0 (0 = all cores)")


@dataclass(frozen=True)
class DataConfig:
    cache: str = "cache"
    image_size: int = 512
    crop: Literal["resize", "random_crop"] = "resize"
    batch_size: int = 8
    positive_rate_start: float | None = 0.8
    positive_rate_end: float | None = 0.4
    shuffle_buffer: int = 512
    cache_in_memory: Literal["auto", "always", "never"] = "auto"
    memory_budget_gb: float = 4.0
    num_parallel_calls: int = -1
    service: str | None = None
    # Largest DICOM accepted by prepare, predict and submit, as decoded pixel data (rows x
    # columns x bits allocated), checked in the header before decoding (tfpneumo.data.dicom).
    max_dicom_mib: float = 128.0

    def validate(self, prefix: str) -> None:
        _check(self.image_size >= 32 and self.image_size % 32 == 0, prefix, "image_size",
               "must be a multiple of 32 (the UNet downsamples 5 times)")
        # an upper bound too: 1e11 images passed validation and failed deep inside tf.data
        _check(1 <= self.batch_size <= 65536, prefix, "batch_size", "must be in [1, 65536]")
        for name in ("positive_rate_start", "positive_rate_end"):
            rate = getattr(self, name)
            # 1.0: positive images only (the 34th place's third stage)
            _check(rate is None or 0.0 < rate <= 1.0, prefix, name, "must be in (0, 1] or null")
        _check((self.positive_rate_start is None) == (self.positive_rate_end is None), prefix,
               "positive_rate_end", "set both positive_rate_start and _end, or neither")
        _check(self.shuffle_buffer >= 1, prefix, "shuffle_buffer", "must be >= 1")
        _check(self.num_parallel_calls == -1 or self.num_parallel_calls >= 1, prefix,
               "num_parallel_calls", "must be -1 (AUTOTUNE) or >= 1")
        _check(self.service is None or re.fullmatch(SERVICE_RE, self.service) is not None, prefix,
               "service", "must be null, local, local:N (N >= 1 worker processes) or grpc://host:port")
        _check(0.0 < self.max_dicom_mib < float("inf"), prefix, "max_dicom_mib",
               "must be a positive number of MiB")


@dataclass(frozen=True)
class AugmentConfig:
    hflip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    gamma: float = 0.2
    color_p: float = 0.5
    shift: float = 0.0625
    scale: float = 0.1
    rotate: float = 10.0
    affine_p: float = 0.5
    elastic_p: float = 0.0
    grid_distortion_p: float = 0.0
    optical_distortion_p: float = 0.0
    clahe_p: float = 0.0

    def validate(self, prefix: str) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "hflip" or f.name.endswith("_p"):
                _check(0.0 <= value <= 1.0, prefix, f.name, "is a probability in [0, 1]")
            else:
                _check(value >= 0.0, prefix, f.name, "must be >= 0")
        _check(self.gamma < 1.0, prefix, "gamma", "must be < 1 (gamma is drawn from 1 +- gamma)")
        _check(self.scale < 1.0, prefix, "scale", "must be < 1")

    @property
    def heavy(self) -> bool:
        """True when an albumentations-only transform is switched on."""
        return any(p > 0 for p in (self.elastic_p, self.grid_distortion_p,
                                   self.optical_distortion_p, self.clahe_p))


GROUP_NORM_GROUPS = 8  # model.norm: group (the seed pipeline's GroupNorm, g = 8)


@dataclass(frozen=True)
class ModelConfig:
    encoder: Literal["resnet18", "resnet34", "resnet50"] = "resnet34"
    encoder_weights: str = "imagenet"
    decoder_filters: tuple[int, ...] = (256, 128, 64, 32, 16)
    attention: Literal["none", "scse"] = "scse"
    plain_taps: bool = False
    skip_dropout: float = 0.1
    head_dropout: float = 0.5
    head_pool: Literal["avg", "avgmax"] = "avg"
    bn_momentum: float = 0.99
    # Initial probability of the mask output: its bias starts at log(p / (1 - p)) (RetinaNet's
    # prior initialisation). With a zero bias (0.5) every image starts predicted full and the
    # first steps go into pushing the ~99 % of empty pixels down: on data we were not tuned on
    # the demo budget then learned nothing (README, "Does a run learn?").
    mask_prior: float = 0.01
    # BatchNorm statistics over the whole global batch (all replicas of all workers) instead of
    # each replica's share: at 1024 px a GPU holds 1-2 images, too few for batch statistics.
    sync_batchnorm: bool = False
    # unetpp: UNet++ nested dense skips (Zhou et al. 2018) on the same encoder, head and outputs.
    decoder: Literal["unet", "unetpp"] = "unet"
    # Normalisation of the decoder's conv blocks. The encoder keeps sm's BatchNorm either way:
    # its ImageNet weights are BatchNorm statistics, which a GroupNorm has no place for.
    norm: Literal["batch", "group"] = "batch"

    def validate(self, prefix: str) -> None:
        _check(0.0 < self.bn_momentum < 1.0, prefix, "bn_momentum", "must be in (0, 1)")
        _check(0.0 < self.mask_prior < 1.0, prefix, "mask_prior", "must be in (0, 1)")
        _check(len(self.decoder_filters) == 5 and all(f > 0 for f in self.decoder_filters),
               prefix, "decoder_filters", "must be 5 positive integers")
        _check(0.0 <= self.skip_dropout < 1.0, prefix, "skip_dropout", "must be in [0, 1)")
        _check(0.0 <= self.head_dropout < 1.0, prefix, "head_dropout", "must be in [0, 1)")
        _check(bool(self.encoder_weights), prefix, "encoder_weights",
               "must be imagenet, none or a path to a .h5 weights file")
        _check(self.norm != "group" or all(f % GROUP_NORM_GROUPS == 0 for f in self.decoder_filters),
               prefix, "norm", f"group needs decoder_filters divisible by {GROUP_NORM_GROUPS}")


# The mask losses build_losses knows (tfpneumo.training.losses.MASK_KINDS reads them from here)
MaskLoss = Literal["bce", "dice", "log_dice", "focal", "lovasz", "ohem_bce", "combo"]


@dataclass(frozen=True)
class LossConfig:
    mask: MaskLoss = "combo"
    combo_bce: float = 3.0
    combo_dice: float = 1.0
    combo_focal: float = 4.0
    combo_lovasz: float = 0.0
    log_dice_gamma: float = 0.3
    focal_gamma: float = 2.0
    # None: no alpha weighting, -(1-p_t)^gamma log(p_t) on every pixel (the 1st place's focal).
    focal_alpha: float | None = 0.25
    # Dice smoothing s in (2 sum(pt) + s) / (sum(p) + sum(t) + s); per image, or over the whole
    # batch as one volume when dice_per_image is false (the 1st and 4th places' Dice).
    dice_smooth: float = 1.0
    dice_per_image: bool = True
    ohem_ratio: float = 0.1
    mask_positives_only: bool = True
    mask_weight: float = 1.0
    label_weight: float = 0.5
    # sum: the combo's terms as weighted (sum w_i L_i); mean: that sum over the number of terms.
    reduce: Literal["sum", "mean"] = "sum"
    # Boundary loss (Kervadec et al. 2019), mean of p * signed distance to the truth's boundary,
    # added to the mask loss with this weight, reached linearly over boundary_ramp_epochs
    # epochs (0: from the start).
    boundary_weight: float = 0.0
    boundary_ramp_epochs: int = 0
    # ohem_bce: OHEM on the truth's positive and negative pixels separately, each keeping at least
    # the smaller class's pixel count; ohem_rescale: scaled to the plain BCE's value.
    ohem_per_class: bool = False
    ohem_rescale: bool = False

    def validate(self, prefix: str) -> None:
        for name in ("combo_bce", "combo_dice", "combo_focal", "combo_lovasz", "mask_weight",
                     "label_weight", "log_dice_gamma", "focal_gamma", "boundary_weight"):
            _check(getattr(self, name) >= 0.0, prefix, name, "must be >= 0")
        _check(self.focal_alpha is None or 0.0 <= self.focal_alpha <= 1.0, prefix, "focal_alpha",
               "must be in [0, 1], or null for no alpha weighting")
        _check(self.dice_smooth > 0.0, prefix, "dice_smooth", "must be > 0")
        _check(self.boundary_ramp_epochs >= 0, prefix, "boundary_ramp_epochs", "must be >= 0")
        _check(self.dice_per_image or not self.mask_positives_only
               or self.mask not in ("dice", "combo"), prefix, "dice_per_image",
               "false (one Dice over the batch) needs mask_positives_only: false (that average "
               "is over images)")
        _check(0.0 < self.ohem_ratio <= 1.0, prefix, "ohem_ratio", "must be in (0, 1]")
        _check(self.mask != "combo" or self.combo_bce + self.combo_dice + self.combo_focal
               + self.combo_lovasz > 0, prefix, "combo_bce", "combo needs a positive weight")
        for name in ("ohem_per_class", "ohem_rescale"):  # would be silently ignored otherwise
            _check(not getattr(self, name) or self.mask == "ohem_bce", prefix, name,
                   "applies to mask: ohem_bce only")


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 3e-4
    weight_decay: float = 1e-4
    encoder_lr_mult: float = 1.0
    clipnorm: float = 1.0
    accumulation_steps: int = 1
    schedule: Literal["constant", "cosine", "onecycle", "cosine_restarts"] = "cosine"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    restart_epochs: float = 10.0
    restart_mult: float = 1.0

    def validate(self, prefix: str) -> None:
        _check(self.lr > 0, prefix, "lr", "must be > 0")
        _check(self.weight_decay >= 0, prefix, "weight_decay", "must be >= 0")
        _check(0 < self.encoder_lr_mult <= 1.0, prefix, "encoder_lr_mult", "must be in (0, 1]")
        _check(self.clipnorm >= 0, prefix, "clipnorm", "must be >= 0 (0 = off)")
        _check(self.accumulation_steps >= 1, prefix, "accumulation_steps", "must be >= 1")
        _check(self.warmup_epochs >= 0, prefix, "warmup_epochs", "must be >= 0")
        _check(0 <= self.min_lr_ratio < 1, prefix, "min_lr_ratio", "must be in [0, 1)")
        _check(self.restart_epochs > 0, prefix, "restart_epochs", "must be > 0")
        _check(self.restart_mult >= 1, prefix, "restart_mult", "must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    steps_per_epoch: int = 0
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = "auto"
    jit_compile: Literal["auto", "on", "off"] = "auto"
    strategy: Literal["auto", "one_device", "mirrored", "multi_worker"] = "auto"
    freeze_encoder_epochs: int = 0
    val_thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6)
    val_min_area: float = 0.0015
    top_k: int = 3
    swa_epochs: int = 0
    swa_bn_steps: int = 50
    tensorboard_images: int = 4
    stages: tuple[Any, ...] = ()

    def validate(self, prefix: str) -> None:
        _check(self.epochs >= 1, prefix, "epochs", "must be >= 1")
        _check(self.steps_per_epoch >= 0, prefix, "steps_per_epoch", "must be >= 0 (0 = one pass)")
        _check(0 <= self.freeze_encoder_epochs <= self.epochs, prefix, "freeze_encoder_epochs",
               "must be in [0, epochs]")
        _check(len(self.val_thresholds) >= 1 and all(0 < t < 1 for t in self.val_thresholds),
               prefix, "val_thresholds", "must be one or more thresholds in (0, 1)")
        _check(0.0 <= self.val_min_area < 1.0, prefix, "val_min_area", "must be in [0, 1)")
        _check(self.top_k >= 1, prefix, "top_k", "must be >= 1")
        _check(0 <= self.swa_epochs <= self.epochs, prefix, "swa_epochs", "must be in [0, epochs]")
        _check(self.swa_bn_steps >= 1, prefix, "swa_bn_steps", "must be >= 1")
        _check(self.tensorboard_images >= 0, prefix, "tensorboard_images", "must be >= 0")
        names = []
        for i, stage in enumerate(self.stages):
            _check(isinstance(stage, dict) and set(stage) <= {"name", "set"}
                   and isinstance(stage.get("name"), str) and isinstance(stage.get("set", {}), dict),
                   prefix, f"stages[{i}]", "must be a mapping {name: str, set: {section.key: value}}")
            _check(stage["name"].replace("_", "").replace("-", "").isalnum(), prefix,
                   f"stages[{i}].name", "must be letters, digits, - or _")
            names.append(stage["name"])
        _check(len(set(names)) == len(names), prefix, "stages", "stage names must be unique")


@dataclass(frozen=True)
class Config:
    experiment: str = "baseline"
    seed: int = 0
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def stage_configs(self) -> list[tuple[str, Config]]:
        """``[(name, config)]`` for each training stage; one stage "main" when none are set.

        A stage's ``set`` holds dotted overrides (``data.image_size: 1024``) applied on top of
        this config; each stage starts from the previous stage's final weights.
        """
        if not self.train.stages:
            return [("main", self)]
        base = to_dict(self)
        base["train"]["stages"] = []
        out = []
        for stage in self.train.stages:
            raw = base
            for dotted, value in stage.get("set", {}).items():
                raw = _merge(raw, _parse_set(f"{dotted}={yaml.safe_dump(value)}"))
            out.append((stage["name"], _build(Config, raw, f"train.stages.{stage['name']}.")))
        return out

    def validate(self, prefix: str = "") -> None:
        if self.train.stages:
            self.stage_configs()  # rejects unknown keys and bad values inside stages now
        _check(bool(_FOLDER_NAME.fullmatch(self.experiment)) and self.experiment not in (".", ".."),
               prefix, "experiment", "must be a plain folder name (letters, digits, . _ - +, "
               "at most 128 characters)")
        # numpy and TensorFlow take 32-bit unsigned seeds; a larger one was a traceback
        _check(0 <= self.seed < 2**32, prefix, "seed", "must be in [0, 2**32)")


def _check(ok: bool, prefix: str, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key {prefix}{key}: {message}")


# ----------------------------------------------------------------------------- building

def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` and converts int -> float where needed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key {key}: invalid value {shown(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key {key}: {shown(value)} is not one of {list(choices)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key}: expected a list, got {shown(value)}")
        (item_type, *_rest) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key}: expected a mapping, got {shown(value)}")
        return _build(tp, value, f"{key}.")
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key}: expected true or false, got {shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key}: expected an integer, got {shown(value)}")
        if not -(2**31) < value < 2**32:  # TensorFlow and numpy take 32-bit values
            raise ConfigError(f"config key {key}: {shown(value)} is out of range")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key}: expected a number, got {shown(value)}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            value = math.inf
        if not math.isfinite(value):  # .inf / .nan pass every "< x" and ">= 0" check
            raise ConfigError(f"config key {key}: expected a finite number, got {shown(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key}: expected a string, got {shown(value)}")
        return value
    raise ConfigError(f"config key {key}: unsupported type {tp}")


def _build(cls: type, overrides: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in overrides:
        if key not in names:
            key = (key if isinstance(key, str) and len(key) <= SHOWN_CHARS and key.isprintable()
                   else shown(key))  # a newline in a key would split the one-line message
            raise ConfigError(f"config key {prefix}{key}: unknown key (known: {sorted(names)})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            kwargs[f.name] = _coerce(overrides[f.name], hints[f.name], prefix + f.name)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    return obj


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_set(item: str) -> dict:
    """``"data.batch_size=4"`` -> ``{"data": {"batch_size": 4}}`` (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {shown(item)}: expected section.key=value")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {shown(item)}: expected section.key=value")
    try:
        value = _safe_load(raw) if raw.strip() else ""
    except (_AliasRefused, _DuplicateKey) as e:
        raise ConfigError(f"--set {shown(item)}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {shown(item)}: value is not valid YAML ({e.__class__.__name__})") from e
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    return nested


def read_yaml(path: str | Path) -> dict:
    """Reads a YAML mapping with ``yaml.safe_load`` (Python tags are refused), aliases refused."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from e
    try:
        data = _safe_load(text)
    except (_AliasRefused, _DuplicateKey) as e:
        raise ConfigError(f"{path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({first_line(e)})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def shipped_configs() -> dict[str, Path]:
    """The configs that ship inside the package, by name: ``{"demo": .../demo.yaml, ...}``."""
    folder = importlib.resources.files("tfpneumo") / "configs"
    return {Path(f.name).stem: Path(str(f)) for f in folder.iterdir() if f.name.endswith(".yaml")}


def find_config(name: str | Path) -> Path:
    """A path as given, or the name of a shipped config (``demo`` or ``demo.yaml``)."""
    path = Path(name)
    if path.exists():
        return path
    shipped = shipped_configs()
    stem = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and stem in shipped:
        return shipped[stem]
    raise ConfigError(f"{name}: config file not found (shipped configs: {', '.join(sorted(shipped))})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file's overrides, then each ``--set key=value``."""
    raw: dict = read_yaml(find_config(path)) if path else {}
    for item in overrides:
        raw = _merge(raw, _parse_set(item))
    return _build(Config, raw)


def replace(cfg: Config, **sections: dict) -> Config:
    """A copy of ``cfg`` with some keys changed, validated: ``replace(cfg, data={"cache": p})``."""
    return _build(Config, _merge(to_dict(cfg), sections))


def to_dict(cfg: Any) -> dict:
    """The config as plain dicts and lists (YAML-safe)."""

    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return [convert(v) for v in value]
        return value

    return convert(dataclasses.asdict(cfg))


def dump_config(cfg: Config, path: str | Path) -> None:
    """Writes the resolved config (every key) as YAML, atomically."""
    from tfpneumo.files import write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
