"""Hessian / gradient alignment (HGP, Hutchinson): the identity H g = ||g|| grad ||g|| against an explicit
Hessian-vector product, Hutchinson's diagonal against the exact Hessian diagonal, the penalty's zero when environments
agree, and the coloured-digits environments' correlations."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffkit.harness.data import HarnessData, colored_environments
from diffkit.harness.hessian_alignment import (HessianAlignment, alignment_penalty, flat_grad,
                                               hessian_gradient_product, hutchinson_diagonal, rademacher_probes)


def _head_problem(seed=0, n=40, features=5, classes=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=gen)
    head = nn.Linear(features, classes).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(classes, features, generator=gen, dtype=torch.float64))
    return x, y, head


def _flat_loss(x, y, shape):
    # the head's cross-entropy as a function of its flattened (weight, bias): for torch.autograd.functional
    def loss(theta):
        w = theta[: shape[0] * shape[1]].view(shape)
        return F.cross_entropy(x @ w.T + theta[shape[0] * shape[1]:], y)

    return loss


def test_hgp_identity_equals_an_explicit_hessian_vector_product():
    x, y, head = _head_problem()
    params = list(head.parameters())
    g, hg = hessian_gradient_product(F.cross_entropy(head(x), y), params)
    theta = torch.cat([p.detach().flatten() for p in params])
    _, reference = torch.autograd.functional.hvp(_flat_loss(x, y, head.weight.shape), theta, g.detach())
    torch.testing.assert_close(hg, reference, rtol=1e-10, atol=1e-12)
    # and it is not merely g: the Hessian acts on it
    assert (hg - g).norm() > 0.1 * g.norm()


def test_hutchinson_estimate_approaches_the_exact_hessian_diagonal():
    x, y, head = _head_problem(seed=1)
    params = list(head.parameters())
    g = flat_grad(F.cross_entropy(head(x), y), params)
    theta = torch.cat([p.detach().flatten() for p in params])
    exact = torch.autograd.functional.hessian(_flat_loss(x, y, head.weight.shape), theta).diagonal()
    generator = torch.Generator().manual_seed(0)
    many = hutchinson_diagonal(g, params, rademacher_probes(4000, len(theta), generator))
    assert (many - exact).abs().max() < 0.05 * exact.abs().max()
    few = hutchinson_diagonal(g, params, rademacher_probes(2, len(theta), generator))
    assert (few - exact).abs().max() > (many - exact).abs().max()  # the error shrinks with the probe count
    # one probe z gives z * (H z) exactly
    z = rademacher_probes(1, len(theta), generator)
    hessian = torch.autograd.functional.hessian(_flat_loss(x, y, head.weight.shape), theta)
    torch.testing.assert_close(hutchinson_diagonal(g, params, z), z[0] * (hessian @ z[0].double()))
    with pytest.raises(ValueError, match="probes"):
        hutchinson_diagonal(g, params, z[:, :3])


def test_penalty_is_zero_when_environments_share_gradients_and_positive_when_they_differ():
    x, y, head = _head_problem(seed=2)
    params = list(head.parameters())
    probes = rademacher_probes(20, sum(p.numel() for p in params), torch.Generator().manual_seed(0))
    curvatures = {
        "hgp": lambda loss: hessian_gradient_product(loss, params),
        "hutchinson": lambda loss: (lambda g: (g, hutchinson_diagonal(g, params, probes)))(flat_grad(loss, params)),
    }
    for name, curvature in curvatures.items():
        same = [F.cross_entropy(head(x), y), F.cross_entropy(head(x), y)]  # two copies of one environment
        assert alignment_penalty(same, params, 1.0, 1.0, curvature).item() == pytest.approx(0.0, abs=1e-20), name
        different = [F.cross_entropy(head(x[:20]), y[:20]), F.cross_entropy(head(x[20:]), y[20:])]
        beta_only = alignment_penalty(different, params, 0.0, 1.0, curvature)
        g0, g1 = (flat_grad(loss, params) for loss in different)
        # with two environments each gradient sits ||g0 - g1|| / 2 from their mean
        assert beta_only.item() == pytest.approx(((g0 - g1) / 2).square().sum().item(), rel=1e-9), name
        assert alignment_penalty(different, params, 1.0, 0.0, curvature).item() > 0, name


def _tiny_state(model, step=0):
    return SimpleNamespace(unwrapped_model=model, step=step, logs={}, accelerator=SimpleNamespace(num_processes=1),
                           criterion=lambda logits, y, index: F.cross_entropy(logits, y))


def test_algorithm_trains_the_whole_model_through_the_head_penalty_and_follows_the_ramp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    batch = {"x": torch.randn(32, 6), "y": torch.randint(0, 2, (32,)), "index": torch.arange(32),
             "env": torch.arange(32) % 2}
    erm_like = HessianAlignment("hgp", alpha=0.0, beta=0.0)
    loss, _ = erm_like(_tiny_state(model), batch)
    env_losses = [F.cross_entropy(model(batch["x"][batch["env"] == e]), batch["y"][batch["env"] == e]) for e in (0, 1)]
    assert loss.item() == pytest.approx(torch.stack(env_losses).mean().item(), rel=1e-6)
    ramped = HessianAlignment("hgp", alpha=1.0, beta=1.0, penalty_weight=100.0, anneal_steps=5)
    before, after = _tiny_state(model, step=4), _tiny_state(model, step=5)
    loss_before, loss_after = ramped(before, batch)[0], ramped(after, batch)[0]
    penalty = before.logs["alignment_penalty"]
    assert loss_before.item() == pytest.approx(loss.item() + penalty, rel=1e-5)
    assert loss_after.item() == pytest.approx((loss.item() + 100 * penalty) / 100, rel=1e-5)
    loss_after.backward()
    assert model[0].weight.grad.abs().sum() > 0  # the featuriser learns through the head's penalty
    with pytest.raises(ValueError, match="env"):
        ramped(after, {k: v for k, v in batch.items() if k != "env"})
    with pytest.raises(ValueError, match="estimator"):
        HessianAlignment("newton")
    with pytest.raises(TypeError, match="nn.Linear head"):
        ramped(_tiny_state(nn.Sequential(nn.Linear(6, 2), nn.ReLU())), batch)


def test_colored_environments_have_the_stated_correlations():
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    digits = torch.randint(0, 10, (n,), generator=gen)
    x = torch.rand(n, 64, generator=gen) + 0.1  # no all-zero images: the lit channel shows the colour
    data = colored_environments(HarnessData(x, digits, x[:5000], digits[:5000], 10), seed=0)
    assert data.x_train.shape == (n, 128) and data.num_classes == 2
    env = data.train_extra["env"]
    assert env.bincount().tolist() == [n // 2, n // 2]

    def colour(features):
        return (features[:, 64:].abs().sum(1) > 0).long()

    clean = (digits < 5).long()
    assert (data.y_train != clean).float().mean().item() == pytest.approx(0.25, abs=0.015)  # label noise
    for e, correlation in enumerate([0.9, 0.8]):
        agree = (colour(data.x_train[env == e]) == data.y_train[env == e]).float().mean().item()
        assert agree == pytest.approx(correlation, abs=0.015)
    assert (colour(data.x_test) == data.y_test).float().mean().item() == pytest.approx(0.1, abs=0.015)
    # the shape channel content is the image itself, in whichever channel is lit
    lit = torch.where(colour(data.x_train)[:, None].bool(), data.x_train[:, 64:], data.x_train[:, :64])
    torch.testing.assert_close(lit, x)
    with pytest.raises(ValueError, match="10-class"):
        colored_environments(HarnessData(x, clean, x, clean, 2), seed=0)


def test_downsample_keeps_every_second_pixel_as_the_coloured_mnist_script():
    from diffkit.harness.data import HarnessData
    from diffkit.harness.hessian_alignment import downsample

    x = torch.arange(2 * 28 * 28, dtype=torch.float).view(2, 784)
    data = HarnessData(x, torch.tensor([0, 1]), x[:1], torch.tensor([0]), 10, image_shape=(1, 28, 28))
    out = downsample(data, 0)
    assert out.image_shape == (1, 14, 14) and out.num_features == 196
    torch.testing.assert_close(out.x_train, x.view(2, 28, 28)[:, ::2, ::2].reshape(2, 196))
    with pytest.raises(ValueError, match="factor"):
        downsample(data, 0, factor=0)
