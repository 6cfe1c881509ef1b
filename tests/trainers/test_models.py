"""The papers' models: parameter counts (known answers), shapes, gradients, ghost BN wiring."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainers.models.convnets import KeskarC1, KeskarF1, SimpleCNN
from trainers.models.ghost_bn import GhostBatchNorm1d, GhostBatchNorm2d
from trainers.models.resnets import CifarResNet, WideResNet
from trainers.models.torchvision_models import resnet50, vgg11


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _ghost_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (GhostBatchNorm1d, GhostBatchNorm2d))]


def _bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# Exact counts follow from the architectures (e.g. Simple CNN: 832 + 51,264 + 3,212,288 +
# 10,250); ResNet-20 and WRN-16-4 match the published 0.27M and 2.7M.
@pytest.mark.parametrize("build,expected", [
    (lambda: SimpleCNN(), 3_274_634),
    (lambda: KeskarF1(), 1_462_794),
    (lambda: KeskarC1(), 1_388_490),
    (lambda: CifarResNet(8), 75_290),
    (lambda: CifarResNet(20), 269_722),
    (lambda: CifarResNet(44), 658_586),
    (lambda: WideResNet(16, 4), 2_748_890),
])
def test_parameter_counts(build, expected):
    assert n_params(build()) == expected


def test_published_sizes_within_tolerance():
    assert abs(n_params(CifarResNet(20)) - 0.27e6) / 0.27e6 < 0.01  # He et al. Table 6: 0.27M
    assert abs(n_params(CifarResNet(44)) - 0.66e6) / 0.66e6 < 0.01  # 0.66M
    assert abs(n_params(WideResNet(16, 4)) - 2.7e6) / 2.7e6 < 0.03  # Zagoruyko: 2.7M


def test_shortcut_b_adds_projection_parameters():
    # Two projections (16->32, 32->64): 1x1 convs + BN = 512 + 64 + 2048 + 128 parameters.
    assert n_params(CifarResNet(20, shortcut="B")) - n_params(CifarResNet(20)) == 2752


@pytest.mark.parametrize("build,shape,classes", [
    (lambda g: SimpleCNN(), (4, 1, 28, 28), 10),
    (lambda g: KeskarF1(ghost_batch_size=g), (4, 1, 28, 28), 10),
    (lambda g: KeskarC1(ghost_batch_size=g), (4, 3, 32, 32), 10),
    (lambda g: KeskarC1(100, ghost_batch_size=g), (4, 3, 32, 32), 100),
    (lambda g: CifarResNet(8, ghost_batch_size=g), (4, 3, 32, 32), 10),
    (lambda g: CifarResNet(20, ghost_batch_size=g), (4, 3, 32, 32), 10),
    (lambda g: WideResNet(16, 4, 100, ghost_batch_size=g), (4, 3, 32, 32), 100),
])
def test_forward_backward_tiny_batch(build, shape, classes):
    torch.manual_seed(0)
    model = build(2)
    x = torch.randn(*shape)
    logits = model(x)
    assert logits.shape == (shape[0], classes)
    nn.functional.cross_entropy(logits, torch.arange(shape[0]) % classes).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_simple_cnn_pooling_before_bias_and_relu_is_exactly_the_textbook_order():
    """SimpleCNN pools before each bias and ReLU; the textbook order (conv with bias, ReLU,
    pool) with the same weights gives the same logits and gradients bit for bit, ties
    included (a ReLU zeroes many inputs of a pooling window; integer-valued weights make
    equal maxima, and exact sums, whichever way a convolution adds its bias)."""
    torch.manual_seed(0)
    model = SimpleCNN(channels=(4, 6), hidden=16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-2, 3, p.shape))  # integers: many exactly equal activations
    conv1, _, _, conv2, _, _ = model.features
    textbook_convs = [nn.Conv2d(c.in_channels, c.out_channels, 5, padding=2) for c in (conv1, conv2)]
    for ours, theirs in zip((conv1, conv2), textbook_convs):
        theirs.load_state_dict(ours.state_dict())
    textbook = nn.Sequential(textbook_convs[0], nn.ReLU(), nn.MaxPool2d(2, 2),
                             textbook_convs[1], nn.ReLU(), nn.MaxPool2d(2, 2),
                             *copy.deepcopy(model.classifier))
    x = torch.randint(-3, 4, (8, 1, 28, 28)).float()
    y = torch.arange(8) % 10
    results = []
    for net in (model, textbook):
        logits = net(x)
        nn.functional.cross_entropy(logits, y).backward()
        results.append([logits.detach()] + [p.grad for p in net.parameters()])
    with torch.no_grad():
        windows = textbook_convs[0](x).unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2)  # (B, C, 14, 14, 4)
        top = windows.max(-1, keepdim=True).values
        tied = ((windows == top).sum(-1) > 1) & (top.squeeze(-1) > 0)
        assert tied.any() and (top <= 0).any()  # positive maxima tied, and all-negative windows
    assert len(results[0]) == len(results[1]) == 1 + 8
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)
    assert any(g.abs().sum() > 0 for g in results[0][1:])
    assert [k for k in model.state_dict() if k.startswith("features")] == [
        "features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias"]


def test_simple_cnn_matches_the_textbook_order_bit_for_bit_under_bf16_autocast():
    """With real-valued weights and bf16 autocast (as on CUDA), the logits are bit for bit
    those of conv, then its bias added as an operation of its own (as cuDNN adds it), ReLU,
    pool: rounding is monotone, so the bias commutes with the maximum; and the bias joins
    in bf16, as autocast casts it inside a convolution."""
    torch.manual_seed(0)
    model = SimpleCNN(channels=(8, 16), hidden=32)
    conv1, _, _, conv2, _, _ = model.features

    def textbook(x):
        for conv in (conv1, conv2):
            x = nn.functional.conv2d(x, conv.weight, None, padding=2) + conv.bias.to(torch.bfloat16)[:, None, None]
            x = nn.functional.max_pool2d(torch.relu(x), 2, 2)
        return model.classifier(x)

    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = model(x), textbook(x)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("build", [
    lambda g: KeskarF1(ghost_batch_size=g), lambda g: KeskarC1(ghost_batch_size=g),
    lambda g: CifarResNet(20, ghost_batch_size=g), lambda g: WideResNet(16, 4, ghost_batch_size=g),
])
def test_ghost_batch_size_reaches_every_batch_norm(build):
    assert len(_ghost_layers(build(None))) == 0
    model = build(32)
    assert len(_ghost_layers(model)) == len(_bn_layers(model)) > 0
    assert all(layer.ghost_batch_size == 32 for layer in _ghost_layers(model))


def test_ghost_size_equal_to_batch_gives_the_plain_model():
    torch.manual_seed(0)
    plain = CifarResNet(8).double()
    torch.manual_seed(0)
    ghost = CifarResNet(8, ghost_batch_size=6).double()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(ghost(x), plain(x), atol=1e-10, rtol=0)
    ghost_small = CifarResNet(8, ghost_batch_size=3).double()
    ghost_small.load_state_dict(plain.state_dict())
    assert (ghost_small(x) - plain(x)).abs().max() > 1e-6  # k = 2 ghost batches differ


def test_invalid_depths_are_rejected():
    with pytest.raises(ValueError):
        CifarResNet(21)
    with pytest.raises(ValueError):
        WideResNet(15, 4)


def test_torchvision_models_sizes_and_ghost_conversion_on_meta():
    # The meta device skips allocation and initialisation, so VGG-11's 133M parameters are cheap.
    with torch.device("meta"):
        vgg = vgg11(ghost_batch_size=16)
        vgg_plain = vgg11(batch_norm=False)
        r50 = resnet50(ghost_batch_size=16)
    assert n_params(vgg) == 132_868_840 and n_params(vgg_plain) == 132_863_336
    assert n_params(r50) == 25_557_032
    assert len(_ghost_layers(vgg)) == len(_bn_layers(vgg)) == 8
    assert len(_ghost_layers(r50)) == len(_bn_layers(r50)) == 53
    assert len(_bn_layers(vgg_plain)) == 0


def test_resnet50_forward_backward_with_ghost_batch_norm():
    torch.manual_seed(0)
    model = resnet50(num_classes=5, ghost_batch_size=2)
    x = torch.randn(4, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (4, 5)
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    assert torch.isfinite(model.fc.weight.grad).all() and model.conv1.weight.grad.abs().sum() > 0
    assert int(model.bn1.num_batches_tracked) == 2  # two ghost batches of 2


# --- the workload entries ------------------------------------------------------------------

SHALLUE_TARGETS = {"mnist_simple_cnn": 0.01, "fashion_mnist_simple_cnn": 0.1, "cifar10_resnet8": 0.3,
                   "imagenet_resnet50": 0.25, "imagenet_vgg11": 0.35}


def test_paper_workloads_are_unique_and_carry_shallue_targets():
    from trainers.workloads import register
    from trainers.workloads_papers import paper_workloads

    workloads = {w.name: w for w in paper_workloads()}
    assert len(workloads) == len(paper_workloads()) == 15
    for name, threshold in SHALLUE_TARGETS.items():
        assert workloads[name].default_target.metric == "val_error"
        assert workloads[name].default_target.threshold == threshold
    # Resident workloads augment on the device; DataLoader ones in their transforms.
    assert all(w.augment is not None for n, w in workloads.items() if n.startswith(("cifar", "imagenet64")))
    assert all(w.load_folders is not None and w.augment is None
               for n, w in workloads.items() if n in ("imagenet_resnet50", "imagenet_vgg11"))
    assert all(w.augment is None for n, w in workloads.items() if "mnist" in n)
    registry = {}
    register(registry, workloads["mnist_f1"])
    with pytest.raises(ValueError, match="duplicate"):
        register(registry, workloads["mnist_f1"])


def test_small_paper_workloads_build_models_that_fit_their_data():
    from trainers.workloads import ModelOptions
    from trainers.workloads_papers import paper_workloads

    generator = torch.Generator().manual_seed(0)
    for workload in paper_workloads():
        if workload.name.startswith("imagenet"):
            continue  # sizes checked on the meta device above
        model = workload.build_model(ModelOptions(ghost_batch_size=2)).eval()
        channels, size = (1, 28) if "mnist" in workload.name else (3, 32)
        x = workload.preprocess(torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8))
        if workload.augment is not None:
            x = workload.augment(x, generator)
        classes = 100 if "cifar100" in workload.name else 10
        assert model(x).shape == (2, classes), workload.name
        assert all(l.ghost_batch_size == 2 for l in _ghost_layers(model)), workload.name
