"""MixtureGrowth: the template arithmetic of the members, and the grown network's blocks and function."""

import copy

import pytest
import torch
from torch import nn

from diffkit.harness.cards import validate_card
from diffkit.harness.growth import Growth, TemplateLinear, TemplateMLP, grow


def _members(hidden=6, depth=3, templates=2):
    torch.manual_seed(0)
    a, b = (TemplateMLP(5, 4, hidden, depth, templates) for _ in range(2))
    return a, b


def test_template_layer_weight_is_the_coefficient_combination_of_the_shared_bank():
    a, _ = _members(templates=3)
    assert all(block.bank is a.bank for block in a.blocks)  # one bank shared by the hidden-to-hidden layers
    assert sum(p is a.bank for p in a.parameters()) == 1  # and counted (so updated) once
    for block in a.blocks:
        expected = sum(block.coefficients[k] * a.bank[k] for k in range(3))
        torch.testing.assert_close(block.weight(), expected)
    # the bank's gradient is the sum over sharing layers of alpha_{l,k} dL/dW_l (chain rule through the sum)
    x = torch.randn(7, 5)
    weights = [block.weight().detach().requires_grad_(True) for block in a.blocks]
    h = torch.relu(a.stem(x))
    for block, w in zip(a.blocks, weights):
        h = torch.relu(nn.functional.linear(h, w, block.bias))
    grads = torch.autograd.grad(a.head(h).square().sum(), weights)
    a(x).square().sum().backward()
    expected = torch.stack([sum(block.coefficients[k].detach() * g for block, g in zip(a.blocks, grads))
                            for k in range(3)])
    torch.testing.assert_close(a.bank.grad, expected)


def test_grown_network_with_zero_new_blocks_is_the_members_logit_average():
    a, b = _members()
    grown = grow(a, b, "zero")
    x = torch.randn(11, 5)
    torch.testing.assert_close(grown(x), (a(x) + b(x)) / 2)
    # every hidden layer of the grown net holds the two members' activations side by side
    h, fa, fb = x, a.features(x), b.features(x)
    for i, layer in enumerate(m for m in grown if isinstance(m, nn.Linear) and m is not grown[-1]):
        h = torch.relu(layer(h))
        torch.testing.assert_close(h, torch.cat([fa[i], fb[i]], 1))


@pytest.mark.parametrize("init", ["templates", "random", "zero"])
def test_grown_shapes_and_diagonal_blocks_are_the_members(init):
    a, b = _members(hidden=6, depth=4)
    linears = [m for m in grow(a, b, init) if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(12, 5), (12, 12), (12, 12), (12, 12), (4, 12)]
    for layer, block_a, block_b in zip(linears[1:-1], a.blocks, b.blocks):
        torch.testing.assert_close(layer.weight[:6, :6], block_a.weight().detach())
        torch.testing.assert_close(layer.weight[6:, 6:], block_b.weight().detach())


def test_mixturegrowth_new_blocks_are_combinations_of_the_trained_templates():
    a, b = _members(hidden=8, templates=2)
    templates = torch.cat([a.bank, b.bank]).detach().flatten(1).T  # (64, 4): the span new blocks must lie in
    for init, in_span in (("templates", True), ("random", False)):
        grown = grow(a, b, init, torch.Generator().manual_seed(3))
        for layer, block_a, block_b in zip(grown[2:-1:2], a.blocks, b.blocks):
            target = (block_a.weight().norm() + block_b.weight().norm()).detach() / 2
            for new in (layer.weight[:8, 8:], layer.weight[8:, :8]):
                coef = torch.linalg.lstsq(templates, new.reshape(-1, 1)).solution
                residual = (templates @ coef).flatten() - new.flatten()
                assert (residual.norm() < 1e-4 * new.norm()) == in_span
                torch.testing.assert_close(new.norm(), target)  # same scale for both kinds of growth
    # fresh coefficients: the two new blocks of a layer are different combinations
    grown = grow(a, b, "templates")
    assert not torch.allclose(grown[2].weight[:8, 8:], grown[2].weight[8:, :8])


def test_growth_refuses_bad_arguments():
    a, b = _members()
    with pytest.raises(ValueError, match="init must be one of"):
        grow(a, b, "copy")
    with pytest.raises(ValueError, match="same architecture"):
        grow(a, TemplateMLP(5, 4, 7, 3, 2))
    with pytest.raises(TypeError, match="TemplateMLP"):
        grow(a, nn.Linear(5, 4))
    with pytest.raises(ValueError, match="member_epochs"):
        Growth("templates", 0)
    with pytest.raises(ValueError, match="templates must be an int >= 1"):
        TemplateMLP(5, 4, templates=0)
    with pytest.raises(TypeError, match="bank"):
        TemplateLinear(torch.zeros(2, 3, 3))


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
