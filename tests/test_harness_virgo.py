"""Virgo's GNN initialisation, the plain-torch GCN and the kNN digits graph."""

import json
import math
from pathlib import Path

import pytest
import torch

from diffkit.harness import run_method, validate_card
from diffkit.harness.registry import GRAPH_INITIALIZERS
from diffkit.harness.virgo import (GCN, GraphData, digits_knn_graph, knn_edges, layer_variances,
                                   normalized_adjacency, virgo_init, virgo_variances)


ROOT = Path(__file__).resolve().parents[1]


def _graph(edges: torch.Tensor, n: int = 6, d: int = 5, classes: int = 3, seed: int = 0) -> GraphData:
    gen = torch.Generator().manual_seed(seed)
    masks = [torch.zeros(n, dtype=torch.bool) for _ in range(3)]
    masks[0][: n // 2], masks[1][n // 2 :], masks[2][n // 2 :] = True, True, True
    return GraphData(torch.rand(n, d, generator=gen), torch.arange(n) % classes, normalized_adjacency(edges, n),
                     *masks, classes)


def _dense_normalized(edges, n):
    a = torch.eye(n)
    a[edges[0], edges[1]] = 1
    degree = a.sum(1)
    return a / degree.sqrt()[:, None] / degree.sqrt()[None, :]


def test_forward_rule_on_an_edgeless_graph_is_kaiming_uniform():
    graph = _graph(torch.zeros(2, 0, dtype=torch.long))
    model = GCN(5, 3, hidden=7, depth=4)
    bounds = virgo_init(model, graph, torch.Generator().manual_seed(0), mode="forward")
    fan_in = [5, 7, 7, 7]
    assert bounds == pytest.approx([math.sqrt(6 / m) for m in fan_in], rel=1e-12)
    # torch's kaiming_uniform_ (fan-in, ReLU) bound: gain sqrt(2) * sqrt(3 / fan_in)
    for layer, bound in zip(model.layers, bounds):
        assert layer.weight.abs().max() <= bound
        assert torch.nn.init.calculate_gain("relu") * math.sqrt(3 / layer.in_features) == pytest.approx(bound)


def test_virgo_variances_are_the_official_formulas_on_a_small_graph():
    edges = torch.tensor([[0, 1, 1, 2, 2, 3, 4, 5], [1, 0, 2, 1, 3, 2, 5, 4]])
    graph = _graph(edges)
    a = _dense_normalized(edges, 6)
    torch.testing.assert_close(graph.adjacency.to_dense(), a)
    model = GCN(5, 3, hidden=8, depth=3)
    xbar, ones = graph.x.mean(1), torch.ones(6)

    def norm(power, s):
        return (torch.linalg.matrix_power(a, power) @ s).square().sum().item()

    # utils.gen_c2_for / gen_c2_back with m_list = [5, 8, 3], l = 3, N = 6, C = 3, written out
    forward = [2 / 5, 2 / 8 * norm(1, xbar) / norm(2, xbar), 2 / 8 * norm(2, xbar) / norm(3, xbar)]
    backward = [2 / 8 * norm(2, ones) / norm(3, ones), 2 / 8 * norm(1, ones) / norm(2, ones),
                6 / ((3 - 1) * norm(1, ones))]
    assert virgo_variances(model, graph, "forward") == pytest.approx(forward, rel=1e-6)
    assert virgo_variances(model, graph, "backward") == pytest.approx(backward, rel=1e-6)
    harmonic = [2 / (1 / f + 1 / b) for f, b in zip(forward, backward)]
    assert virgo_variances(model, graph, "both") == pytest.approx(harmonic, rel=1e-6)
    assert virgo_variances(model, graph, "both", "arithmetic") == pytest.approx(
        [(f + b) / 2 for f, b in zip(forward, backward)], rel=1e-6)
    with pytest.raises(ValueError, match="mode"):
        virgo_variances(model, graph, "sideways")


def test_gcn_is_the_dense_formula_and_variances_are_measured_per_layer():
    edges = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]])
    graph = _graph(edges)
    torch.manual_seed(0)
    model = GCN(5, 3, hidden=4, depth=3)
    for layer in model.layers:
        torch.nn.init.normal_(layer.bias)
    a = _dense_normalized(edges, 6)
    h = graph.x
    for i, layer in enumerate(model.layers):
        h = a @ (torch.relu(h) if i else h) @ layer.weight.T + layer.bias
    torch.testing.assert_close(model(graph.x, graph.adjacency), h)
    forward, backward = layer_variances(model, graph)
    assert len(forward) == len(backward) == 3 and all(v > 0 for v in forward + backward)
    assert all(p.grad is None for p in model.parameters())  # the measurement leaves no gradients behind
    for name in ("xavier", "kaiming", "virgo_forward", "virgo_backward", "virgo"):
        GRAPH_INITIALIZERS.build(name, model, graph, torch.Generator().manual_seed(0))


def test_knn_digits_graph_is_symmetric_with_a_planetoid_split():
    edges = knn_edges(torch.tensor([[0.0], [1.0], [3.0], [10.0]]), 1)
    assert sorted(map(tuple, edges.T.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2)]
    graph = digits_knn_graph(0)
    assert graph.train_mask.sum() == 200 and graph.val_mask.sum() == 500 and graph.test_mask.sum() == 1000
    assert not (graph.train_mask & graph.val_mask).any() and not (graph.val_mask & graph.test_mask).any()
    assert torch.bincount(graph.y[graph.train_mask]).tolist() == [20] * 10
    dense = graph.adjacency.to_dense()
    torch.testing.assert_close(dense, dense.T)
    with pytest.raises(ValueError, match="k must be"):
        knn_edges(torch.zeros(3, 2), 3)


def test_graph_card_runs_and_refuses_unknown_initialisers():
    card = json.loads((ROOT / "cards" / "virgo_depth4.json").read_text())
    card["budget"] = {"epochs": 3, "patience": 2}
    card = validate_card(card)
    record = run_method(card, "virgo", 0, progress=False)
    assert record["metrics"]["epochs_trained"] <= 3 and record["metrics"]["forward_variance_spread"] >= 0
    card["methods"]["bad"] = {"model": {"init": {"name": "lecun"}}}
    with pytest.raises(ValueError, match="unknown graph initializer 'lecun'"):
        validate_card(card)
