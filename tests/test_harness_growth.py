"""MixtureGrowth as the official code grows: per-layer template sets, each new block from one set with orthogonal
unit coefficients, templates kept and trained after growth; the grown function and the card validation."""

import copy

import pytest
import torch
from torch import nn

from diffkit.harness.cards import validate_card
from diffkit.harness.growth import Growth, TemplateMLP, grow


def _members(hidden=6, depth=3, templates=2):
    torch.manual_seed(0)
    a, b = (TemplateMLP(5, 4, hidden, depth, templates) for _ in range(2))
    return a, b


def test_every_member_layer_is_a_combination_of_its_own_templates():
    a, _ = _members(templates=3)
    layers = [a.stem, *a.blocks, a.head]
    assert len({id(layer.bank) for layer in layers}) == len(layers)  # one template set per layer (no sharing)
    for layer in layers:
        expected = sum(layer.coefficients[k] * layer.bank[k] for k in range(3))
        torch.testing.assert_close(layer.weight(), expected)
        torch.testing.assert_close(layer.coefficients.norm(), torch.tensor(1.0))
    # dL/dT_k = c_k dL/dW (chain rule through the sum)
    x = torch.randn(7, 5)
    w = a.blocks[0].weight().detach().requires_grad_(True)
    h = torch.relu(nn.functional.linear(torch.relu(a.stem(x)), w, a.blocks[0].bias))
    for block in a.blocks[1:]:
        h = torch.relu(block(h))
    (g,) = torch.autograd.grad(a.head(h).square().sum(), w)
    a(x).square().sum().backward()
    expected = torch.stack([a.blocks[0].coefficients[k].detach() * g for k in range(3)])
    torch.testing.assert_close(a.blocks[0].bank.grad, expected)


def test_grown_network_with_zero_new_blocks_is_the_sum_of_the_members_logits():
    a, b = _members()
    grown = grow(a, b, "zero")
    x = torch.randn(11, 5)
    torch.testing.assert_close(grown(x), a(x) + b(x))  # the official head concatenates: logits add
    h, fa, fb = x, a.features(x), b.features(x)
    for i, layer in enumerate(grown.layers[:-1]):  # hidden layers hold the members' activations side by side
        h = torch.relu(layer(h))
        torch.testing.assert_close(h, torch.cat([fa[i], fb[i]], 1))


@pytest.mark.parametrize("init", ["orthogonal", "random", "zero"])
def test_grown_shapes_and_diagonal_blocks_are_the_members(init):
    a, b = _members(hidden=6, depth=4)
    grown = grow(a, b, init)
    weights = [layer.weight().detach() for layer in grown.layers]
    assert [tuple(w.shape) for w in weights] == [(12, 5), (12, 12), (12, 12), (12, 12), (4, 12)]
    for w, block_a, block_b in zip(weights[1:-1], a.blocks, b.blocks):
        torch.testing.assert_close(w[:6, :6], block_a.weight().detach())
        torch.testing.assert_close(w[6:, 6:], block_b.weight().detach())


def test_each_new_block_uses_one_template_set_with_orthogonal_unit_coefficients():
    a, b = _members(hidden=8, templates=4)
    grown = grow(a, b, "orthogonal")
    for layer, block_a, block_b in zip(grown.layers[1:-1], a.blocks, b.blocks):
        w = layer.weight().detach()
        for new, member in ((w[:8, 8:], block_a), (w[8:, :8], block_b)):  # top right: A's set, bottom left: B's
            span = member.bank.detach().flatten(1).T
            coef = torch.linalg.lstsq(span, new.reshape(-1, 1)).solution
            assert ((span @ coef).flatten() - new.flatten()).norm() < 1e-4 * new.norm()
            other = (block_b if member is block_a else block_a).bank.detach().flatten(1).T
            coef = torch.linalg.lstsq(other, new.reshape(-1, 1)).solution
            assert ((other @ coef).flatten() - new.flatten()).norm() > 0.1 * new.norm()  # not the other set
        c = layer.coefficients
        c0, c1, c2, c3 = (c[k].detach() for k in "0123")
        torch.testing.assert_close(torch.stack([c2.norm(), c3.norm()]), torch.ones(2))
        # K = 4 > 3: c_2 is orthogonal to c_0, c_1 and c_3 to c_0, c_1, c_2 (the SVD's last right-singular vectors)
        for x, y in ((c2, c0), (c2, c1), (c3, c0), (c3, c1), (c3, c2)):
            assert abs(float(x @ y)) < 1e-5
        torch.testing.assert_close(c0, block_a.coefficients.detach())
        torch.testing.assert_close(c1, block_b.coefficients.detach())


def test_templates_are_kept_and_trained_after_growth():
    a, b = _members(hidden=6)
    grown = grow(a, b, "orthogonal")
    names = {name for name, _ in grown.named_parameters()}
    assert {"layers.1.banks.A", "layers.1.banks.B", "layers.1.coefficients.2", "layers.1.coefficients.3"} <= names
    before = {name: p.detach().clone() for name, p in grown.named_parameters()}
    optimizer = torch.optim.SGD(grown.parameters(), lr=0.1)
    nn.functional.cross_entropy(grown(torch.randn(16, 5)), torch.randint(0, 4, (16,))).backward()
    optimizer.step()
    moved = {name for name, p in grown.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert moved == names  # every template set, coefficient vector and bias trains
    # after the step the new blocks are still combinations of the (updated) template sets
    w, layer = grown.layers[1].weight().detach(), grown.layers[1]
    expected = torch.einsum("k,koi->oi", layer.coefficients["2"], layer.banks["A"]).detach()
    torch.testing.assert_close(w[:6, 6:], expected)


def test_random_growth_draws_uniform_coefficients():
    a, b = _members(hidden=6, templates=3)
    layer = grow(a, b, "random", torch.Generator().manual_seed(5)).layers[1]
    for k in "23":
        c = layer.coefficients[k].detach()
        assert ((c >= 0) & (c < 1)).all() and not torch.allclose(c, torch.zeros(3))


def test_growth_refuses_bad_arguments():
    a, b = _members()
    with pytest.raises(ValueError, match="init must be one of"):
        grow(a, b, "copy")
    with pytest.raises(ValueError, match="same architecture"):
        grow(a, TemplateMLP(5, 4, 7, 3, 2))
    with pytest.raises(TypeError, match="TemplateMLP"):
        grow(a, nn.Linear(5, 4))
    with pytest.raises(ValueError, match="member_epochs"):
        Growth("orthogonal", 0)
    with pytest.raises(ValueError, match="init must be one of"):
        Growth("templates")
    with pytest.raises(ValueError, match="templates must be an int >= 1"):
        TemplateMLP(5, 4, templates=0)


def test_grow_card_validation():
    card = {"name": "g", "paper": "p", "task": "grow", "data": {"name": "digits"},
            "model": {"name": "template_mlp", "hidden": 8}, "optimizer": {"name": "adam"},
            "budget": {"epochs": 4}, "baseline": "scratch", "seeds": [0], "metric": "test_accuracy",
            "metrics": ["test_accuracy", "grown_test_accuracy"], "expected": "",
            "methods": {"scratch": {}, "mg": {"algorithm": {"name": "mixturegrowth", "member_epochs": 2}}}}
    validate_card(card)
    bad = copy.deepcopy(card)
    bad["methods"]["mg"]["algorithm"]["member_epochs"] = 4
    with pytest.raises(ValueError, match="member_epochs must be < budget.epochs = 4, got 4"):
        validate_card(bad)
    bad = copy.deepcopy(card)
    bad["methods"]["mg"]["algorithm"] = {"name": "hgp"}
    with pytest.raises(ValueError, match="must be erm .* or a growth algorithm, one of mixturegrowth, random_growth, got 'hgp'"):
        validate_card(bad)
    bad = copy.deepcopy(card)
    bad["task"], bad["model"], bad["metrics"] = "classify", {"name": "mlp"}, ["test_accuracy"]
    with pytest.raises(ValueError, match="'mixturegrowth' grows a network: it needs task 'grow'"):
        validate_card(bad)
    bad = copy.deepcopy(card)
    bad["model"] = {"name": "mlp"}
    with pytest.raises(ValueError, match="model must be template_mlp"):
        validate_card(bad)


def test_growing_diverged_members_is_refused():
    a, b = _members()
    with torch.no_grad():
        a.blocks[0].coefficients[0] = float("nan")
    with pytest.raises(ValueError, match="not all finite"):
        grow(a, b)
