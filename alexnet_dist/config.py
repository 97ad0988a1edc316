"""The shape of alexnet-train's configuration, checked before any work starts.

Hydra composes plain YAML; merging it into these dataclasses catches unknown keys and values of
the wrong type or outside a fixed set, naming the key. `model` and `trainer` stay open: their keys
are the chosen model's arguments and lightning.pytorch.Trainer's.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

Choice = lambda name, *values: Enum(name, {v: v for v in values})  # noqa: E731
OptimName = Choice("OptimName", "krizhevsky", "sgd")
ScheduleName = Choice("ScheduleName", "step", "plateau", "cosine", "constant")
NonFinite = Choice("NonFinite", "stop", "skip")
LoaderName = Choice("LoaderName", "auto", "dali", "wds")
LoaderDevice = Choice("LoaderDevice", "auto", "cpu", "gpu")
Layout = Choice("Layout", "NCHW", "NHWC")
DType = Choice("DType", "float32", "bfloat16")
BadImages = Choice("BadImages", "skip", "error")
Augment = Choice("Augment", "paper", "modern")
OptimImpl = Choice("OptimImpl", "foreach", "loop", "fused")
CommHook = Choice("CommHook", "none", "bf16", "fp16")
LoggerName = Choice("LoggerName", "wandb", "csv")
SignalName = Choice("SignalName", "USR1", "USR2", "TERM")


@dataclass
class Data:
    root: str = MISSING
    batch_size: int = 128
    val_batch_size: int | None = None
    crop: int = 224
    val_resize: int | None = 256
    flip: bool = True
    mean: list[float] | None = None
    std: list[float] | None = None
    augment: Augment = Augment.paper
    colour_noise: float = 0.0
    colour_noise_until_epoch: int | None = None
    train_scale: float = 1.0
    test_views: int = 1
    mean_image: bool = False


@dataclass
class Loader:
    """The union of both loaders' settings; each loader's YAML sets the ones it reads."""

    name: LoaderName = LoaderName.auto
    shuffle_buffer: int = 2000
    prefetch: int = 2
    workers: int = 2  # wds
    device: LoaderDevice = LoaderDevice.auto  # dali
    threads: int = 2  # dali
    layout: Layout = Layout.NCHW  # dali
    dtype: DType = DType.float32  # dali
    bad_images: BadImages = BadImages.skip  # dali


@dataclass
class Schedule:
    name: ScheduleName = ScheduleName.cosine
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_factor: float = 0.0
    patience: int = 2
    threshold: float = 1e-3
    max_drops: int = 3


@dataclass
class LayerRate:
    layer: str = MISSING
    from_epoch: float = MISSING
    lr: float = MISSING


@dataclass
class Optim:
    name: OptimName = OptimName.sgd
    lr: float = 0.01
    reference_batch: int | None = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    on_nonfinite: NonFinite = NonFinite.stop
    bias_lr_mult: float = 1.0
    impl: OptimImpl = OptimImpl.foreach
    layer_rates: list[LayerRate] = field(default_factory=list)
    schedule: Schedule = field(default_factory=Schedule)


@dataclass
class Logger:
    name: LoggerName = LoggerName.wandb
    project: str = "alexnet_dist"
    entity: str | None = None
    mode: str = "offline"


@dataclass
class Checkpoint:
    every_n_steps: int | None = None
    every_n_minutes: float | None = None
    keep: int = 2


@dataclass
class Ddp:
    timeout_s: int = 600
    bucket_cap_mb: int = 25
    comm_hook: CommHook = CommHook.none


@dataclass
class Compute:
    channels_last: bool = False
    compile: bool = False


@dataclass
class PreemptionCfg:
    signal: SignalName = SignalName.USR1
    requeue: bool = True


@dataclass
class Train:
    experiment_name: str = "default"
    run_id: str = MISSING
    seed: int = 0
    resume: str = "auto"
    init_from: str | None = None
    paths: dict[str, str] = field(default_factory=dict)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    ddp: Ddp = field(default_factory=Ddp)
    compute: Compute = field(default_factory=Compute)
    preemption: PreemptionCfg = field(default_factory=PreemptionCfg)
    data: Data = field(default_factory=Data)
    loader: Loader = field(default_factory=Loader)
    optim: Optim = field(default_factory=Optim)
    logger: Logger = field(default_factory=Logger)
    model: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)


def validate(cfg: DictConfig) -> None:
    """Raises ConfigError naming the first key that is unknown, mistyped or not a valid choice."""
    try:
        OmegaConf.merge(OmegaConf.structured(Train), cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "config"
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{key}: {reason}; fix the override or the config file") from None
