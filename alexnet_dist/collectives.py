"""Collectives of the bookkeeping (not of the gradients), shared by the data module and training."""

import torch.distributed as dist


def gather_to_rank_zero(mine) -> list:
    """Every rank's `mine`, in rank order, on rank zero (the rank that writes checkpoints); the
    others get [mine] only, so no rank but zero holds or receives world-size-many states."""
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, everyone, dst=0)
    return everyone if everyone is not None else [mine]
