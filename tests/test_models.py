import copy

import pytest
import torch
import torch.nn.functional as F

from alexnet_dist.errors import ConfigError
from alexnet_dist.models import AlexNet2012, create
from alexnet_dist.models.layers import SpatialNorm, TowerLRN, fuse_norms


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_alexnet2012_has_the_papers_parameter_count_and_55px_conv1_maps():
    model = create("alexnet2012", 1000).eval()
    assert n_params(model) == 60_965_224
    x = torch.randn(2, 3, 224, 224)
    assert model.conv1(F.pad(x, (0, 3, 0, 3))).shape == (2, 96, 55, 55)
    assert model.features(x).shape == (2, 256, 6, 6)
    assert model(x).shape == (2, 1000)


def test_alexnet2012_initialisation_follows_layers_145():
    torch.manual_seed(0)
    m = AlexNet2012()
    for layer, std in [
        (m.conv1, 0.01),
        (m.conv2, 0.01),
        (m.conv3, 0.03),
        (m.conv4, 0.03),
        (m.conv5, 0.03),
        (m.fc6, 0.01),
        (m.fc7, 0.01),
        (m.fc8, 0.01),
    ]:
        assert layer.weight.std().item() == pytest.approx(std, rel=0.05)
    biases = {
        name: m.get_submodule(name).bias.unique().tolist()
        for name in ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    }
    assert biases == {
        "conv1": [0.0],
        "conv2": [1.0],
        "conv3": [0.0],
        "conv4": [1.0],
        "conv5": [1.0],
        "fc6": [1.0],
        "fc7": [1.0],
        "fc8": [0.0],
    }


def test_alexnet2012_towers_are_separate_in_conv2_and_joined_in_conv3():
    m = AlexNet2012().eval()
    x = torch.randn(1, 96, 27, 27)
    y = x.clone()
    y[:, 48:] += 1.0  # change only the second tower's input
    assert torch.equal(m.conv2(x)[:, :128], m.conv2(y)[:, :128])
    assert not torch.equal(m.conv2(x)[:, 128:], m.conv2(y)[:, 128:])
    z = torch.randn(1, 256, 13, 13)
    w = z.clone()
    w[:, 128:] += 1.0
    assert not torch.equal(m.conv3(z)[:, :192], m.conv3(w)[:, :192])  # conv3 crosses towers


def test_alexnet2012_refuses_other_input_sizes_with_a_clear_message():
    with pytest.raises(ValueError, match="224x224"):
        AlexNet2012()(torch.randn(1, 3, 64, 64))


def test_owt_matches_torchvision_layout_and_parameter_count():
    model = create("alexnet_owt", 1000)
    assert n_params(model) == 61_100_840
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "features.0.weight": (64, 3, 11, 11),
        "features.0.bias": (64,),
        "features.3.weight": (192, 64, 5, 5),
        "features.3.bias": (192,),
        "features.6.weight": (384, 192, 3, 3),
        "features.6.bias": (384,),
        "features.8.weight": (256, 384, 3, 3),
        "features.8.bias": (256,),
        "features.10.weight": (256, 256, 3, 3),
        "features.10.bias": (256,),
        "classifier.1.weight": (4096, 9216),
        "classifier.1.bias": (4096,),
        "classifier.4.weight": (4096, 4096),
        "classifier.4.bias": (4096,),
        "classifier.6.weight": (1000, 4096),
        "classifier.6.bias": (1000,),
    }
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("size", [28, 32, 48, 64])
def test_small_model_takes_28_to_64_px(size):
    assert create("alexnet_small", 10)(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(
        ConfigError, match="model=resnet: no such model config; choose one of alexnet2012, alexnet_bn, alexnet_owt"
    ):
        create("resnet", 10)


def lrn_by_formula(a, n=5, alpha=1e-4, beta=0.75, k=2.0):
    """b_i = a_i / (k + alpha/n * sum_{j=i-n/2}^{i+n/2} a_j^2)^beta  (paper section 3.3, with the
    code's alpha/n scaling)."""
    out = torch.empty_like(a)
    C = a.shape[1]
    for i in range(C):
        lo, hi = max(0, i - n // 2), min(C - 1, i + n // 2)
        s = (a[:, lo : hi + 1] ** 2).sum(1)
        out[:, i] = a[:, i] / (k + alpha / n * s) ** beta
    return out


def test_tower_lrn_matches_the_formula_inside_each_tower():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 3, 3, dtype=torch.float64) * 30
    expected = torch.cat([lrn_by_formula(x[:, :6]), lrn_by_formula(x[:, 6:])], dim=1)
    assert torch.allclose(TowerLRN(2).double()(x), expected, rtol=1e-10)
    # one tower: the window at channel 5 reaches channels 6 and 7, so the result differs
    assert torch.allclose(TowerLRN(1).double()(x), lrn_by_formula(x), rtol=1e-10)
    assert not torch.allclose(TowerLRN(1).double()(x), expected)
    torch_lrn = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)
    assert torch.allclose(TowerLRN(1)(x.float()), torch_lrn(x.float()), rtol=1e-5)


def test_spatial_norm_matches_the_formula_with_zero_padding():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64) * 20
    expected = torch.empty_like(x)
    for c in range(2):
        for i in range(6):
            for j in range(7):
                win = x[0, c, max(0, i - 2) : i + 3, max(0, j - 2) : j + 3]
                expected[0, c, i, j] = x[0, c, i, j] * (1 + 1e-3 / 25 * (win**2).sum()) ** -0.75
    assert torch.allclose(SpatialNorm()(x), expected, rtol=1e-10)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_channels_last_and_compiled_models_compute_the_same_and_save_the_same_names(compile):
    from alexnet_dist.training.module import Classifier

    spec = {"_target_": "alexnet_dist.models.AlexNetSmall", "num_classes": 10, "width": 8, "fc": 32, "dropout": 0.0}
    torch.manual_seed(0)
    plain = Classifier(spec, optim={}, global_batch=4).eval()
    fast = Classifier(spec, optim={}, global_batch=4, channels_last=True, compile=compile).eval()
    fast.load_state_dict(plain.state_dict())
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert fast.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32)
    # inductor's scalar C++ kernels when compiling (as the `inductor` fixture below): the same
    # fused arithmetic, generated in half the time on 2 cores
    with torch.no_grad(), torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        assert torch.allclose(plain(x), fast(x), atol=1e-4)


@pytest.fixture
def inductor():
    """Fresh dynamo caches, so each test compiles its own shapes (not ones an earlier test made
    dynamic), and inductor's scalar C++ kernels: the vectorised ones hold the same fused
    arithmetic but take half a minute to generate for SpatialNorm's backward on 2 cores."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def forward_backward(module, x, grad):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(grad)
    return y.detach(), x.grad


@pytest.mark.parametrize(
    "block,shape",
    [
        (lambda: TowerLRN(2), (2, 96, 55, 55)),  # alexnet2012's norm1: 48 channels a tower
        (lambda: TowerLRN(2), (2, 256, 27, 27)),  # its norm2: 128 a tower
        (lambda: TowerLRN(1), (2, 96, 13, 13)),
        (lambda: TowerLRN(2), (2, 6, 5, 5)),  # 3 channels a tower: every window crosses an edge
        (SpatialNorm, (2, 256, 27, 27)),  # snorm2
    ],
    ids=["lrn-96", "lrn-256", "lrn-one-tower", "lrn-3-a-tower", "spatial-256"],
)
def test_fused_norm_blocks_compute_what_the_plain_ones_do(inductor, block, shape):
    torch.manual_seed(0)
    x, grad = torch.randn(shape) * 30, torch.randn(shape)  # large enough that the norms matter
    plain, fused = block(), block()
    assert fuse_norms(fused) == 1
    y, dx = forward_backward(plain, x, grad)
    y_fused, dx_fused = forward_backward(fused, x, grad)
    assert inductor["stats"]["unique_graphs"] == 1  # compiled, not fallen back to eager
    torch.testing.assert_close(y_fused, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_fused, dx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name,size,blocks", [pytest.param("alexnet2012", 224, 3, marks=pytest.mark.slow), ("alexnet_small", 32, 2)]
)
def test_fused_norms_leave_the_logits_the_gradients_and_the_names_as_they_were(inductor, name, size, blocks):
    # float64: max-pooling sends each window's gradient to its largest input, and in float32 a
    # one-ulp difference in a norm's output can swap two near-equal ones, moving a whole entry
    # of the weight gradients; in float64 the two agree to ~1e-16 everywhere.
    torch.manual_seed(0)
    plain = create(name, 10, dropout=0.0).double()
    fused = copy.deepcopy(plain)
    assert fuse_norms(fused) == blocks
    assert fused.state_dict().keys() == plain.state_dict().keys()  # checkpoints interchange
    x, labels = torch.randn(1, 3, size, size, dtype=torch.float64), torch.tensor([3])
    logits = {}
    for key, model in (("plain", plain), ("fused", fused)):
        logits[key] = model(x)
        F.cross_entropy(logits[key], labels).backward()
    torch.testing.assert_close(logits["fused"], logits["plain"], rtol=1e-9, atol=1e-12)
    grads = [{name: p.grad for name, p in model.named_parameters()} for model in (fused, plain)]
    torch.testing.assert_close(*grads, rtol=1e-9, atol=1e-12)  # a mismatch names the parameter


def test_classifier_keeps_fuse_norms_and_leaves_it_to_a_whole_model_compile():
    from alexnet_dist.training.module import Classifier

    spec = {"_target_": "alexnet_dist.models.AlexNetSmall", "num_classes": 10, "width": 8, "fc": 32}
    fused = Classifier(spec, optim={}, global_batch=4, fuse_norms=True)
    assert fused.hparams.fuse_norms and fused.net is fused.model
    assert fused.model.norm1._compiled_call_impl is not None
    both = Classifier(spec, optim={}, global_batch=4, compile=True, fuse_norms=True)
    assert both.net is not both.model and both.model.norm1._compiled_call_impl is None


@pytest.mark.parametrize("side", [2, 3, 5, 6, 7, 13])
def test_avg_pool_to_takes_the_means_of_adaptive_pooling_at_any_size(side):
    """Where the side is no multiple of the output (alexnet_small's 2x2 maps at 28 px, OWT's 1x1 at
    64 px) the bins overlap; the fixed-matrix form gives the same means, and exports to ONNX."""
    from alexnet_dist.models.layers import AvgPoolTo

    x = torch.randn(2, 4, side, side + 1)
    for size in (3, 6):
        expected = torch.nn.functional.adaptive_avg_pool2d(x, size)
        assert torch.allclose(AvgPoolTo(size)(x), expected, atol=1e-6)


def test_alexnet_bn_has_the_layer_order_and_parameter_count_of_nvcaffes_train_val2():
    model = create("alexnet_bn", 1000)
    # conv1 96*3*11*11 + 96 = 34,944;  conv2 256*48*5*5 + 256 = 307,456;  conv3 384*256*3*3 + 384
    # = 885,120;  conv4 384*192*3*3 + 384 = 663,936;  conv5 256*192*3*3 + 256 = 442,624;
    # fc6 9216*4096 + 4096 = 37,752,832;  fc7 4096*4096 + 4096 = 16,781,312;  fc8 4096*1000 + 1000
    # = 4,097,000; BN without scale or shift adds none: 60,965,224 in all
    assert n_params(model) == 60_965_224
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == [
        *["Conv2d", "ReLU", "MaxPool2d", "BatchNorm2d"],
        *["Conv2d", "ReLU", "MaxPool2d", "BatchNorm2d"],
        *["Conv2d", "ReLU", "BatchNorm2d"],
        *["Conv2d", "ReLU", "BatchNorm2d"],
        *["Conv2d", "ReLU", "MaxPool2d"],
    ]
    assert [m.groups for m in model.features if isinstance(m, torch.nn.Conv2d)] == [1, 2, 1, 2, 2]
    assert [m.num_features for m in model.features if isinstance(m, torch.nn.BatchNorm2d)] == [96, 256, 384, 384]
    assert [type(m).__name__ for m in model.classifier].count("Dropout") == 2
    fc6, fc7 = model.classifier[0], model.classifier[3]
    assert (fc6.bias[0].item(), fc7.bias[0].item(), model.features[0].bias[0].item()) == pytest.approx((0.1, 0.1, 0.01))
    assert fc6.weight.std().item() == pytest.approx(0.005, rel=0.01)


@pytest.mark.parametrize("size", [224, 227])
def test_alexnet_bn_takes_224_and_227_px_with_the_class_count_of_the_data(size):
    assert create("alexnet_bn", 7)(torch.randn(2, 3, size, size)).shape == (2, 7)


@pytest.mark.slow
def test_alexnet_bn_learns_a_batch_and_evaluates_each_image_alone_with_its_running_statistics():
    from alexnet_dist.trained.export import Program, export_program
    from alexnet_dist.training.optim import LARS, param_groups

    torch.manual_seed(0)
    model = create("alexnet_bn", 3, dropout=0.0)
    images, labels = torch.randn(6, 3, 227, 227), torch.tensor([0, 1, 2, 0, 1, 2])
    # the published rule at its 1K rate: base_lr 2, local_gw_ratio 0.001, weight decay 5e-4 on everything
    opt = LARS(param_groups(model, 2.0, 5e-4, 1.0, bias_weight_decay=True), lr=2.0, weight_decay=5e-4, trust=0.001)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]  # ln 3 = 1.10 at the start
    model.eval()  # the BN layers now use the running averages gathered above, not the batch's
    with torch.no_grad():
        together = model(images)
        alone = torch.cat([model(images[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-5)
    assert model.features[3].running_mean.abs().min() > 0  # gathered in training, from 0
    # the exported program (alexnet-export's) computes the same logits, at another batch size
    prog = Program(model, torch.zeros(3), torch.ones(3)).eval()
    pixels = torch.randint(0, 256, (3, 3, 227, 227), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(export_program(prog, 227).module()(pixels), prog(pixels), rtol=1e-4, atol=1e-4)
