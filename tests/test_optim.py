import math

import pytest
import torch
from hydra import compose, initialize_config_module
from torch import nn

from alexnet_dist.config import load, plain
from alexnet_dist.errors import ConfigError
from alexnet_dist.training.optim import LARS, KrizhevskySGD, param_groups, scaled_lr
from alexnet_dist.training.schedules import lr_factor


def test_lars_matches_nvcaffe_by_hand_with_the_8k_solver_values():
    """solver_8K.prototxt: base_lr 10, lr_policy poly, power 2, max_iter 15600, rampup 600
    iterations; local_gw_ratio 0.001, weight_decay 5e-4, momentum 0.9. Two steps past the
    warm-up, iterations 3000 and 3001, worked out by hand from nvcaffe's GetLocalRate and
    SGDRegUpdateAllAndClear."""
    f64 = torch.float64  # the hand figures carry 10 digits
    kw = dict(max_epochs=15600 / 156, warmup_epochs=600 / 156, warmup_from=0.1, power=2.0)
    rates = [10 * lr_factor("poly", it / 156, **kw) for it in (3000, 3001)]
    # 10 * (1 - 3000/15600)^2 = 10 * (21/26)^2 = 2205/338;  10 * (12599/15600)^2
    assert rates == pytest.approx([6.5236686391, 6.5226331772], rel=1e-9)
    w = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=f64))  # |w| = 5
    b = nn.Parameter(torch.tensor([2.0], dtype=f64))  # a bias: LARS scales it too, and decays it (decay_mult 1)
    z = nn.Parameter(torch.zeros(2, dtype=f64))  # |w| = 0: the global rate alone
    opt = LARS([{"params": [w, b, z], "weight_decay": 5e-4}], lr=10.0, momentum=0.9, weight_decay=5e-4, trust=0.001)

    opt.param_groups[0]["lr"] = rates[0]
    w.grad, b.grad, z.grad = (
        torch.tensor([[0.6, 0.8]], dtype=f64),
        torch.tensor([0.5], dtype=f64),
        torch.tensor([1.0, 1.0], dtype=f64),
    )
    opt.step()
    # w: local = 0.001 * 5 / (1 + 0.0005 * 5) = 0.0049875312
    #    v = 6.5236686 * 0.0049875312 * (0.6 + 0.0015, 0.8 + 0.002) = (0.0195710059, 0.0260946746)
    assert w.detach().tolist()[0] == pytest.approx([2.9804289941, 3.9739053254], abs=1e-9)
    # b: local = 0.001 * 2 / (0.5 + 0.0005 * 2) = 0.0039920160;  v = 6.5236686 * 0.0039920160 * 0.501
    assert b.item() == pytest.approx(1.9869526627, abs=1e-9)
    # z: v = 6.5236686 * (1, 1): no trust ratio for a zero tensor, as in nvcaffe
    assert z.detach().tolist() == pytest.approx([-6.5236686391] * 2, abs=1e-8)

    opt.param_groups[0]["lr"] = rates[1]
    w.grad, b.grad, z.grad = torch.tensor([[-0.3, 0.4]], dtype=f64), None, None  # |g| = 0.5
    opt.step()
    # |w| = 4.9673816568;  local = 0.001 * 4.9673816568 / (0.5 + 0.0005 * 4.9673816568) = 0.0098856575
    # v = 0.9 * v1 + 6.5226332 * 0.0098856575 * (g + 0.0005 * w) = (-0.0016341601, 0.0494055338)
    assert w.detach().tolist()[0] == pytest.approx([2.9820631542, 3.9244997916], abs=1e-9)
    assert b.item() == pytest.approx(1.9869526627, abs=1e-9)  # no gradient: left alone


def test_the_ratio_takes_the_solvers_weight_decay_even_where_a_tensor_is_not_decayed():
    """nvcaffe's ratio reads the solver's weight_decay; decay_mult 0 only drops the decay term
    of the step (optim.bias_weight_decay=false here)."""
    b = nn.Parameter(torch.tensor([2.0]))
    opt = LARS([{"params": [b], "weight_decay": 0.0}], lr=1.0, momentum=0.9, weight_decay=0.25, trust=0.1)
    b.grad = torch.tensor([1.5])
    opt.step()
    # local = 0.1 * 2 / (1.5 + 0.25 * 2) = 0.1;  v = 1 * 0.1 * 1.5 (no decay term) = 0.15
    assert b.item() == pytest.approx(1.85)


def test_poly_schedule_warms_up_then_decays_from_iteration_zero_like_nvcaffe():
    """solver_8K's schedule at 156 iterations an epoch: the rate climbs linearly from rampup_lr 1
    to base_lr 10 over 600 iterations, then is 10 * (1 - iter/15600)^2 (iterations from 0)."""
    kw = dict(max_epochs=100, warmup_epochs=600 / 156, warmup_from=0.1, power=2.0)
    rate = [10 * lr_factor("poly", it / 156, **kw) for it in (0, 300, 599, 600, 7800, 15600)]
    # 1;  1 + 9 * 300/600 = 5.5;  1 + 9 * 599/600 = 9.985;  10 * (25/26)^2;  10 * (1/2)^2;  0
    assert rate == pytest.approx([1.0, 5.5, 9.985, 9.2455621302, 2.5, 0.0], abs=1e-9)
    with pytest.raises(ConfigError, match="choose step, plateau, cosine, constant or poly"):
        lr_factor("polynomial", 1.0, max_epochs=10)


@pytest.mark.parametrize(
    "experiment, batch, rates",
    [
        # solver_8K: base_lr 10 from rampup_lr 1 over 3.84 epochs (1 + 9/2 at half), then 10 * (1 - e/100)^2
        ("alexnet_bn_lars", 8192, {0.0: 1.0, 1.92: 5.5, 50.0: 2.5, 90.0: 0.1}),
        # solver_32k: base_lr 32 from 1 over 10.23 epochs (1 + 31/2 at half), then 32 * (1 - e/100)^2
        ("alexnet_bn_lars_32k", 32768, {0.0: 1.0, 5.115: 16.5, 50.0: 8.0, 90.0: 0.32}),
    ],
)
def test_the_alexnet_bn_lars_experiment_applies_the_published_values_per_global_batch(experiment, batch, rates):
    from alexnet_dist.training.module import Classifier

    with initialize_config_module("alexnet_dist.conf", version_base="1.3"):
        cfg = compose("train", overrides=["data.root=/data/x", "run_id=r", f"experiment={experiment}"])
    s = load(cfg)
    o = s.optim
    assert (s.model["_target_"], s.data.batch_size, s.data.crop, cfg.trainer.max_epochs) == (
        "alexnet_dist.models.AlexNetBN",
        batch,
        227,
        100,
    )
    assert (str(o.name), o.momentum, o.weight_decay, o.trust, o.bias_weight_decay, o.bias_lr_mult) == (
        "lars",
        0.9,
        5e-4,
        0.001,
        True,
        1.0,
    )
    assert (str(o.schedule.name), o.schedule.power) == ("poly", 2.0)
    # the rate the run applies, step by step: no linear scaling on top of the published rate
    module = Classifier({"_target_": "alexnet_dist.models.AlexNetSmall", "num_classes": 10}, o, global_batch=batch)
    per_epoch = 1000  # the schedule reads epochs (step / per_epoch): 1000 puts every epoch above on a step
    opt = module.optimizer_and_schedule(steps_per_epoch=per_epoch, total_steps=100 * per_epoch)["optimizer"]
    assert isinstance(opt, LARS) and opt.ratio_decay == 5e-4
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == {"weights": 5e-4, "biases": 5e-4}
    applied = {e: opt.param_groups[0]["initial_lr"] * module.lr_multiplier(round(e * per_epoch)) for e in rates}
    assert applied == pytest.approx(rates, rel=1e-9)


def test_optim_lars_refuses_a_fused_update():
    from alexnet_dist.training.module import Classifier

    with initialize_config_module("alexnet_dist.conf", version_base="1.3"):
        cfg = compose("train", overrides=["data.root=/data/x", "run_id=r", "optim=lars"])
    optim = load(cfg).optim
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


def test_linear_scaling_counts_the_batches_accumulated_into_one_step():
    """data.batch_size=512 with trainer.accumulate_grad_batches=8 learns from 4,096 images a step:
    the rate is scaled for 4,096 (it used to be scaled for 512)."""
    from alexnet_dist.training.module import Classifier

    optim = {"name": "sgd", "lr": 0.05, "reference_batch": 128, "schedule": {"name": "constant"}}
    module = Classifier({"_target_": "alexnet_dist.models.AlexNetSmall", "num_classes": 10}, optim, global_batch=512)
    opt = module.optimizer_and_schedule(steps_per_epoch=10, total_steps=100, accumulate=8)["optimizer"]
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(0.05 * 4096 / 128)


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
