"""Learning-rate schedules as a multiplier of the base rate, evaluated every step.

Epochs are fractional (step / steps_per_epoch) so warmup and cosine are smooth; the paper's
step drops happen at whole epochs.
"""

import math

from ..errors import ConfigError


def step_factor(epoch: float, milestones: list, gamma: float) -> float:
    """0.01 -> 1e-3 -> 1e-4 at the given epochs: the 2012 run divided by 10 by hand (paper 5)."""
    return gamma ** sum(int(epoch) >= m for m in milestones)


def cosine_factor(epoch: float, max_epochs: float, min_factor: float) -> float:
    t = min(max(epoch / max_epochs, 0.0), 1.0)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))


def poly_factor(epoch: float, max_epochs: float, power: float) -> float:
    """(1 - epoch / max_epochs) ** power, reaching 0 at the end: nvcaffe's lr_policy "poly"
    (SGDSolver::GetLearningRate, src/caffe/solvers/sgd_solver.cpp), the decay of the LARS
    authors' AlexNet-BN solvers (power 2)."""
    return max(1.0 - epoch / max_epochs, 0.0) ** power


def warmup_factor(epoch: float, warmup_epochs: float, start: float = 0.0) -> float:
    """Linear warmup from `start` times the rate (a small floor when 0), for large global
    batches (Goyal et al. 2017; nvcaffe's rampup_lr -> base_lr over rampup_interval)."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return 1.0
    return max(start + (1.0 - start) * epoch / warmup_epochs, 1e-3)


def lr_factor(
    name: str,
    epoch: float,
    *,
    max_epochs: float,
    milestones=(),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
    warmup_from: float = 0.0,
    min_factor: float = 0.0,
    power: float = 2.0,
) -> float:
    warmup = warmup_factor(epoch, warmup_epochs, warmup_from)
    if name == "poly":
        # As nvcaffe's solver (the version of the LARS runs, Sep 2017): the warm-up replaces the
        # decay while it lasts, and the decay counts epochs from 0, not from the warm-up's end.
        return warmup if epoch < warmup_epochs else poly_factor(epoch, max_epochs, power)
    if name == "step":
        base = step_factor(epoch, list(milestones), gamma)
    elif name == "cosine":
        base = cosine_factor(epoch - warmup_epochs, max(max_epochs - warmup_epochs, 1e-9), min_factor)
    elif name in ("constant", "plateau"):
        base = 1.0  # plateau drops are applied by ReduceLROnPlateau on top of this
    else:
        raise ConfigError(
            f"optim.schedule.name={name}: unknown schedule; choose step, plateau, cosine, constant or poly"
        )
    return base * warmup
