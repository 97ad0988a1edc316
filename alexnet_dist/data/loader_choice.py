"""Which loader a run uses. loader=auto (the default) takes DALI where it imports and falls back to
the webdataset loader, saying so in one line, so a plain install trains without the `dali` extra."""

import sys

from lightning.pytorch.utilities import rank_zero_only

from ..errors import ConfigError


def dali_missing() -> str | None:
    """Why NVIDIA DALI cannot be used here, or None when it imports."""
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: a wheel whose native libraries do not load
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def choose_loader(name: str) -> str:
    """The loader to build for loader.name=`name` (auto, dali or wds): dali or wds."""
    if name == "wds":
        return name
    missing = dali_missing()
    if missing and name == "dali":
        raise ConfigError(
            f"loader=dali but NVIDIA DALI does not import here ({missing}); install it with "
            "pip install 'alexnet_dist[dali]', or use loader=auto or loader=wds"
        )
    if missing:
        if rank_zero_only.rank == 0:
            print(
                f"notice: loader=auto uses the webdataset loader: NVIDIA DALI does not import here ({missing}); "
                "pip install 'alexnet_dist[dali]' for DALI",
                file=sys.stderr,
                flush=True,
            )
        return "wds"
    return "dali"
