import math

import pytest
import torch
from hydra import compose, initialize_config_module
from torch import nn

from alexnet_dist.config import load, plain
from alexnet_dist.training.optim import LARS, KrizhevskySGD, param_groups, scaled_lr
from alexnet_dist.training.schedules import lr_factor


def test_lars_scales_each_weight_tensors_step_by_its_trust_ratio_and_leaves_biases_plain():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=2.0, trust=0.01)
    g = [0.6, 0.8]  # |g| = 1
    ref, v = [3.0, 4.0], [0.0, 0.0]
    for _ in range(2):
        w.grad, b.grad = torch.tensor([g]), torch.tensor([0.5])
        opt.step()
        norm = math.hypot(*ref)
        local = 0.01 * norm / (1.0 + 0.1 * norm)
        v = [0.9 * v[i] + 2.0 * local * (g[i] + 0.1 * ref[i]) for i in range(2)]
        ref = [ref[i] - v[i] for i in range(2)]
    # first step by hand: local = 0.05 / 1.5, v = 2 * local * (0.9, 1.2) = (0.06, 0.08)
    assert w.tolist()[0] == pytest.approx(ref, rel=1e-6) and ref[0] < 2.94
    assert b.item() == pytest.approx(1.0 - 1.0 - (0.9 * 1.0 + 1.0))  # plain: v = 1, then 1.9


def test_optim_lars_composes_with_warm_up_and_refuses_a_fused_update():
    from alexnet_dist.errors import ConfigError
    from alexnet_dist.training.module import Classifier

    with initialize_config_module("alexnet_dist.conf", version_base="1.3"):
        cfg = compose("train", overrides=["data.root=/data/x", "run_id=r", "optim=lars"])
    optim = load(cfg).optim
    assert (str(optim.name), str(optim.impl), optim.trust, optim.schedule.warmup_epochs) == ("lars", "loop", 0.001, 5)
    module = Classifier({"_target_": "alexnet_dist.models.AlexNetSmall", "num_classes": 10}, optim, global_batch=1024)
    opt = module.optimizer_and_schedule(steps_per_epoch=10, total_steps=100)["optimizer"]
    assert isinstance(opt, LARS) and opt.param_groups[0]["initial_lr"] == pytest.approx(0.01 * 1024 / 128)
    with pytest.raises(ConfigError, match="optim.impl=fused: LARS updates one tensor at a time; use optim.impl=loop"):
        Classifier(
            {"_target_": "alexnet_dist.models.AlexNetSmall", "num_classes": 10}, {**plain(optim), "impl": "fused"}, 1024
        ).optimizer_and_schedule(10, 100)


def test_krizhevsky_update_matches_a_hand_computation():
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = KrizhevskySGD([w], lr=0.1, momentum=0.9, weight_decay=0.01)
    grads = [torch.tensor([0.5, 1.0]), torch.tensor([-1.0, 0.0]), torch.tensor([0.2, 0.3])]
    lrs = [0.1, 0.1, 0.01]  # an lr drop before the third step
    v = [0.0, 0.0]
    ref = [1.0, -2.0]
    for g, lr in zip(grads, lrs, strict=True):
        for group in opt.param_groups:
            group["lr"] = lr
        w.grad = g.clone()
        opt.step()
        for i in range(2):
            v[i] = 0.9 * v[i] - lr * 0.01 * ref[i] - lr * g[i].item()
            ref[i] = ref[i] + v[i]
    assert w.tolist() == pytest.approx(ref, rel=1e-6)
    # by hand for the first coordinate: v1=-0.051, w=0.949; v2=-0.0459-0.000949+0.1=0.053151 ...
    assert ref[0] == pytest.approx(0.949 + 0.053151 + (0.9 * 0.053151 - 0.01 * 0.01 * 1.002151 - 0.002), rel=1e-6)


def test_krizhevsky_equals_torch_sgd_at_constant_lr_and_differs_after_a_drop():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    ka = KrizhevskySGD(a.parameters(), lr=0.1, momentum=0.9)
    sb = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 4)
    for step in range(6):
        if step == 3:
            for opt in (ka, sb):
                opt.param_groups[0]["lr"] = 0.01
        for model, opt in ((a, ka), (b, sb)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
        same = torch.allclose(a.weight, b.weight, atol=1e-6)
        assert same == (step < 3), step


def test_param_groups_put_no_decay_and_double_lr_on_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2))
    weights, biases = param_groups(model, lr=0.01, weight_decay=5e-4, bias_lr_mult=2.0)
    assert [p.shape for p in weights["params"]] == [(4, 3, 3, 3), (2, 4)]
    assert [p.shape for p in biases["params"]] == [(4,), (2,)]
    assert (weights["lr"], weights["weight_decay"]) == (0.01, 5e-4)
    assert (biases["lr"], biases["weight_decay"]) == (0.02, 0.0)


def test_linear_lr_scaling_with_the_global_batch():
    assert scaled_lr(0.01, 128, 128) == 0.01
    assert scaled_lr(0.01, 1024, 128) == pytest.approx(0.08)
    assert scaled_lr(0.01, 1024, None) == 0.01


def test_step_schedule_drops_at_the_2012_epochs():
    f = [lr_factor("step", e, max_epochs=90, milestones=[25, 51], gamma=0.1) for e in (0, 24.99, 25, 50.5, 51, 89)]
    assert f == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_cosine_with_warmup():
    kw = dict(max_epochs=10, warmup_epochs=2, min_factor=0.0)
    assert lr_factor("cosine", 1.0, **kw) == pytest.approx(0.5)  # halfway through warmup
    assert lr_factor("cosine", 2.0, **kw) == pytest.approx(1.0)  # peak
    assert lr_factor("cosine", 6.0, **kw) == pytest.approx(0.5)  # half of the cosine
    assert lr_factor("cosine", 10.0, **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("cosine", 4.0, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_plateau_divides_by_ten_after_patience_epochs_without_improvement():
    from alexnet_dist.training.module import Classifier

    optim = {
        "name": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "schedule": {"name": "plateau", "patience": 1, "gamma": 0.1, "max_drops": 2},
    }
    module = Classifier(
        model={"_target_": "alexnet_dist.models.AlexNetSmall", "num_classes": 10},
        optim=optim,
        global_batch=128,
    )
    module.optimizer_and_schedule(steps_per_epoch=10, total_steps=200)
    factors = []
    for top1 in [0.5, 0.6, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]:
        module._plateau_update(top1)
        factors.append(module.lr_multiplier(step=0))
    # improvement resets the count; a drop after 2 flat epochs (patience 1); at most 2 drops
    assert factors == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01])


def _train_steps(name: str, impl: str, steps: int = 5) -> list[torch.Tensor]:
    from alexnet_dist.training.optim import build_optimizer

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = build_optimizer(name, param_groups(net, 0.1, 0.01, 2.0), 0.1, 0.9, impl)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("name,impls", [("krizhevsky", ["loop", "foreach"]), ("sgd", ["loop", "foreach", "fused"])])
def test_optimizer_implementations_give_the_same_weights(name, impls):
    reference = _train_steps(name, impls[0])
    for impl in impls[1:]:
        for a, b in zip(reference, _train_steps(name, impl), strict=True):
            assert torch.allclose(a, b, atol=1e-6), impl


def test_fused_is_refused_for_the_krizhevsky_rule_in_one_line():
    from alexnet_dist.errors import ConfigError
    from alexnet_dist.training.optim import build_optimizer

    with pytest.raises(ConfigError, match="optim.impl=fused exists for optim=sgd only"):
        build_optimizer("krizhevsky", [{"params": [nn.Parameter(torch.zeros(1))]}], 0.1, 0.9, "fused")


def test_a_layer_gets_its_own_rate_from_an_epoch_on_like_conv1_in_2012():
    from alexnet_dist.training.module import Classifier

    optim = {
        "name": "krizhevsky",
        "lr": 0.01,
        "reference_batch": 128,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "bias_lr_mult": 2.0,
        "schedule": {"name": "step", "milestones": [25, 51], "gamma": 0.1},
        "layer_rates": [
            {"layer": "conv1", "from_epoch": 67, "lr": 1e-5},
            {"layer": "conv1", "from_epoch": 72, "lr": 0.0},
        ],
    }
    module = Classifier({"_target_": "alexnet_dist.models.AlexNetSmall", "num_classes": 10}, optim, global_batch=256)
    config = module.optimizer_and_schedule(steps_per_epoch=10, total_steps=900)
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]

    def rates(epoch):
        sched.last_epoch = epoch * 10 - 1
        sched.step()
        return {g["name"]: g["lr"] for g in opt.param_groups}

    assert rates(60) == pytest.approx({"weights/conv1": 2e-4, "biases/conv1": 4e-4, "weights": 2e-4, "biases": 4e-4})
    assert rates(67) == pytest.approx({"weights/conv1": 2e-5, "biases/conv1": 4e-5, "weights": 2e-4, "biases": 4e-4})
    assert rates(72) == pytest.approx({"weights/conv1": 0.0, "biases/conv1": 0.0, "weights": 2e-4, "biases": 4e-4})
    assert len(opt.param_groups[0]["params"]) == 1  # conv1.weight alone


def test_a_layer_rate_for_a_missing_layer_names_the_layers():
    from alexnet_dist.errors import ConfigError
    from alexnet_dist.training.optim import param_groups

    net = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(
        ConfigError, match="optim.layer_rates names conv1, which this model has no parameters for; its layers: 0"
    ):
        param_groups(net, 0.1, 0.0, 1.0, ("conv1",))
