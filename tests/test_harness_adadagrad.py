"""AdAdaGrad: the norm, inner-product and augmented inner-product tests on hand-made per-sample gradients (per tensor,
as the reference tests.py), AdaGrad-Norm's scalar and row-wise steps by hand, the per-sample gradients against a loop
of single-sample backward passes, and the batch growing inside the loop."""

import math

import pytest
import torch
from torch import nn

from diffkit.harness import train
from diffkit.harness.adadagrad import (AdaGradNorm, AdaGradNormRowwise, AdaptiveBatchSize, StepsToTarget,
                                       augmented_inner_product_test_batch_size, inner_product_test_batch_size,
                                       norm_test_batch_size, per_sample_gradients)
from diffkit.harness.data import digits
from diffkit.harness.registry import CrossEntropy


# three samples, two coordinates: mean (2, 1); per-coordinate unbiased variances 1 and 1
G = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, 2.0]])


def test_norm_test_batch_size_by_hand():
    # ||Var||_1 = 1 + 1 = 2, ||g||^2 = 4 + 1 = 5: 2 / (eta^2 * 5)
    assert norm_test_batch_size(G, eta=0.1, batch_size=3) == math.ceil(2 / (0.01 * 5))  # 40
    assert norm_test_batch_size(G, eta=0.5, batch_size=3) == 3  # 2 / 1.25 = 1.6 < 3: the batch never shrinks
    assert norm_test_batch_size(G, eta=0.2, batch_size=3) == 10  # 2 / 0.2 = 10 exactly: no spurious rounding up
    # identical per-sample gradients have no variance: the test passes at any batch size
    assert norm_test_batch_size(G[:1].repeat(5, 1), eta=0.01, batch_size=5) == 5


def test_inner_product_test_batch_size_by_hand():
    # <g_i, g> = 2, 5, 8 with g = (2, 1): variance 9; ||g||^4 = 25; 9 / (0.01 * 25) = 36
    assert inner_product_test_batch_size(G, theta=0.1, batch_size=3) == 36
    # gradients that differ only orthogonally to their mean pass the inner-product test but not the norm test
    ortho = torch.tensor([[1.0, 1.0], [1.0, -1.0], [1.0, 3.0], [1.0, -3.0]])
    assert inner_product_test_batch_size(ortho, theta=0.1, batch_size=4) == 4
    assert norm_test_batch_size(ortho, eta=0.1, batch_size=4) > 4
    with pytest.raises(ValueError, match="per_sample_grads"):
        norm_test_batch_size(G[:1], eta=0.1, batch_size=1)
    with pytest.raises(ValueError, match="per_sample_grads"):
        norm_test_batch_size([G, G[:2]], eta=0.1, batch_size=3)
    with pytest.raises(ValueError, match="theta"):
        inner_product_test_batch_size(G, theta=0.0, batch_size=3)


def test_inner_product_variance_is_summed_per_tensor_as_the_reference():
    # two tensors of one coordinate each: g_i = (a_i, c_i). Per tensor, <g_i,t, g_t> = a_i mean(a) and c_i mean(c);
    # the reference sums the two variances (no cross-covariance term)
    a, c = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[3.0], [2.0], [1.0]])
    ip_a, ip_c = (a * a.mean()).flatten(), (c * c.mean()).flatten()  # 2, 4, 6 and 6, 4, 2: variance 4 each
    norm4 = (a.mean() ** 2 + c.mean() ** 2) ** 2  # (4 + 4)^2 = 64
    expected = math.ceil((ip_a.var() + ip_c.var()).item() / (0.01 * norm4))  # 8 / 0.64 = 12.5 -> 13
    assert inner_product_test_batch_size([a, c], theta=0.1, batch_size=3) == expected == 13
    # flattened into one tensor the two inner products cancel (a_i + c_i = 4): that is not the reference's test
    assert inner_product_test_batch_size(torch.cat([a, c], 1), theta=0.1, batch_size=3) == 3


def test_augmented_test_adds_the_orthogonal_parts_norm_test():
    # mean (1, 0): inner products 1, 1, 1, 1 (no variance); orthogonal parts (0, +-1), (0, +-3): variance 20/3
    ortho = torch.tensor([[1.0, 1.0], [1.0, -1.0], [1.0, 3.0], [1.0, -3.0]])
    assert inner_product_test_batch_size(ortho, theta=0.1, batch_size=4) == 4
    expected = math.ceil((torch.tensor([1.0, -1.0, 3.0, -3.0]).var() / (0.5**2 * 1.0)).item())  # 26.67 -> 27
    assert augmented_inner_product_test_batch_size(ortho, theta=0.1, nu=0.5, batch_size=4) == expected == 27
    # along the mean only: the orthogonal parts vanish, the inner-product part decides
    assert augmented_inner_product_test_batch_size(G[:, :1], theta=0.1, nu=0.1, batch_size=3) == \
        inner_product_test_batch_size(G[:, :1], theta=0.1, batch_size=3)
    with pytest.raises(ValueError, match="nu must be > 0"):
        augmented_inner_product_test_batch_size(ortho, theta=0.1, nu=0, batch_size=4)


def test_rowwise_adagrad_norm_step_by_hand():
    w = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 0.0]]))
    bias = nn.Parameter(torch.tensor([0.1, -0.1]))
    opt = AdaGradNormRowwise([w, bias], lr=0.5)
    gw, gb = torch.tensor([[3.0, 4.0], [0.0, 1.0]]), torch.tensor([2.0, 0.0])
    w.grad, bias.grad = gw.clone(), gb.clone()
    opt.step()
    rows = torch.tensor([25.0, 1.0])  # ||g_r||^2 per row
    expected_w = torch.tensor([[1.0, -2.0], [0.5, 0.0]]) - 0.5 * gw / (torch.sqrt(0.01 + rows) + 1e-10)[:, None]
    # the bias entry r accumulates row r's ||g_r||^2 and its own g^2 (the reference's bias rule)
    expected_b = torch.tensor([0.1, -0.1]) - 0.5 * gb / (torch.sqrt(0.01 + rows + gb**2) + 1e-10)
    torch.testing.assert_close(w.detach(), expected_w)
    torch.testing.assert_close(bias.detach(), expected_b)
    with pytest.raises(ValueError, match="initial_accumulator_value"):
        AdaGradNormRowwise([w], initial_accumulator_value=0)


def test_adagrad_norm_step_by_hand():
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    v = nn.Parameter(torch.tensor([0.5]))
    opt = AdaGradNorm([{"params": [w]}, {"params": [v], "lr": 0.5}], lr=1.0, b0=0.1)
    grads = [(torch.tensor([3.0, 4.0]), torch.tensor([12.0])), (torch.tensor([0.0, 1.0]), torch.tensor([0.0]))]
    b2, w_hand, v_hand = 0.1**2, [1.0, -2.0], [0.5]
    for gw, gv in grads:
        w.grad, v.grad = gw.clone(), gv.clone()
        opt.step()
        # one scalar accumulator over both groups: b^2 += ||g_w||^2 + ||g_v||^2
        b2 += gw.square().sum().item() + gv.square().sum().item()
        w_hand = [a - 1.0 / math.sqrt(b2) * g for a, g in zip(w_hand, gw.tolist())]
        v_hand = [a - 0.5 / math.sqrt(b2) * g for a, g in zip(v_hand, gv.tolist())]
        assert w.tolist() == pytest.approx(w_hand, rel=1e-6) and v.tolist() == pytest.approx(v_hand, rel=1e-6)
    # after the first step b = sqrt(0.01 + 169) = 13.0004: the step is ~g / 13, not coordinate-wise AdaGrad's sign step
    assert b2 == pytest.approx(0.01 + 169 + 1)
    with pytest.raises(ValueError, match="b0"):
        AdaGradNorm([w], b0=0)


def test_per_sample_gradients_match_single_sample_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    fast = per_sample_gradients(model, x, y)
    for i in range(6):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for block, p in zip(fast, model.parameters()):  # one (n, d_t) block per parameter tensor
            torch.testing.assert_close(block[i], p.grad.flatten())


def test_the_batch_grows_step_by_step_in_the_loop_and_never_shrinks():
    data = digits(seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    algorithm = AdaptiveBatchSize(test="augmented_inner_product", theta=0.1, nu=0.1, max_batch_size=512)
    hook = StepsToTarget(data.x_test, data.y_test, target=0.99, every=1000, equal_steps=5)
    state = train(model, data, optimizer=AdaGradNorm(model.parameters()), criterion=CrossEntropy(), epochs=2,
                  batch_size=4, seed=0, algorithm=algorithm, hooks=[hook], progress=False)
    sizes = state.logs["curves"]["batch_size"]
    # the accuracy after 5 steps is the 5th-step evaluation of the curve
    assert [row for row in state.logs["curves"]["test_accuracy"] if row[0] == 5][0][2] == \
        state.logs["test_accuracy_at_equal_steps"]
    assert sizes[0] == 4 and len(sizes) == state.step
    assert all(b >= a for a, b in zip(sizes, sizes[1:])) and 4 < sizes[-1] <= 512
    # the epoch was cut into batches of the growing size: every step consumed its own batch size of examples
    assert sum(sizes) <= 2 * len(data.y_train)
    with pytest.raises(ValueError, match="test"):
        AdaptiveBatchSize(test="variance")


def test_card_is_the_reference_expt_sh_setting_mnist5k_logistic_regression():
    """The card runs timlautk/AdAdaGrad expt.sh's MNIST setting at CPU scale: multinomial logistic regression (one
    linear layer, nothing else) on MNIST-5k's 4,000 training digits, AdaGrad at 8e-3 from a batch of 2."""
    from diffkit.harness.cards import load_card
    from diffkit.harness.registry import MODELS
    from diffkit.harness.tasks.base import build_data

    card = load_card("cards/adadagrad.json")
    assert card["model"] == {"name": "logistic"} and card["optimizer"] == {"name": "adagrad", "lr": 8e-3}
    assert card["budget"]["batch_size"] == 2
    data = build_data(card, 0)
    assert data.x_train.shape == (4000, 784) and data.x_test.shape == (1000, 784)
    assert 0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1
    model = MODELS.build("logistic", 784, 10)
    assert [type(m) for m in model.modules() if not isinstance(m, nn.Sequential)] == [nn.Linear]
    x = data.x_train[:5]
    linear = model[0]
    torch.testing.assert_close(model(x), x @ linear.weight.T + linear.bias)
