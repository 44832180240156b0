"""The model zoo: names, parameter counts, forward shapes, tap points, checkpoints."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_cls.hooks import parse_tap, resolve_module, run_and_capture
from kd_cls.models import build_model, default_weights, get_taps, model_names
from kd_cls.registry import UnknownNameError

# (dataset, input side, default class count) per model family.
FAMILY_SETUP = {"cifar": ("cifar100", 32, 100), "tiny_imagenet": ("tiny_imagenet", 64, 200), "imagenet": ("imagenet", 224, 1000)}

# Parameter counts measured by instantiating mdistiller's own model classes
# (models/cifar, models/imagenet) with these class counts. For the Tiny-ImageNet
# ShuffleV2, whose mdistiller forward fails at 64 px, names and shapes are the
# same, so the count is mdistiller's too.
PARAMS = {
    ("cifar", "resnet8"): 83892,
    ("cifar", "resnet14"): 181108,
    ("cifar", "resnet20"): 278324,
    ("cifar", "resnet32"): 472756,
    ("cifar", "resnet44"): 667188,
    ("cifar", "resnet56"): 861620,
    ("cifar", "resnet110"): 1736564,
    ("cifar", "resnet8x4"): 1233540,
    ("cifar", "resnet32x4"): 7433860,
    ("cifar", "wrn_16_1"): 180916,
    ("cifar", "wrn_16_2"): 703284,
    ("cifar", "wrn_40_1"): 569780,
    ("cifar", "wrn_40_2"): 2255156,
    ("cifar", "vgg8"): 3965028,
    ("cifar", "vgg11"): 9277284,
    ("cifar", "vgg13"): 9462180,
    ("cifar", "vgg16"): 14774436,
    ("cifar", "vgg19"): 20086692,
    ("cifar", "ResNet18"): 11220132,
    ("cifar", "ResNet50"): 23705252,
    ("cifar", "MobileNetV2"): 812836,
    ("cifar", "ShuffleV1"): 949258,
    ("cifar", "ShuffleV2"): 1355528,
    ("tiny_imagenet", "ResNet18"): 11271432,
    ("tiny_imagenet", "MobileNetV2"): 2497480,
    ("tiny_imagenet", "ShuffleV2"): 1458028,
    ("imagenet", "ResNet18"): 11689512,
    ("imagenet", "ResNet34"): 21797672,
    ("imagenet", "ResNet50"): 25557032,
    ("imagenet", "ResNet101"): 44549160,
    ("imagenet", "MobileNetV1"): 4231976,
}

# (C, H, W) of each "feats" entry, worked out from the strides.
FEAT_SHAPES = {
    ("cifar", "resnet8x4"): [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)],
    ("cifar", "wrn_40_2"): [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)],
    ("cifar", "vgg13"): [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)],
    ("cifar", "ResNet50"): [(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)],
    ("cifar", "MobileNetV2"): [(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)],
    ("cifar", "ShuffleV1"): [(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4)],
    ("tiny_imagenet", "ShuffleV2"): [(24, 64, 64), (116, 32, 32), (232, 16, 16), (464, 8, 8)],
    ("tiny_imagenet", "ResNet18"): [(64, 64, 64), (64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 8, 8)],
    ("tiny_imagenet", "MobileNetV2"): [(32, 66, 66), (24, 33, 33), (32, 17, 17), (64, 9, 9), (1280, 9, 9)],
    ("imagenet", "ResNet18"): [(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)],
    ("imagenet", "MobileNetV1"): [(128, 56, 56), (256, 28, 28), (512, 14, 14), (1024, 7, 7)],
}

# Models whose stage outputs (after the stem) are exactly ReLU(pre-activation).
RELU_OF_PREACT = {
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
    "resnet32x4", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "ResNet18", "ResNet34", "ResNet50",
    "ResNet101", "ShuffleV1", "MobileNetV1",
}

ALL_MODELS = sorted(PARAMS, key=lambda k: (list(FAMILY_SETUP).index(k[0]), k[1]))


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _classify(model, pooled):
    """Apply the classifier the pooled tap feeds."""
    if hasattr(model, "classify"):
        return model.classify(pooled)
    path, is_input = parse_tap(get_taps(model)["pooled_feat"])
    assert is_input, "pooled_feat should be the classifier's input"
    return resolve_module(model, path)(pooled)


def test_registered_names_are_mdistillers():
    assert model_names("cifar100") == sorted([
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
        "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16",
        "vgg19", "ResNet18", "ResNet50", "MobileNetV2", "ShuffleV1", "ShuffleV2",
    ])
    assert model_names("tiny_imagenet") == ["MobileNetV2", "ResNet18", "ShuffleV2"]
    assert model_names("imagenet") == ["MobileNetV1", "ResNet101", "ResNet18", "ResNet34", "ResNet50"]


def test_teacher_default_weights():
    for name in ["resnet56", "resnet110", "resnet32x4", "ResNet50", "wrn_40_2", "vgg13"]:
        assert default_weights(name, "cifar100") == f"download_ckpts/cifar_teachers/{name}_vanilla/ckpt_epoch_240.pth"
    assert default_weights("resnet8x4", "cifar100") is None
    assert default_weights("ResNet18", "cifar100") is None
    assert default_weights("ResNet18", "tiny_imagenet") == "download_ckpts/tiny_imagenet_teachers/ResNet18_vanilla/ti_res18"


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        build_model("resnet9", dataset="cifar100")
    msg = str(e.value)
    assert "resnet9" in msg and "\n" not in msg
    assert "resnet8x4" in msg and "ShuffleV2" in msg and "cifar100" in msg
    with pytest.raises(UnknownNameError, match="MobileNetV1"):
        build_model("resnet8", dataset="imagenet")  # a CIFAR-only model


@pytest.mark.parametrize("family,name", ALL_MODELS, ids=[f"{f}-{n}" for f, n in ALL_MODELS])
@torch.no_grad()
def test_model_forward_params_and_taps(family, name):
    dataset, size, num_classes = FAMILY_SETUP[family]
    torch.manual_seed(0)
    model = build_model(name, num_classes=num_classes, dataset=dataset).eval()
    assert _n_params(model) == PARAMS[(family, name)]

    taps = get_taps(model)
    n_feats = len(taps["feats"])
    assert len(taps["preact_feats"]) == n_feats
    batch = 2 if PARAMS[(family, name)] < 5_000_000 and size < 224 else 1  # keep the suite fast
    x = torch.randn(batch, 3, size, size)
    logits, feats = run_and_capture(model, taps["feats"] + taps["preact_feats"] + [taps["pooled_feat"]], x)
    assert logits.shape == (batch, num_classes)
    post, pre, pooled = feats[:n_feats], feats[n_feats:-1], feats[-1]

    # Channels of the stage outputs, aligned from the last stage as OFD aligns them.
    channels = [f.shape[1] for f in post]
    stage_channels = list(model.get_stage_channels())
    assert channels[-len(stage_channels):] == stage_channels
    if (family, name) in FEAT_SHAPES:
        assert [tuple(f.shape[1:]) for f in post] == FEAT_SHAPES[(family, name)]
    for a, b in zip(post, pre):
        assert a.shape == b.shape and a.shape[0] == batch
    if name in RELU_OF_PREACT:
        for a, b in zip(post[1:], pre[1:]):
            torch.testing.assert_close(a, F.relu(b))
        assert not torch.equal(pre[-1], post[-1])  # a real pre-activation has negatives

    assert pooled.dim() == 2 and pooled.shape[0] == batch
    torch.testing.assert_close(_classify(model, pooled), logits)


def test_bn_before_relu_matches_stage_channels():
    for dataset, name in [("cifar100", "resnet8"), ("cifar100", "wrn_16_2"), ("cifar100", "vgg8"),
                          ("cifar100", "MobileNetV2"), ("cifar100", "ResNet18"), ("imagenet", "MobileNetV1")]:
        model = build_model(name, dataset=dataset)
        bns = model.get_bn_before_relu()
        assert bns and all(isinstance(b, nn.BatchNorm2d) for b in bns)
        assert [b.num_features for b in bns] == list(model.get_stage_channels())[-len(bns):]
    # Bottleneck ImageNet ResNet: the last BN of stages 2-4 (bn3), as mdistiller.
    r50 = build_model("ResNet50", dataset="imagenet")
    assert r50.get_bn_before_relu() == [r50.layer2[-1].bn3, r50.layer3[-1].bn3, r50.layer4[-1].bn3]
    with pytest.raises(NotImplementedError):
        build_model("ShuffleV2", dataset="cifar100").get_bn_before_relu()


@pytest.mark.parametrize("dataset,name,size", [
    ("cifar100", "resnet8", 32), ("cifar100", "wrn_16_1", 32), ("cifar100", "vgg8", 32),
    ("cifar100", "MobileNetV2", 32), ("cifar100", "ShuffleV1", 32), ("cifar100", "ShuffleV2", 32),
    ("tiny_imagenet", "MobileNetV2", 64), ("imagenet", "MobileNetV1", 64),
])
def test_num_classes_respected(dataset, name, size):
    model = build_model(name, num_classes=7, dataset=dataset).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


@pytest.mark.parametrize("dataset,name,size", [
    ("cifar100", "resnet8", 32), ("cifar100", "wrn_16_1", 32), ("cifar100", "vgg8", 32),
    ("cifar100", "MobileNetV2", 32), ("cifar100", "ShuffleV1", 32), ("cifar100", "ShuffleV2", 32),
    ("tiny_imagenet", "MobileNetV2", 64),
    # These pool adaptively, so a small input exercises the same graph.
    ("cifar100", "ResNet18", 16), ("imagenet", "ResNet50", 32), ("imagenet", "MobileNetV1", 32),
])
def test_gradients_flow_through_taps(dataset, name, size):
    """In-place activations must not corrupt tapped tensors needed by autograd."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, dataset=dataset).train()
    taps = get_taps(model)
    all_taps = taps["feats"] + taps["preact_feats"] + [taps["pooled_feat"]]
    logits, feats = run_and_capture(model, all_taps, torch.randn(2, 3, size, size))
    loss = F.cross_entropy(logits, torch.tensor([1, 2])) + sum(f.pow(2).mean() for f in feats)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_training_reduces_loss_on_a_tiny_batch():
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=4, dataset="cifar100").train()
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def _bn_keys(prefix):
    return [f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def test_resnet8_key_list_is_mdistillers():
    expected = ["conv1.weight"] + _bn_keys("bn1")
    for layer in (1, 2, 3):
        b = f"layer{layer}.0"
        expected += [f"{b}.conv1.weight"] + _bn_keys(f"{b}.bn1") + [f"{b}.conv2.weight"] + _bn_keys(f"{b}.bn2")
        if layer > 1:
            expected += [f"{b}.downsample.0.weight"] + _bn_keys(f"{b}.downsample.1")
    expected += ["fc.weight", "fc.bias"]
    assert list(build_model("resnet8").state_dict()) == expected


@pytest.mark.parametrize("dataset,name,keys", [
    ("cifar100", "wrn_16_1", {"block1.layer.0.bn1.weight": (16,), "block2.layer.0.convShortcut.weight": (32, 16, 1, 1),
                              "bn1.running_var": (64,), "fc.weight": (100, 64)}),
    ("cifar100", "vgg13", {"block0.0.weight": (64, 3, 3, 3), "block0.0.bias": (64,), "block4.4.running_mean": (512,),
                           "classifier.weight": (100, 512)}),
    ("cifar100", "ResNet50", {"layer1.0.shortcut.0.weight": (256, 64, 1, 1), "layer4.2.bn3.weight": (2048,),
                              "linear.weight": (100, 2048)}),
    ("cifar100", "MobileNetV2", {"conv1.0.weight": (16, 3, 3, 3), "blocks.6.0.conv.7.weight": (160,),
                                 "conv2.0.weight": (1280, 160, 1, 1), "classifier.0.weight": (100, 1280)}),
    ("cifar100", "ShuffleV1", {"layer1.0.conv1.weight": (54, 24, 1, 1), "layer3.3.conv3.weight": (960, 80, 1, 1),
                               "linear.weight": (100, 960)}),
    ("cifar100", "ShuffleV2", {"layer1.0.conv5.weight": (58, 58, 1, 1), "layer3.3.bn3.weight": (232,),
                               "conv2.weight": (1024, 464, 1, 1), "linear.weight": (100, 1024)}),
    ("tiny_imagenet", "MobileNetV2", {"pre.0.bias": (32,), "stage7.residual.6.weight": (320, 960, 1, 1),
                                      "conv2.weight": (200, 1280, 1, 1), "conv2.bias": (200,)}),
    ("imagenet", "MobileNetV1", {"model.0.0.weight": (32, 3, 3, 3), "model.13.4.running_var": (1024,),
                                 "fc.weight": (1000, 1024)}),
])
def test_pinned_parameter_names(dataset, name, keys):
    """Names and shapes read from mdistiller's models (its checkpoints use them)."""
    num_classes = {"cifar100": 100, "tiny_imagenet": 200, "imagenet": 1000}[dataset]
    sd = build_model(name, num_classes=num_classes, dataset=dataset).state_dict()
    for k, shape in keys.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, k


@pytest.mark.parametrize("name", ["ResNet18", "ResNet50"])
def test_imagenet_resnet_matches_torchvision_layout(name):
    import torchvision

    tv = getattr(torchvision.models, name.lower())(weights=None).state_dict()
    ours = build_model(name, num_classes=1000, dataset="imagenet").state_dict()
    assert [(k, tuple(v.shape)) for k, v in ours.items()] == [(k, tuple(v.shape)) for k, v in tv.items()]


def test_checkpoint_in_mdistiller_layout_loads_strict(tmp_path):
    torch.manual_seed(0)
    src = build_model("resnet8x4", dataset="cifar100").eval()
    with torch.no_grad():  # non-trivial BN statistics
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": src.state_dict(), "epoch": 240}, path)

    dst = build_model("resnet8x4", dataset="cifar100").eval()
    result = dst.load_state_dict(torch.load(path, map_location="cpu")["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


def test_tiny_shufflev2_shares_cifar_layout():
    """Same parameter names and shapes as the CIFAR model except the class count."""
    cifar = build_model("ShuffleV2", num_classes=200, dataset="cifar100").state_dict()
    tiny = build_model("ShuffleV2", num_classes=200, dataset="tiny_imagenet").state_dict()
    assert [(k, v.shape) for k, v in cifar.items()] == [(k, v.shape) for k, v in tiny.items()]


def test_foreign_module_without_taps_gets_clear_error():
    with pytest.raises(TypeError, match="tap_points"):
        get_taps(nn.Linear(3, 4))
