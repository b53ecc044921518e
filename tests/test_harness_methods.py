"""The harness's method implementations against hand-worked numbers and their defining equalities."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffkit.harness import (BinaryLinear, ELRLoss, GhostBatchNorm1d, estimating_error, gradient_stability,
                             reste_o, signal_mass)
from diffkit.harness.binary import ResteAnnealing
from diffkit.harness.data import HarnessData, blockmnist, symmetric_noise


# --- ELR ---------------------------------------------------------------------------------------------------------

def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_elr_loss_on_a_hand_worked_example():
    logits = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]
    y, index = [0, 2], [3, 1]  # samples 3 and 1 of a 5-sample data set
    beta, lam = 0.7, 3.0
    # by hand: targets start at 0, so after the update t_i = (1 - beta) p_i (p is far from the clamp, sum p = 1)
    p = [_softmax(r) for r in logits]
    t = [[(1 - beta) * v for v in row] for row in p]
    ce = -(math.log(p[0][0]) + math.log(p[1][2])) / 2
    reg = sum(math.log(1 - sum(a * b for a, b in zip(ti, pi))) for ti, pi in zip(t, p)) / 2
    expected = ce + lam * reg

    loss_fn = ELRLoss(num_samples=5, num_classes=3, beta=beta, lam=lam)
    loss = loss_fn(torch.tensor(logits), torch.tensor(y), torch.tensor(index))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(loss_fn.target[[3, 1]], torch.tensor(t))
    assert loss_fn.target[[0, 2, 4]].abs().sum() == 0  # samples not in the batch keep their targets


def test_elr_target_is_an_ema_of_predictions_per_sample_id():
    loss_fn = ELRLoss(num_samples=4, num_classes=2, beta=0.5, lam=1.0)
    first, second = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    loss_fn(first, torch.tensor([0]), torch.tensor([2]))
    loss_fn(second, torch.tensor([1]), torch.tensor([2]))
    p1, p2 = first.softmax(1), second.softmax(1)
    torch.testing.assert_close(loss_fn.target[2], (0.5 * (0.5 * p1) + 0.5 * p2)[0])


def test_elr_regulariser_pulls_towards_the_target():
    # with lam = 0 the loss is cross-entropy; with lam > 0 the gradient pushes p toward the stored target
    loss_fn = ELRLoss(num_samples=1, num_classes=2, beta=0.9, lam=0.0)
    logits = torch.tensor([[0.3, -0.2]])
    assert loss_fn(logits, torch.tensor([1]), torch.tensor([0])).item() == pytest.approx(
        nn.functional.cross_entropy(logits, torch.tensor([1])).item())
    with pytest.raises(ValueError, match="beta"):
        ELRLoss(10, 3, beta=1.0)


# --- Ghost BN ----------------------------------------------------------------------------------------------------

def test_ghost_bn_equals_batchnorm_per_chunk():
    x = torch.randn(96, 8) * 3 + 1
    ghost = GhostBatchNorm1d(8, ghost_size=32)
    nn.init.normal_(ghost.weight), nn.init.normal_(ghost.bias)
    plain = nn.BatchNorm1d(8)
    plain.load_state_dict(ghost.state_dict())
    out = ghost(x)
    expected = torch.cat([plain(chunk) for chunk in x.split(32)])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(ghost.running_mean, plain.running_mean)
    torch.testing.assert_close(ghost.running_var, plain.running_var)
    # each chunk is normalised by its own statistics: every chunk has mean = bias, not only the whole batch
    for chunk in ((out - ghost.bias) / ghost.weight).split(32):
        torch.testing.assert_close(chunk.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    # and it differs from BN over the whole batch, whose chunks are not centred one by one
    whole = nn.BatchNorm1d(8)
    whole.load_state_dict(plain.state_dict())
    assert not torch.allclose(out, whole(x), atol=1e-3)


def test_ghost_bn_with_the_whole_batch_as_ghost_is_plain_bn():
    x = torch.randn(64, 5)
    ghost, plain = GhostBatchNorm1d(5, ghost_size=64), nn.BatchNorm1d(5)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.testing.assert_close(ghost(x1), plain(x2))
    ghost(x1).square().sum().backward(), plain(x2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(ghost.running_var, plain.running_var)
    ghost.eval(), plain.eval()
    torch.testing.assert_close(ghost(x), plain(x))


# --- binary estimators -------------------------------------------------------------------------------------------

W = [-2.0, -1.2, -0.6, -0.05, 0.05, 0.3, 0.9, 1.0, 1.4, 2.0]


def _forward_and_grad(estimator, **params):
    layer = BinaryLinear(len(W), 1, estimator, **params)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([W]))
    out = layer(torch.ones(1, len(W)))  # out = sum_j forward(w_j), so d out / d w_j = the estimator's derivative
    out.sum().backward()
    return layer.binary_weight().detach()[0].tolist(), layer.weight.grad[0].tolist()


def test_ste_is_sign_forward_and_clipped_identity_backward():
    forward, grad = _forward_and_grad("ste")
    assert forward == [math.copysign(1.0, w) for w in W]
    assert grad == [1.0 if abs(w) <= 1 else 0.0 for w in W]


def test_reste_backward_is_the_power_functions_derivative():
    o, t = 3.0, 1.5
    forward, grad = _forward_and_grad("reste", o=o, t=t)
    assert forward == [math.copysign(1.0, w) for w in W]
    expected = [0.1 ** (1 / o) / 0.1 if abs(w) <= 0.1 else (abs(w) ** ((1 - o) / o)) / o if abs(w) <= t else 0.0
                for w in W]
    assert grad == pytest.approx(expected, rel=1e-6)
    # at o = 1, ReSTE is the identity estimator clipped at t
    assert _forward_and_grad("reste", o=1.0, t=t)[1] == pytest.approx([1.0 if abs(w) <= t else 0.0 for w in W])


def test_biper_is_a_square_wave_with_a_sine_surrogate():
    omega = 20.0
    forward, grad = _forward_and_grad("biper", omega=omega)
    assert forward == [math.copysign(1.0, math.sin(omega * w)) for w in W]
    assert grad == pytest.approx([omega * math.cos(omega * w) for w in W], rel=1e-5, abs=1e-5)


def test_reste_o_annealing_schedule():
    assert reste_o(0, 10) == 1.0 and reste_o(10, 10) == pytest.approx(3.0)
    assert reste_o(5, 10) == pytest.approx(1 + (1 - math.cos(math.pi / 4)) * 2)
    values = [reste_o(e, 20, o_end=4.0) for e in range(21)]
    assert all(b > a for a, b in zip(values, values[1:]))
    # the hook applies the schedule to ReSTE layers after each epoch and leaves other estimators alone
    model = nn.Sequential(BinaryLinear(3, 3, "reste"), BinaryLinear(3, 3, "ste"))
    hook = ResteAnnealing(epochs=10, o_end=3.0)
    hook.on_epoch_end(SimpleNamespace(unwrapped_model=model, epoch=4))
    assert model[0].o == pytest.approx(reste_o(5, 10)) and model[1].o == 1.0
    with pytest.raises(ValueError, match="epoch"):
        reste_o(11, 10)


def test_estimating_error_and_gradient_stability_indicators():
    layer = BinaryLinear(len(W), 1, "ste")
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([W]))
    clipped = [max(-1.0, min(1.0, w)) for w in W]
    expected = math.sqrt(sum((c - math.copysign(1.0, w)) ** 2 for c, w in zip(clipped, W)))
    assert estimating_error(layer) == pytest.approx(expected, rel=1e-6)
    layer(torch.arange(1.0, len(W) + 1)[None]).sum().backward()
    grads = [abs(g) for g in layer.weight.grad[0].tolist()]
    mean = sum(grads) / len(grads)
    assert gradient_stability(layer) == pytest.approx(sum((g - mean) ** 2 for g in grads) / (len(grads) - 1), rel=1e-5)


# --- data methods and attribution --------------------------------------------------------------------------------

def _fake_mnist(n=60):
    x = torch.rand(n, 784)
    y = torch.arange(n) % 10
    return HarnessData(x, y, x[:20], y[:20], 10)


def test_symmetric_noise_follows_elrs_definition():
    data = _fake_mnist(2000)
    noisy = symmetric_noise(data, seed=0, percent=0.4)
    flipped = (noisy.y_train != data.y_train).float().mean().item()
    # 40 % relabelled uniformly over all 10 classes, the true one included: ~36 % actually change
    assert 0.33 < flipped < 0.39
    assert torch.equal(noisy.train_extra["y_clean"], data.y_train) and torch.equal(noisy.y_test, data.y_test)
    assert torch.equal(symmetric_noise(data, seed=0, percent=0.4).y_train, noisy.y_train)


def test_blockmnist_mask_marks_the_digit_and_the_null_block_is_constant():
    data = blockmnist(_fake_mnist(), seed=0)
    x, mask = data.x_train.view(-1, 56, 28), data.train_extra["signal_mask"].view(-1, 56, 28)
    assert set(data.y_train.tolist()) == {0, 1} and len(x) == 12  # digits 0 and 1 of 60
    on_top = mask[:, 0, 0]
    assert 0 < on_top.sum() < len(x)  # both orders occur
    null = torch.where(on_top[:, None, None], x[:, 28:], x[:, :28])
    assert torch.equal(null, null[:1].expand_as(null))  # the same null block in every image
    assert mask.sum((1, 2)).eq(28 * 28).all()


def test_signal_mass_of_a_model_that_only_reads_the_signal_block_is_one():
    data = blockmnist(_fake_mnist(200), seed=0)
    mask = data.train_extra["signal_mask"]
    top = mask.view(-1, 56, 28)[:, 0, 0]
    x, y, mask = data.x_train[top], data.y_train[top], mask[top]
    reads_signal = nn.Linear(56 * 28, 2)
    with torch.no_grad():
        reads_signal.weight[:, 28 * 28:] = 0  # signal is on top for these samples
    assert signal_mass(reads_signal, x, y, mask).tolist() == pytest.approx([1.0] * len(y))
    reads_null = nn.Linear(56 * 28, 2)
    with torch.no_grad():
        reads_null.weight[:, : 28 * 28] = 0
    assert signal_mass(reads_null, x, y, mask).abs().max() == 0
    with pytest.raises(ValueError, match="signal_mask"):
        signal_mass(reads_signal, x, y, mask.float())
