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


def choose_loader(name: str, over_http: bool = False) -> str:
    """The loader to build for loader.name=`name` (auto, dali or wds): dali or wds. DALI's readers
    take local files and s3:// but no http(s):// (`over_http`: the shards are there)."""
    if name == "wds":
        return name
    if over_http:
        if name == "dali":
            raise ConfigError(
                "loader=dali reads shards from local disk and s3:// only, and data.root's shards are on "
                "http(s)://; use loader=wds (or loader=auto)"
            )
        notice("loader=auto uses the webdataset loader: DALI reads no http(s):// shards")
        return "wds"
    missing = dali_missing()
    if missing and name == "dali":
        raise ConfigError(
            f"loader=dali but NVIDIA DALI does not import here ({missing}); install it with "
            "pip install 'alexnet_dist[dali]', or use loader=auto or loader=wds"
        )
    if missing:
        notice(
            f"loader=auto uses the webdataset loader: NVIDIA DALI does not import here ({missing}); "
            "pip install 'alexnet_dist[dali]' for DALI"
        )
        return "wds"
    return "dali"


def notice(text: str) -> None:
    if rank_zero_only.rank == 0:
        print(f"notice: {text}", file=sys.stderr, flush=True)
