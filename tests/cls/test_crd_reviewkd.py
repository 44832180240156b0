"""CRD and ReviewKD: one step on homogeneous and heterogeneous pairs, overfitting, extra-parameter counts."""
import os

import numpy as np
import pytest
import torch

from kd_cls.engine import get_cfg
from kd_cls.data.crd_sample import ContrastiveSampleDataset
from kd_cls.distillers import build_distiller
from kd_cls.losses import crd_nce_loss
from kd_cls.models import build_model

# REVIEWKD settings for resnet32x4 -> ShuffleV2: the student's stages are 116/232/464
# channels at 16/8/4 px, then the 1024-d pooled feature.
SHUV2_REVIEWKD = ["REVIEWKD.SHAPES", "[1,4,8,16]", "REVIEWKD.IN_CHANNELS", "[116,232,464,1024]"]
SHUV2_CRD = ["CRD.FEAT.STUDENT_DIM", 1024]


@pytest.fixture(scope="module")
def zoo():
    cache = {}

    def get(name, dataset="cifar100", num_classes=100):
        key = (name, dataset)
        if key not in cache:
            torch.manual_seed(0)
            cache[key] = build_model(name, num_classes=num_classes, dataset=dataset)
        return cache[key]

    return get


def _cfg(method, opts=(), fold=False):
    cfg = get_cfg()
    cfg.DISTILLER.TYPE = method
    # The teacher's BN-folded copy is exercised by the one-step tests of the homogeneous pair only.
    cfg.SOLVER.FOLD_TEACHER_BN = fold
    cfg.merge_from_list(list(opts))
    return cfg


def _distiller(zoo, method, teacher, student, opts=(), num_data=64, fold=False):
    import copy

    torch.manual_seed(0)
    return build_distiller(_cfg(method, opts, fold), copy.deepcopy(zoo(student)), zoo(teacher), num_data=num_data)


def _sgd(d):
    return torch.optim.SGD(d.get_learnable_parameters(), lr=0.05, momentum=0.9)


# ----------------------------------------------------------------------------- one step
@pytest.mark.parametrize(
    "method,teacher,student,opts",
    [
        ("CRD", "resnet32x4", "resnet8x4", ["CRD.NCE.K", 16]),
        ("CRD", "resnet32x4", "ShuffleV2", ["CRD.NCE.K", 16] + SHUV2_CRD),
        ("REVIEWKD", "resnet32x4", "resnet8x4", []),
        ("REVIEWKD", "resnet32x4", "ShuffleV2", SHUV2_REVIEWKD),
    ],
)
def test_one_training_step_on_cpu(zoo, method, teacher, student, opts):
    d = _distiller(zoo, method, teacher, student, opts, fold=student == "resnet8x4").train()
    opt = _sgd(d)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    extras = {"index": torch.tensor([4, 9])} if method == "CRD" else {}
    before = [p.detach().clone() for p in d.extra_modules()[0].parameters()]
    logits, losses = d(image=x, target=y, epoch=1, **extras)
    assert logits.shape == (2, 100) and set(losses) == {"loss_ce", "loss_kd"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    after = list(d.extra_modules()[0].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the method's own modules must learn"
    assert all(p.grad is None for p in d.teacher.parameters())


class _ProjTeacher(torch.nn.Module):
    """A teacher whose pooled feature is a random projection of the pixels.

    A random ResNet maps every image to nearly the same pooled direction (cosine ~0.999),
    so there would be nothing to contrast; this one keeps the images apart.
    """

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 32 * 32, 64)
        self.fc = torch.nn.Linear(64, 100)

    def forward(self, x):
        return self.fc(self.proj(x.flatten(1)))

    def tap_points(self):
        return {"feats": [], "preact_feats": [], "pooled_feat": "fc:in"}


def _overfit(d, steps, x, y, extras):
    opt = _sgd(d)
    kd = []
    for _ in range(steps):
        _, losses = d(image=x, target=y, epoch=100, **extras)
        kd.append(losses["loss_kd"].item())
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    return kd


def test_crd_overfits_a_tiny_batch():
    torch.manual_seed(0)
    cfg = _cfg("CRD", ["CRD.NCE.K", 3, "CRD.FEAT.STUDENT_DIM", 64, "CRD.FEAT.TEACHER_DIM", 64])
    d = build_distiller(cfg, build_model("resnet8", 100), _ProjTeacher(), num_data=8).train()
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    # Each sample against the other three as negatives.
    idx = torch.arange(4)
    extras = {"index": idx, "contrastive_index": torch.stack([torch.roll(idx, -s) for s in range(4)], 1)}
    kd = _overfit(d, 10, x, y, extras)
    assert kd[-1] < 0.5 * kd[0], kd


def test_reviewkd_overfits_a_tiny_batch(zoo):
    # The cheapest CIFAR pair; the REVIEWKD lists follow resnet8/resnet20's 16/32/64 channels.
    opts = ["REVIEWKD.IN_CHANNELS", "[16,32,64,64]", "REVIEWKD.OUT_CHANNELS", "[16,32,64,64]"]
    d = _distiller(zoo, "REVIEWKD", "resnet20", "resnet8", opts).train()
    torch.manual_seed(1)
    kd = _overfit(d, 8, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), {})
    assert all(b < a for a, b in zip(kd, kd[1:])) and kd[-1] < 0.9 * kd[0], kd


# ----------------------------------------------------------------------------- CRD parts
def test_crd_nce_loss_hand_computed():
    # N = 1, K = 2, num_data = 4 -> c = K / num_data = 0.5
    # -(log(1.5 / 2.0) + log(0.5 / 1.0) + log(0.5 / 0.75)) = 1.3862944 (eps 1e-7 aside)
    s = torch.tensor([[1.5, 0.5, 0.25]])
    expected = -(np.log(1.5 / 2.0) + np.log(0.5 / 1.0) + np.log(0.5 / 0.75))
    assert crd_nce_loss(s, 4).item() == pytest.approx(expected, rel=1e-5)


def test_crd_memory_momentum_update_and_normalisation(zoo):
    d = _distiller(zoo, "CRD", "resnet20", "resnet8",
                   ["CRD.NCE.K", 2, "CRD.FEAT.DIM", 4, "CRD.FEAT.STUDENT_DIM", 64, "CRD.FEAT.TEACHER_DIM", 64],
                   num_data=10)
    mem = d.contrast
    v1 = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    v2 = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    idx = torch.tensor([3, 8])
    old1 = mem.memory_v1[idx].clone()
    untouched = mem.memory_v1[[0, 1, 2]].clone()
    out_v1, out_v2 = mem(v1, v2, idx, torch.tensor([[3, 0, 1], [8, 2, 2]]))
    assert out_v1.shape == (2, 3) and out_v2.shape == (2, 3)
    expect = 0.5 * old1 + 0.5 * v1
    expect = expect / expect.norm(dim=1, keepdim=True)
    assert torch.allclose(mem.memory_v1[idx], expect, atol=1e-6)
    assert torch.equal(mem.memory_v1[[0, 1, 2]], untouched)
    assert float(mem.params[2]) > 0 and float(mem.params[3]) > 0  # Z set once, then kept
    assert {"contrast.memory_v1", "contrast.memory_v2", "contrast.params"} <= set(d.state_dict())


def test_crd_needs_index_and_checks_feature_dims(zoo):
    d = _distiller(zoo, "CRD", "resnet20", "resnet8", ["CRD.NCE.K", 4], num_data=8).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="SOLVER.TRAINER"):
        d(image=x, target=y)
    with pytest.raises(ValueError, match=r"CRD.FEAT.STUDENT_DIM 64"):
        d(image=x, target=y, index=torch.tensor([0, 1]))


def test_contrastive_sample_dataset_draws_other_classes():
    targets = [0, 0, 1, 1, 2, 2, 2]
    base = [(f"img{i}", t) for i, t in enumerate(targets)]
    ds = ContrastiveSampleDataset(base, targets, k=20, mode="exact")
    np.random.seed(0)
    for i in range(len(targets)):
        img, target, index, sample = ds[i]
        assert (img, target, index) == (f"img{i}", targets[i], i)
        assert sample.shape == (21,) and sample[0] == i
        assert all(targets[j] != targets[i] for j in sample[1:])
    relax = ContrastiveSampleDataset(base, targets, k=3, mode="relax")
    assert all(targets[relax[4][3][0]] == 2 for _ in range(5))
    with pytest.raises(ValueError, match="exact, relax"):
        ContrastiveSampleDataset(base, targets, k=3, mode="loose")


# ----------------------------------------------------------------------------- extra parameters
def _abf_params(cin, mid, cout, fuse):
    """conv1 1x1 (no bias) + BN, conv2 3x3 (no bias) + BN, attention 1x1 conv (with bias) if fused."""
    return cin * mid + 2 * mid + 9 * mid * cout + 2 * cout + ((2 * mid) * 2 + 2 if fuse else 0)


def test_extra_parameter_counts(zoo, repo_root):
    # CRD: embeddings + both memory banks + its 5 constants. Figures measured with mdistiller's code
    # (cifar100/crd.yaml, num_data 50000): 12,865,797; with a ShuffleV2 student (1024-d): 12,964,101.
    crd = _distiller(zoo, "CRD", "resnet32x4", "resnet8x4", num_data=50000)
    assert crd.get_extra_parameters() == 12_865_797 == 2 * 50000 * 128 + 2 * (256 * 128 + 128) + 5
    crd = _distiller(zoo, "CRD", "resnet32x4", "ShuffleV2", SHUV2_CRD, num_data=50000)
    assert crd.get_extra_parameters() == 12_964_101
    # Memory banks are buffers: saved, never optimised.
    assert not any(p is crd.contrast.memory_v1 for p in crd.get_learnable_parameters())

    # ReviewKD: mdistiller's figures (cifar100/reviewkd.yaml 1,808,774; the ShuffleV2 pair 4,195,718;
    # imagenet/r34_r18/reviewkd.yaml 7,552,904), where MAX_MID_CHANNEL >= 512 as mdistiller assumes.
    rkd = _distiller(zoo, "REVIEWKD", "resnet32x4", "resnet8x4")
    assert rkd.get_extra_parameters() == 1_808_774
    rkd = _distiller(zoo, "REVIEWKD", "resnet32x4", "ShuffleV2", SHUV2_REVIEWKD)
    assert rkd.get_extra_parameters() == 4_195_718
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(repo_root, "configs/imagenet/r34_r18/reviewkd.yaml"))
    r34 = build_distiller(cfg, zoo("ResNet18", "imagenet", 1000), zoo("ResNet34", "imagenet", 1000))
    assert r34.get_extra_parameters() == 7_552_904

    # imagenet/r50_mv1/reviewkd.yaml sets MAX_MID_CHANNEL 256, which mdistiller ignores (it counts
    # 28,664,328 with 512 mid channels). Ours honours it: the hand count below, 14,338,056.
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(repo_root, "configs/imagenet/r50_mv1/reviewkd.yaml"))
    r50 = build_distiller(cfg, zoo("MobileNetV1", "imagenet", 1000), zoo("ResNet50", "imagenet", 1000))
    ins, outs = [128, 256, 512, 1024, 1024], [256, 512, 1024, 2048, 2048]
    hand = sum(_abf_params(i, 256, o, k < 4) for k, (i, o) in enumerate(zip(ins, outs)))
    assert r50.get_extra_parameters() == hand == 14_338_056


def test_reviewkd_names_the_config_key_on_a_channel_mismatch(zoo):
    # The defaults describe resnet32x4 -> resnet8x4; resnet8's stages have 16/32/64 channels.
    d = _distiller(zoo, "REVIEWKD", "resnet20", "resnet8").train()
    with pytest.raises(ValueError, match=r"REVIEWKD.IN_CHANNELS\[0\]=64") as e:
        d(image=torch.randn(2, 3, 32, 32), target=torch.tensor([0, 1]), epoch=1)
    assert "16 channels" in str(e.value) and "\n" not in str(e.value)


def test_abf_fuses_a_non_square_residual_at_the_features_own_size():
    """Without ``shape`` (the FPN case), the deeper map is upsampled to ``x``'s own (h, w)."""
    from kd_cls.nn.connectors import ABF

    torch.manual_seed(0)
    abf = ABF(4, 3, 5, fuse=True).eval()  # eval: BN is a fixed affine map, easy to redo by hand
    x, y = torch.randn(2, 4, 6, 10), torch.randn(2, 3, 3, 5)
    out, fused = abf(x, y)
    assert out.shape == (2, 5, 6, 10) and fused.shape == (2, 3, 6, 10)
    with torch.no_grad():
        x1 = abf.conv1(x)
        y_up = y.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest, exact 2x
        att = torch.sigmoid(abf.att_conv[0](torch.cat([x1, y_up], dim=1)))
        expected = x1 * att[:, :1] + y_up * att[:, 1:]
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(out, abf.conv2(expected))
    # The square form with an explicit side gives the same as the default on square maps.
    xs, ys = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(abf(xs, ys)[0], abf(xs, ys, 8, 8)[0])
