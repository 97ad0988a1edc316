"""Optimisers: Krizhevsky's SGD rule from the 2012 code, torch's SGD, or LARS for very large
batches, with the 2012 parameter groups (weight decay on weights only, a bias learning-rate
multiplier)."""

import torch
from torch import nn

from ..errors import ConfigError


class KrizhevskySGD(torch.optim.Optimizer):
    """v <- momentum * v - lr * weight_decay * w - lr * grad;  w <- w + v   (paper section 5).

    The momentum buffer holds steps already scaled by the learning rate (as in cuda-convnet and
    Caffe); torch.optim.SGD keeps unscaled gradients there, so the two differ just after an lr
    drop: here the old, larger steps fade out over a few iterations instead of shrinking at once.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, foreach: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.foreach = foreach  # one kernel per operation over all tensors, not one per tensor

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if "velocity" not in self.state[p]:
                    self.state[p]["velocity"] = torch.zeros_like(p)
            velocities = [self.state[p]["velocity"] for p in params]
            grads = [p.grad for p in params]
            if self.foreach and params:
                torch._foreach_mul_(velocities, momentum)
                torch._foreach_add_(velocities, grads, alpha=-lr)
                if wd:
                    torch._foreach_add_(velocities, params, alpha=-lr * wd)
                torch._foreach_add_(params, velocities)
                continue
            for p, v, g in zip(params, velocities, grads, strict=True):
                v.mul_(momentum).add_(g, alpha=-lr)
                if wd:
                    v.add_(p, alpha=-lr * wd)
                p.add_(v)
        return loss


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You, Gitman and Ginsburg 2017), the rule behind the
    large-batch AlexNet records (Jia et al. 2018, global batch 64K). Each weight tensor's step is
    scaled by its own trust ratio, so no layer's update outgrows its weights at the large rates
    such batches need:

        local = trust * |w| / (|g| + weight_decay * |w|)
        v <- momentum * v + lr * local * (g + weight_decay * w);   w <- w - v

    Biases and other 1-d parameters take the plain step (local = 1), as in the LARS papers.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, trust: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust=trust))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, wd, trust = group["lr"], group["momentum"], group["weight_decay"], group["trust"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                step = p.grad.add(p, alpha=wd) if wd else p.grad.clone()
                if p.ndim > 1:
                    w, g = p.norm(), p.grad.norm()
                    ratio = trust * w / (g + wd * w)
                    # a fresh (zero) or gradient-free tensor keeps the plain rate
                    step.mul_(torch.where((w > 0) & (g > 0), ratio, torch.ones_like(ratio)))
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p)
                velocity = state["velocity"].mul_(momentum).add_(step, alpha=lr)
                p.sub_(velocity)
        return loss


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, bias_lr_mult: float, layers: tuple = ()
) -> list[dict]:
    """Weights get the weight decay; biases (and any other 1-d parameter) get none and a
    learning rate bias_lr_mult times larger (layer-params-145.cfg: epsB = 2 * epsW). Each layer
    named in `layers` (a parameter-name prefix such as "conv1") gets groups of its own, so its
    rate can be changed alone (the 2012 run slowed, then froze conv1)."""
    owner = {n: next((x for x in layers if n.startswith(f"{x}.")), None) for n, _ in model.named_parameters()}
    groups = []
    for layer in (*layers, None):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and owner[n] == layer]
        suffix = f"/{layer}" if layer else ""
        groups += [
            {
                "params": [p for _, p in named if p.ndim > 1],
                "lr": lr,
                "weight_decay": weight_decay,
                "name": f"weights{suffix}",
                "layer": layer,
            },
            {
                "params": [p for _, p in named if p.ndim <= 1],
                "lr": lr * bias_lr_mult,
                "weight_decay": 0.0,
                "name": f"biases{suffix}",
                "layer": layer,
            },
        ]
    if any(not g["params"] for g in groups if g["layer"]):
        missing = sorted({g["layer"] for g in groups if g["layer"] and not g["params"]})
        raise ConfigError(
            f"optim.layer_rates names {', '.join(missing)}, which this model has no parameters for; "
            f"its layers: {', '.join(sorted({n.split('.')[0] for n, _ in model.named_parameters()}))}"
        )
    return groups


def scaled_lr(lr: float, global_batch: int, reference_batch: int | None) -> float:
    """Linear scaling (Krizhevsky 2014; Goyal et al. 2017): lr grows with the global batch."""
    return lr * global_batch / reference_batch if reference_batch else lr


IMPLEMENTATIONS = ("foreach", "loop", "fused")


def build_optimizer(
    name: str, groups: list[dict], lr: float, momentum: float, impl: str = "foreach", trust: float = 0.001
) -> torch.optim.Optimizer:
    """`impl`: foreach (one kernel per operation over all tensors), loop (one per tensor), or
    fused (one kernel for the whole update; torch's SGD only). `trust`: LARS's coefficient."""
    if impl not in IMPLEMENTATIONS:
        raise ConfigError(f"optim.impl={impl}: choose one of {', '.join(IMPLEMENTATIONS)}")
    if name == "krizhevsky":
        if impl == "fused":
            raise ConfigError("optim.impl=fused exists for optim=sgd only; use optim.impl=foreach with krizhevsky")
        return KrizhevskySGD(groups, lr=lr, momentum=momentum, foreach=impl == "foreach")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, foreach=impl == "foreach", fused=impl == "fused")
    if name == "lars":
        if impl != "loop":
            raise ConfigError(f"optim.impl={impl}: LARS updates one tensor at a time; use optim.impl=loop")
        return LARS(groups, lr=lr, momentum=momentum, trust=trust)
    raise ConfigError(f"optim.name={name}: unknown optimiser; choose krizhevsky, sgd or lars")
