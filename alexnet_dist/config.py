"""The shape of alexnet-train's configuration: every setting's type, default and allowed values,
declared once, and the checks between settings.

Hydra composes plain YAML; `load` merges it into these dataclasses (which names an unknown key, a
value of the wrong type or outside a fixed set) and returns typed objects that the rest of the
package takes as arguments. `model` and `trainer` stay open: their keys are the chosen model's
arguments and lightning.pytorch.Trainer's, checked against those signatures where they are used.
"""

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, make_dataclass
from enum import Enum
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .credentials import credentials_in, redact
from .errors import ConfigError


class Choice(str, Enum):
    """A setting with a fixed set of values; equal to, printed and formatted as its plain string."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


def choice(name: str, values: str) -> type[Choice]:
    return Choice(name, [(v, v) for v in values.split()])


OptimName = choice("OptimName", "krizhevsky sgd lars")
ScheduleName = choice("ScheduleName", "step plateau cosine constant poly")
NonFinite = choice("NonFinite", "stop skip")
LoaderDevice = choice("LoaderDevice", "auto cpu gpu")
Layout = choice("Layout", "NCHW NHWC")
DType = choice("DType", "float32 bfloat16")
BadImages = choice("BadImages", "skip error")
Augment = choice("Augment", "paper modern")
OptimImpl = choice("OptimImpl", "foreach loop fused")
CommHook = choice("CommHook", "none bf16 fp16")
Backend = choice("Backend", "auto nccl gloo")
LoggerName = choice("LoggerName", "wandb csv")
SignalName = choice("SignalName", "USR1 USR2 TERM")


@dataclass
class Data:
    root: str = MISSING
    batch_size: int = 128  # global: divided by the number of ranks
    val_batch_size: int | None = None  # global; None: batch_size
    crop: int = 224
    val_resize: int | None = 256
    flip: bool = True
    mean: list[float] | None = None  # None: the train split's own, from the manifest
    std: list[float] | None = None
    augment: Augment = Augment.paper
    colour_noise: float = 0.0
    colour_noise_until_epoch: int | None = None
    train_scale: float = 1.0
    test_views: int = 1
    mean_image: bool = False
    partitions: int = 192  # the epoch's order in parts: a run trains on any number of processes dividing it
    shuffle_window: int = 2000  # samples shuffled together within a part
    trace: str | None = None  # a folder: each rank writes the keys each training step read there
    cache_dir: str | None = None  # node-local folder caching remote (s3://, http) tars; None: stream them
    cache_limit_gb: float = 100.0  # the cache's size limit (10^9 bytes); least recently read tars go first
    prefetch_shards: int = 2  # remote tars each reader downloads into the cache ahead of reading them

    def __post_init__(self):
        check_views(self.test_views, "data.test_views")
        if not self.cache_limit_gb > 0:
            raise ConfigError(f"data.cache_limit_gb={self.cache_limit_gb}: give the cache's size limit in GB, above 0")
        if self.prefetch_shards < 0:
            raise ConfigError(f"data.prefetch_shards={self.prefetch_shards}: give 0 (no prefetching) or more")


@dataclass
class StoreLimits:
    """How long a remote store (s3://, http(s)://) may take (data/store.py): a read of n bytes
    (at most one buffer) is given up after deadline_s + n / min_rate_kbs / 1000 seconds, a
    connection or a stalled socket after deadline_s, and tried again after each of `waits`.
    Read from ALEXNET_STORE_DEADLINE_S, ALEXNET_STORE_MIN_RATE_KBS and ALEXNET_STORE_WAITS
    (seconds, comma-separated), so that every command and every loader process takes them."""

    deadline_s: float = 20.0
    min_rate_kbs: float = 64.0  # 10^3 bytes a second: a store trickling slower fails the read
    waits: list[float] = field(default_factory=lambda: [0.5, 1, 2, 4, 8])  # before each new try

    def __post_init__(self):
        if not (self.deadline_s > 0 and self.min_rate_kbs > 0 and all(w >= 0 for w in self.waits)):
            raise ConfigError(
                f"deadline_s={self.deadline_s:g}, min_rate_kbs={self.min_rate_kbs:g}, waits={self.waits}: the deadline "
                "and the rate must be above 0, the waits 0 or more"
            )

    def read_time(self, n: int) -> float:
        """The longest a read of n bytes may take."""
        return self.deadline_s + n / (self.min_rate_kbs * 1000)

    def bound(self, n: int) -> float:
        """The longest a read of n bytes takes through every try: what a run waits for a store at most."""
        # each try: opening (a connection, the first bytes of the answer) within deadline_s, the read,
        # and its last piece may wait one socket timeout (deadline_s) before the time is looked at
        return (len(self.waits) + 1) * (self.read_time(n) + 2 * self.deadline_s) + sum(self.waits)


def needs_package(package: str, title: str, extra: str) -> Callable[[], str | None]:
    """A loader's `missing`: why `package` does not import here, or None when it does."""

    def missing() -> str | None:
        try:
            importlib.import_module(package)
        except (ImportError, OSError) as exc:  # OSError: a wheel whose native libraries do not load
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return f"{title} does not import here ({why}); install it with pip install 'alexnet_dist[{extra}]'"
        return None

    return missing


@dataclass
class WdsSettings:
    """The webdataset loader's own settings (data/wds.py)."""

    workers: int = 2  # worker processes per rank (0: load in the training process)


@dataclass
class DaliSettings:
    """NVIDIA DALI's own settings (data/dali.py)."""

    device: LoaderDevice = LoaderDevice.auto  # auto: gpu when the model trains on a GPU, else cpu
    threads: int = 2  # DALI CPU threads per rank
    layout: Layout = Layout.NCHW  # NHWC: channels-last memory (the webdataset loader gives NCHW only)


@dataclass(frozen=True)
class LoaderEntry:
    """One loader of the LOADERS table: everything the rest of the package asks about it."""

    module: str  # the module whose `build(plan, augment, settings, ...)` makes it; imported only then
    settings: type  # its own settings, loader.KEY for each field; the keys every loader reads are in Loader
    title: str  # what one-line notices call it
    reads_http: bool  # takes shards from http(s):// (every loader takes local paths and s3://)
    missing: Callable[[], str | None] = lambda: None  # why it cannot run here; None when it can


# The loaders, in the order loader=auto tries them: the first that runs here and can read the data.
# A new loader is a module in data/ with a `build` like wds.py's, one entry here (with its settings
# dataclass above) and a conf/loader/NAME.yaml.
LOADERS: dict[str, LoaderEntry] = {
    "dali": LoaderEntry(
        "alexnet_dist.data.dali",
        DaliSettings,
        "DALI",
        reads_http=True,  # samples are read in Python (data/samples.py), as the webdataset loader reads them
        missing=needs_package("nvidia.dali", "NVIDIA DALI", "dali"),
    ),
    "wds": LoaderEntry("alexnet_dist.data.wds", WdsSettings, "the webdataset loader", reads_http=True),
}


@dataclass
class LoaderCommon:
    """The settings every loader reads."""

    name: str = "auto"  # a name in LOADERS, or auto
    prefetch: int = 2
    dtype: DType = DType.float32  # what batches are normalised to
    bad_images: BadImages = BadImages.skip

    def __post_init__(self):
        if self.name != "auto" and self.name not in LOADERS:
            raise ConfigError(
                f"loader.name: Invalid value '{self.name}', expected one of [{', '.join(['auto', *LOADERS])}]; "
                "fix the override or the config file"
            )


def own_fields() -> list[tuple[str, Any, Any]]:
    """Every loader's own settings as (name, type, field) for the flat Loader group. A key two
    loaders share must mean the same to both: the same type and default."""
    seen = {}
    for name, entry in LOADERS.items():
        for f in fields(entry.settings):
            if f.name in seen and seen[f.name][:2] != (f.type, f.default):
                raise TypeError(f"loader.{f.name}: loader {name} declares it unlike another loader does")
            seen[f.name] = (f.type, f.default, field(default=f.default))
    return [(key, kind, spec) for key, (kind, _, spec) in seen.items()]


# loader.KEY on the command line, flat for every loader (loader=wds loader.workers=0, loader=dali
# loader.threads=4): the keys every loader reads and each loader's own. A run reads its loader's own
# keys and ignores another loader's, so an experiment may set both (loader=auto may pick either).
# A key of no loader is refused in one line, naming it.
Loader = make_dataclass("Loader", own_fields(), bases=(LoaderCommon,))
Loader.__doc__ = "Every loader's settings, flat: LoaderCommon's and each LOADERS entry's own."


def own_keys(name: str) -> tuple[str, ...]:
    """The loader.KEYs of loader `name` (a LOADERS name) beyond those every loader reads."""
    return tuple(f.name for f in fields(LOADERS[name].settings))


@dataclass
class Schedule:
    name: ScheduleName = ScheduleName.cosine
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_from: float = 0.0  # the factor of the rate the warm-up starts at (nvcaffe's rampup_lr / base_lr)
    min_factor: float = 0.0
    power: float = 2.0  # poly: (1 - epoch / max_epochs) ** power (nvcaffe's lr_policy "poly")
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
    bias_weight_decay: bool = False  # true: biases are decayed too (Caffe's default decay_mult 1, nvcaffe's LARS runs)
    impl: OptimImpl = OptimImpl.foreach
    trust: float = 0.001  # lars: the trust coefficient of each layer's rate (You et al. 2017)
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
    backend: Backend = Backend.auto
    sync_batchnorm: bool = False  # BatchNorm statistics over the global batch (training/sync_batchnorm.py)


@dataclass
class Compute:
    channels_last: bool = False
    compile: bool = False
    fuse_norms: bool = False  # compile only the LRN and spatial-norm blocks (models/layers.py)


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


@dataclass
class EvalData:
    root: str | None = None  # None: data.root of the run's config.yaml


@dataclass
class Eval:
    """alexnet-eval's settings (KEY=VALUE on its command line)."""

    ckpt_path: str | None = None
    views: int = 1
    data: EvalData = field(default_factory=EvalData)
    loader: str | None = None  # None: the run's own loader
    batch_size: int = 100
    probs: str | None = None
    model: str | None = None  # for a plain state dict: the network it belongs to

    def __post_init__(self):
        check_views(self.views, "views")


@dataclass
class Export:
    """alexnet-export's settings."""

    ckpt_path: str | None = None
    out: str | None = None  # the folder to write into
    data: EvalData = field(default_factory=EvalData)  # for a checkpoint of an earlier release


@dataclass
class Predict:
    """alexnet-predict's settings."""

    model: str | None = None  # an export's folder or a checkpoint
    images: str | None = None  # files or folders, comma-separated
    top_k: int = 5
    views: int | None = None  # None: the views the run validated with

    def __post_init__(self):
        if self.views is not None:
            check_views(self.views, "views")
        if self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k}: give 1 or more")


T = TypeVar("T")


def make(schema: type[T], values: Any = None) -> T:
    """`values` (a mapping, a DictConfig, or an object of the schema) merged over the schema's
    defaults and checked: the one way settings become objects. Raises ConfigError naming the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values if values is not None else {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or schema.__name__.lower()
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{key}: {reason}; fix the override or the config file") from None


def flat(tree: Any, prefix: str = "") -> dict:
    """A nested mapping's values by dotted key (data.root, optim.schedule.name, ...); an empty
    mapping has no key."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}


def from_command_line(schema: type[T], items: list[str]) -> T:
    """KEY=VALUE items of a command line as typed settings of `schema`: the same names, types and
    one-line errors as alexnet-train's overrides; an unknown key names the nearest that exists."""
    keys = flat(plain(schema()))
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{item}: expected KEY=VALUE; the keys: {', '.join(keys)}")
        if key not in keys:
            nearest = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
            hint = f"the nearest is {nearest[0]}" if nearest else f"the keys: {', '.join(keys)}"
            raise ConfigError(f"{key}: no such setting ({hint}); fix the spelling")
        values[key] = value
    return make(schema, OmegaConf.from_dotlist([f"{k}={v}" for k, v in values.items()]))


def describe(schema: type) -> str:
    """Every key of `schema` with its default, one per line, for a command's --help."""
    return "\n".join(f"  {key}={'null' if value is None else value}" for key, value in flat(plain(schema())).items())


def plain(settings: Any) -> dict:
    """Settings as plain dicts, lists and strings: what checkpoints and W&B store."""
    return OmegaConf.to_container(OmegaConf.structured(settings), enum_to_str=True)


def load(cfg: DictConfig) -> Train:
    """alexnet-train's composed config as typed settings, checked within and across groups."""
    settings = make(Train, cfg)
    check(settings)
    return settings


def check(s: Train) -> None:
    """What single settings allow but their combination does not; refused before any work."""
    if problem := credentials_setting(plain(s)):  # before the run's config record stores it
        raise ConfigError(problem)
    if s.loader.dtype == DType.bfloat16 and not str(s.trainer["precision"]).startswith("bf16"):
        raise ConfigError(
            f"loader.dtype=bfloat16 needs trainer.precision=bf16-mixed (or bf16-true), not "
            f"{s.trainer['precision']}; or keep loader.dtype=float32"
        )
    devices, nodes = s.trainer["devices"], s.trainer["num_nodes"]
    if isinstance(devices, int) and isinstance(nodes, int):
        for key in ("batch_size", "val_batch_size"):
            per_rank(getattr(s.data, key), devices * nodes, f"data.{key}")
        check_world(s.data.partitions, s.data.batch_size, devices * nodes)


def credentials_setting(tree: dict) -> str | None:
    """One line for the first setting of `tree` (nested, as a config holds it) that names a
    location carrying a credential, shown as ***; None when none does."""
    for key, value in flat(tree).items():
        if value is not None and (why := credentials_in(str(value))):
            return f"{key}={redact(str(value))}: {why}"
    return None


def check_views(views: int, key: str) -> None:
    """The test views: the centre crop, or the paper's ten (section 4.1)."""
    if views not in (1, 10):
        raise ConfigError(f"{key}={views}: choose 1 (centre crop) or 10 (corners, centre and mirrors)")


def check_world(partitions: int, global_batch: int, world: int) -> None:
    """Training's order of samples comes in `partitions` parts (data/plan.py), so it runs (and
    resumes) on a number of processes that divides both that and the global batch; else one line
    naming the numbers that do."""
    if partitions < 1:
        raise ConfigError(f"data.partitions={partitions}: give 1 or more")
    if partitions % world or global_batch % world:
        sizes = [w for w in range(1, partitions + 1) if partitions % w == 0 and global_batch % w == 0]
        raise ConfigError(
            f"{world} processes cannot share this run's order of samples (data.partitions={partitions}, "
            f"data.batch_size={global_batch}): it trains on {', '.join(map(str, sizes))} processes; run on one "
            f"of those, or start the run with data.partitions and data.batch_size multiples of {world}"
        )


def per_rank(global_batch: int | None, world: int, key: str) -> int | None:
    """The share of a global batch each of `world` ranks takes; ConfigError if it does not divide."""
    if global_batch is None:
        return None
    if global_batch % world:
        raise ConfigError(
            f"{key}={global_batch} is the global batch and must divide by the {world} processes "
            f"(trainer.devices x trainer.num_nodes); pick a multiple of {world}"
        )
    return global_batch // world
