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
    """Layer-wise adaptive rate scaling (You, Gitman and Ginsburg 2017, arXiv:1708.03888) as the
    authors ran it for their AlexNet-BN records: nvcaffe (github.com/borisgin/nvcaffe, branch
    caffe-0.16_lars, src/caffe/solvers/sgd_solver.cpp, SGDSolver::GetLocalRate and
    ComputeUpdateValue with local_lr_auto: true, and the GPU update SGDRegUpdateAllAndClear in
    sgd_solver.cu; the code of September 2017, when models/alexnet_bn/solver_8K/16k/32k.prototxt
    were committed). For every parameter tensor, biases included:

        local = trust * |w| / (|g| + weight_decay * |w|)     (1 where |w| or |g| is 0)
        v <- momentum * v + lr * local * (g + decay * w);   w <- w - v

    `lr` is the global rate of the schedule (base_lr, warm-up, poly decay), which multiplies
    the local one; |g| is the norm of the loss gradient alone, averaged over the global batch;
    `weight_decay` in the ratio is the solver's (optim.weight_decay) for every tensor, while
    `decay` in the step is the tensor's own (its group's weight_decay: 0 for biases unless
    optim.bias_weight_decay, as Caffe's decay_mult). `trust` is the solver's local_gw_ratio.
    Caffe's lr_mult only switches a tensor on or off here (the local rate replaces it), so use
    optim.bias_lr_mult=1 with LARS.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, trust: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust=trust))
        self.ratio_decay = weight_decay  # the solver's, in every tensor's ratio

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, decay, trust = group["lr"], group["momentum"], group["weight_decay"], group["trust"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                w, g = p.norm(), p.grad.norm()
                ratio = trust * w / (g + self.ratio_decay * w)
                # a fresh (zero) or gradient-free tensor takes the global rate alone, as in nvcaffe
                local = torch.where((w > 0) & (g > 0), ratio, torch.ones_like(ratio))
                step = p.grad.add(p, alpha=decay) if decay else p.grad.clone()
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p)
                velocity = state["velocity"].mul_(momentum).add_(step.mul_(local), alpha=lr)
                p.sub_(velocity)
        return loss


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    bias_lr_mult: float,
    layers: tuple = (),
    bias_weight_decay: bool = False,
) -> list[dict]:
    """Weights get the weight decay; biases (and any other 1-d parameter) get none (unless
    `bias_weight_decay`: Caffe's default decay_mult 1, as in nvcaffe's LARS runs) and a
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
                "weight_decay": weight_decay if bias_weight_decay else 0.0,
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
    name: str,
    groups: list[dict],
    lr: float,
    momentum: float,
    impl: str = "foreach",
    trust: float = 0.001,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """`impl`: foreach (one kernel per operation over all tensors), loop (one per tensor), or
    fused (one kernel for the whole update; torch's SGD only). `trust`: LARS's coefficient;
    `weight_decay`: the solver's, in LARS's ratio (the groups carry each tensor's own)."""
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
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, trust=trust)
    raise ConfigError(f"optim.name={name}: unknown optimiser; choose krizhevsky, sgd or lars")
