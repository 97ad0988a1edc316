"""Which loader a run uses, and building it, both through config.LOADERS. loader=auto (the default)
takes the first loader of the table that runs here and reads where the shards are, saying so in
one line when it passes one over: DALI where it imports, else the webdataset loader, so a plain
install trains without the `dali` extra."""

import importlib
import sys

from lightning.pytorch.utilities import rank_zero_only

from ..config import LOADERS
from ..errors import ConfigError


def auto_order(augment: str, gpu: bool) -> list[str]:
    """The LOADERS names in the order loader=auto tries them: the table's (DALI first: nvJPEG on a
    GPU, and on a CPU it decodes only the paper's window of each JPEG), except that with no GPU to
    decode on, the webdataset loader goes first for the random-resized crop (data.augment=modern):
    there its DCT-scaled decode and SIMD resize (resized_crop.py) beat DALI's CPU mode
    (docs/performance.md, the CPU loader table)."""
    names = list(LOADERS)
    if not gpu and augment == "modern" and "wds" in names:
        names.remove("wds")
        names.insert(0, "wds")
    return names


def choose_loader(name: str, over_http: bool = False, augment: str = "paper", gpu: bool = False) -> str:
    """The loader to build for loader.name=`name` (auto or a LOADERS name): a LOADERS name.
    `over_http`: the shards are on http(s)://, which not every loader reads; `augment` and `gpu`
    (a GPU decodes) decide auto's order (auto_order)."""
    readers = " or ".join(f"loader={n}" for n, e in LOADERS.items() if e.reads_http)
    if name != "auto":
        entry = LOADERS[name]
        if over_http and not entry.reads_http:
            raise ConfigError(
                f"loader={name} reads shards from local disk and s3:// only, and data.root's shards are on "
                f"http(s)://; use {readers} (or loader=auto)"
            )
        missing = entry.missing()
        if missing:
            others = " or ".join(f"loader={n}" for n in ["auto", *LOADERS] if n != name)
            raise ConfigError(f"loader={name} but {missing}, or use {others}")
        return name
    passed = []  # (entry, why) of the loaders auto passed over
    for candidate in auto_order(augment, gpu):
        entry = LOADERS[candidate]
        why = f"{entry.title} reads no http(s):// shards" if over_http and not entry.reads_http else entry.missing()
        if why is None:
            if passed:
                notice(f"loader=auto uses {entry.title}: {passed[0]}")
            elif candidate != next(iter(LOADERS)):
                notice(f"loader=auto uses {entry.title}: the faster loader here for data.augment={augment} with no GPU")
            return candidate
        passed.append(why)
    raise ConfigError(f"loader=auto finds no loader that runs here: {'; '.join(passed)}")


def build(name: str, plan, augment, settings, **common):
    """Loader `name` (a LOADERS name) of `plan`, by its module's build; the module is imported only
    now, so DALI's (which imports nvidia.dali) only when DALI is used."""
    return importlib.import_module(LOADERS[name].module).build(plan, augment, settings, **common)


def notice(text: str) -> None:
    if rank_zero_only.rank == 0:
        print(f"notice: {text}", file=sys.stderr, flush=True)


def warning(text: str) -> None:
    if rank_zero_only.rank == 0:
        print(f"warning: {text}", file=sys.stderr, flush=True)
