"""Which loader a run uses, and building it, both through config.LOADERS. loader=auto (the default)
takes the first loader of the table that runs here and reads where the shards are, saying so in
one line when it passes one over: DALI where it imports, else the webdataset loader, so a plain
install trains without the `dali` extra."""

import importlib
import sys

from lightning.pytorch.utilities import rank_zero_only

from ..config import LOADERS
from ..errors import ConfigError


def choose_loader(name: str, over_http: bool = False) -> str:
    """The loader to build for loader.name=`name` (auto or a LOADERS name): a LOADERS name.
    `over_http`: the shards are on http(s)://, which not every loader reads."""
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
    for candidate, entry in LOADERS.items():
        why = f"{entry.title} reads no http(s):// shards" if over_http and not entry.reads_http else entry.missing()
        if why is None:
            if passed:
                notice(f"loader=auto uses {entry.title}: {passed[0]}")
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
