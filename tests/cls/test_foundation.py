"""Registries, config, hooks: the pieces every frontend shares."""
import pytest
import torch
from torch import nn

from kd_cls.config import ConfigError
from kd_cls.engine import get_cfg
from kd_cls.hooks import FeatureCapture, run_and_capture
from kd_cls.registry import Registry, UnknownNameError


def test_registry_unknown_name_lists_choices():
    reg = Registry("thing")
    reg.register("alpha", object())
    reg.register("beta", object())
    with pytest.raises(UnknownNameError) as e:
        reg.get("alpah")
    msg = str(e.value)
    assert "'alpah'" in msg and "alpha, beta" in msg and "\n" not in msg


def test_config_typo_is_one_line_with_suggestion():
    cfg = get_cfg()
    with pytest.raises(ConfigError) as e:
        cfg.merge_from_list(["SOLVER.LRR", "0.1"])
    assert "SOLVER.LRR" in str(e.value) and "SOLVER.LR" in str(e.value)
    cfg.merge_from_list(["SOLVER.BATCH_SIZE", "128", "SOLVER.LR", "0.1"])
    assert cfg.SOLVER.BATCH_SIZE == 128 and cfg.SOLVER.LR == 0.1


def test_config_has_mdistiller_defaults():
    cfg = get_cfg()
    assert cfg.SOLVER.LR_DECAY_STAGES == [150, 180, 210]
    assert cfg.DKD.BETA == 8.0 and cfg.DKD.WARMUP == 20
    assert cfg.KD.LOSS.CE_WEIGHT == 0.1 and cfg.KD.TEMPERATURE == 4
    assert cfg.LOG.WANDB is False


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.act(self.body(x) - 0.5)
        return self.fc(x.mean((2, 3)))


def test_hooks_capture_outputs_and_inputs_then_detach():
    net = _Net()
    x = torch.randn(2, 3, 5, 5)
    out, (body, pre, pooled) = run_and_capture(net, ["body", "act:in", "fc:in"], x)
    ref_body = net.body(x)
    assert torch.equal(body, ref_body)
    assert torch.equal(pre, ref_body - 0.5)
    assert torch.equal(out, net.fc(pooled))
    # hooks are removed on exit
    assert not net.body._forward_hooks and not net.act._forward_pre_hooks


def test_hooks_bad_path_names_it():
    with pytest.raises(KeyError) as e:
        FeatureCapture(_Net(), ["bodyy"])
    assert "bodyy" in str(e.value) and "body" in str(e.value)
