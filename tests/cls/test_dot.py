"""DOT (arXiv 2307.08436): the optimizer against hand computations, and its trainer."""
import copy

import pytest
import torch
from torch import nn

from kd_cls.config import ConfigError
from kd_cls.engine import get_cfg
from kd_cls.optim import DOT

LR, M, M_KD, WD = 0.1, 0.8, 0.9, 0.01  # mean momentum (M + M_KD) / 2 = 0.85


def _run(loss_kd_fn, loss_ce_fn, steps, set_to_none=True):
    w1 = nn.Parameter(torch.tensor([1.0]))
    w2 = nn.Parameter(torch.tensor([1.0]))
    opt = DOT([w1, w2], lr=LR, momentum=M, momentum_kd=M_KD, weight_decay=WD)
    for _ in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        loss_kd_fn(w1, w2).backward()
        opt.step_kd()
        opt.zero_grad(set_to_none=set_to_none)
        loss_ce_fn(w1, w2).backward()
        opt.step()
    return w1, w2, opt


# w1 gets both gradients; w2 only the distillation one. Linear losses: constant gradients.
KD_BOTH = lambda w1, w2: 2 * w1.sum() + 3 * w2.sum()  # noqa: E731
CE_W1 = lambda w1, w2: 4 * w1.sum()  # noqa: E731


def test_dot_two_parameters_against_hand_computation():
    # step 1 (buffers start as the first gradient):
    #   w1: v = 4 + 0.01*1 = 4.01, v_kd = 2        -> w1 = 1 - 0.1*(4.01 + 2) = 0.399
    #   w2: v_kd = 3 (no decay on the creating step, as the official code) -> w2 = 1 - 0.3 = 0.7
    w1, w2, opt = _run(KD_BOTH, CE_W1, 1)
    assert w1.item() == pytest.approx(0.399, abs=1e-6)
    assert w2.item() == pytest.approx(0.7, abs=1e-6)
    # step 2:
    #   w1: v = 0.8*4.01 + (4 + 0.01*0.399) = 7.21199, v_kd = 0.9*2 + 2 = 3.8
    #       w1 = 0.399 - 0.1*(7.21199 + 3.8) = -0.702199
    #   w2 (distillation gradient only -> mean momentum 0.85, decay on h):
    #       v_kd = 0.85*3 + (3 + 0.01*0.7) = 5.557 -> w2 = 0.7 - 0.5557 = 0.1443
    w1, w2, opt = _run(KD_BOTH, CE_W1, 2)
    assert w1.item() == pytest.approx(-0.702199, abs=1e-6)
    assert w2.item() == pytest.approx(0.1443, abs=1e-6)
    assert opt.state[w1]["momentum_buffer"].item() == pytest.approx(7.21199, abs=1e-6)
    assert opt.state[w1]["momentum_kd_buffer"].item() == pytest.approx(3.8, abs=1e-6)
    assert opt.state[w2]["momentum_kd_buffer"].item() == pytest.approx(5.557, abs=1e-6)
    assert "momentum_buffer" not in opt.state[w2]


def test_dot_task_only_parameter_uses_mean_momentum():
    # w2 gets only the task gradient 5:
    #   step 1: v = 5 + 0.01*1 = 5.01 -> w2 = 1 - 0.501 = 0.499
    #   step 2: v = 0.85*5.01 + (5 + 0.01*0.499) = 9.26349 -> w2 = 0.499 - 0.926349 = -0.427349
    w1, w2, opt = _run(lambda a, b: 2 * a.sum(), lambda a, b: 4 * a.sum() + 5 * b.sum(), 2)
    assert w2.item() == pytest.approx(-0.427349, abs=1e-6)
    assert w1.item() == pytest.approx(-0.702199, abs=1e-6)  # same as in the test above
    assert "momentum_kd_buffer" not in opt.state[w2]


def test_dot_does_not_depend_on_set_to_none():
    a = _run(KD_BOTH, CE_W1, 3, set_to_none=True)
    b = _run(KD_BOTH, CE_W1, 3, set_to_none=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_dot_equals_sgd_when_momenta_are_equal_and_losses_summed():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    ref = copy.deepcopy(net)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    opt = DOT(net.parameters(), lr=0.05, momentum=0.9, momentum_kd=0.9, weight_decay=1e-3)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        out = net(x)
        opt.zero_grad()
        (out - y).pow(2).mean().backward(retain_graph=True)
        opt.step_kd()
        opt.zero_grad()
        out.abs().mean().backward()
        opt.step()
        sgd.zero_grad()
        out = ref(x)
        ((out - y).pow(2).mean() + out.abs().mean()).backward()
        sgd.step()
    # Equal momenta: v + v_kd follows SGD's single buffer, except that decay enters once.
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_dot_state_dict_resumes_exactly():
    full = _run(KD_BOTH, CE_W1, 3)
    w1, w2, opt = _run(KD_BOTH, CE_W1, 1)
    state = copy.deepcopy(opt.state_dict())
    w1b, w2b = nn.Parameter(w1.detach().clone()), nn.Parameter(w2.detach().clone())
    opt2 = DOT([w1b, w2b], lr=LR, momentum=M, momentum_kd=M_KD, weight_decay=WD)
    opt2.load_state_dict(state)
    for _ in range(2):
        opt2.zero_grad()
        KD_BOTH(w1b, w2b).backward()
        opt2.step_kd()
        opt2.zero_grad()
        CE_W1(w1b, w2b).backward()
        opt2.step()
    assert w1b.item() == pytest.approx(full[0].item(), abs=1e-7)
    assert w2b.item() == pytest.approx(full[1].item(), abs=1e-7)


def test_dot_rejects_negative_hyperparameters():
    with pytest.raises(ValueError, match="momentum_kd"):
        DOT([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9, momentum_kd=-0.1)


# ----------------------------------------------------------------------------- trainer
class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _toy_trainer(tmp_path, trainer_name, losses_fn, seen):
    from kd_cls.distillers import Distiller
    from kd_cls.engine.trainers import get_trainer

    class Spy(Distiller):
        def forward_train(self, image, target, **kwargs):
            seen.append(kwargs)
            logits = self.student(image)
            return logits, losses_fn(logits, target)

    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.TRAINER", trainer_name, "SOLVER.MOMENTUM", 0.9, "SOLVER.DOT.DELTA", 0.075,
                         "LOG.PREFIX", str(tmp_path), "LOG.EVAL_TEACHER", False])
    distiller = Spy(_Toy(), _Toy(), cfg)
    return get_trainer(trainer_name)("toy", distiller, [], [], cfg)


def test_dot_trainers_set_both_momenta_and_pass_epoch_and_indices(tmp_path):
    import torch.nn.functional as F

    seen = []
    losses = lambda z, t: {"loss_ce": F.cross_entropy(z, t), "loss_kd": z.pow(2).mean()}  # noqa: E731
    for name in ("dot", "crd_dot"):
        seen.clear()
        tr = _toy_trainer(tmp_path, name, losses, seen)
        group = tr.optimizer.param_groups[0]
        assert isinstance(tr.optimizer, DOT)
        assert group["momentum"] == pytest.approx(0.825) and group["momentum_kd"] == pytest.approx(0.975)
        before = tr.distiller.student.fc.weight.detach().clone()
        batch = (torch.randn(2, 1, 2, 2), torch.tensor([0, 2]), torch.tensor([5, 7]), torch.zeros(2, 4).long())
        out = tr.train_step(batch, epoch=3)
        assert seen[0]["epoch"] == 3 and seen[0]["index"].tolist() == [5, 7]
        assert torch.isfinite(out["loss"]) and not torch.equal(before, tr.distiller.student.fc.weight)
        assert tr.distiller.student.fc.weight.grad is None  # DOT consumed the gradients


def test_dot_trainer_needs_loss_ce_and_loss_kd(tmp_path):
    import torch.nn.functional as F

    tr = _toy_trainer(tmp_path, "dot", lambda z, t: {"loss_ce": F.cross_entropy(z, t)}, [])
    with pytest.raises(ConfigError, match="loss_kd"):
        tr.train_step((torch.randn(2, 1, 2, 2), torch.tensor([0, 1])), epoch=1)
