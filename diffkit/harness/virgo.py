"""Virgo: variance-preserving initialisation of graph neural networks (Li, Song, Song & Wipf, On the Initialization of
Graph Neural Networks, ICML 2023, arXiv 2312.02622; official code LspongebobJH/virgo_icml2023, ``utils.py``), and the
plain-torch GCN and kNN graph it is studied on here.

Each layer l of an L-layer GCN, H_{l+1} = act(A H_l W_l + b_l) with A the symmetrically normalised adjacency with
self-loops, gets weights ~ U(+-sqrt(3 v_l)). The variance v_l keeps the layer's output (forward) or gradient
(backward) variance constant, and through A that depends on the graph (``utils.gen_c2_for`` / ``gen_c2_back``):

- forward: v_0 = 2 / fan_in_0 and v_l = 2 / fan_in_l * ||A^l xbar||^2 / ||A^{l+1} xbar||^2 for l >= 1, with xbar
  each node's mean input feature;
- backward: the last layer v = N / ((C - 1) ||A 1||^2) (N nodes, C classes) and the others
  v_l = 2 / fan_out_l * ||A^{L-1-l} 1||^2 / ||A^{L-l} 1||^2;
- both ("virgo"): their harmonic mean (``gen_c2``'s ``mean_method="harmonic"``, the function's default; the
  repository's example scripts pass ``"normal"``, the arithmetic mean, also offered).

On an edgeless graph (A = I) the forward rule is Kaiming-uniform's bound sqrt(6 / fan_in) for every layer.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GraphData:
    """A node-classification graph: features x (N, d), labels y (N,), the normalised adjacency (sparse, N x N) and
    boolean train / validation / test masks."""

    x: torch.Tensor
    y: torch.Tensor
    adjacency: torch.Tensor
    train_mask: torch.Tensor
    val_mask: torch.Tensor
    test_mask: torch.Tensor
    num_classes: int

    @property
    def num_features(self) -> int:
        return self.x.shape[1]


def normalized_adjacency(edges: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """D^-1/2 (A + I) D^-1/2 as a sparse COO tensor, for undirected ``edges`` (2, E) listed in both directions (GCN's
    normalisation, DGL GraphConv's ``norm="both"`` on a graph with self-loops)."""
    loops = torch.arange(num_nodes).expand(2, -1)
    index = torch.cat([edges, loops], 1).unique(dim=1)
    degree = torch.zeros(num_nodes).index_add_(0, index[0], torch.ones(index.shape[1]))
    values = degree[index[0]].rsqrt() * degree[index[1]].rsqrt()
    return torch.sparse_coo_tensor(index, values, (num_nodes, num_nodes), check_invariants=True).coalesce()


def knn_edges(x: torch.Tensor, k: int) -> torch.Tensor:
    """The symmetrised k-nearest-neighbour graph (Euclidean) of the rows of x: (2, E) edges in both directions."""
    if not (isinstance(k, int) and 1 <= k < len(x)):
        raise ValueError(f"k must be an int in [1, {len(x) - 1}], got {k!r}")
    distances = torch.cdist(x, x)
    distances.fill_diagonal_(float("inf"))
    neighbours = distances.topk(k, largest=False).indices
    source = torch.arange(len(x)).repeat_interleave(k)
    edges = torch.stack([source, neighbours.flatten()])
    return torch.cat([edges, edges.flip(0)], 1).unique(dim=1)


class GCN(nn.Module):
    """Kipf & Welling's GCN in plain torch: ``depth`` layers H <- A H W + b with ReLU between them (none after the
    last), optional dropout before every layer but the first (as the Virgo example's GCN); biases start at zero (DGL's
    GraphConv), weights from the chosen initialiser."""

    def __init__(self, num_features: int, num_classes: int, hidden: int = 64, depth: int = 2, dropout: float = 0.0):
        super().__init__()
        if not (isinstance(depth, int) and depth >= 2):
            raise ValueError(f"depth must be an int >= 2, got {depth!r}")
        if not (isinstance(hidden, int) and hidden >= 1):
            raise ValueError(f"hidden must be a positive int, got {hidden!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        widths = [num_features] + [hidden] * (depth - 1) + [num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        for layer in self.layers:
            nn.init.zeros_(layer.bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor, keep: list | None = None) -> torch.Tensor:
        """Logits of every node; ``keep`` (a list) receives each layer's pre-activation output."""
        h = x
        for i, layer in enumerate(self.layers):
            if i:
                h = F.dropout(torch.relu(h), self.dropout, self.training)
            h = torch.sparse.mm(adjacency, h @ layer.weight.T) + layer.bias  # A (H W) + b
            if keep is not None:
                keep.append(h)
        return h


def _propagated_norms(adjacency: torch.Tensor, signal: torch.Tensor, steps: int) -> list[float]:
    """||A^k s||^2 for k = 1..steps (DGL GraphConv without weights, as ``utils.Aggr``)."""
    norms, h = [], signal[:, None]
    for _ in range(steps):
        h = torch.sparse.mm(adjacency, h)
        norms.append(h.square().sum().item())
    return norms


def virgo_variances(model: GCN, graph: GraphData, mode: str = "both", mean: str = "harmonic") -> list[float]:
    """Virgo's per-layer weight variance (see the module docstring): mode "forward", "backward" or "both"."""
    if mode not in ("forward", "backward", "both"):
        raise ValueError(f"mode must be forward, backward or both, got {mode!r}")
    if mean not in ("harmonic", "arithmetic"):
        raise ValueError(f"mean must be harmonic or arithmetic, got {mean!r}")
    depth = len(model.layers)
    fan_in = [layer.in_features for layer in model.layers]
    fan_out = [layer.out_features for layer in model.layers]
    along = _propagated_norms(graph.adjacency, graph.x.mean(1), depth)  # ||A^k xbar||^2, k = 1..L
    forward = [2 / fan_in[0]] + [2 / fan_in[l] * along[l - 1] / along[l] for l in range(1, depth)]
    ones = _propagated_norms(graph.adjacency, torch.ones(len(graph.x)), depth)  # ||A^k 1||^2, k = 1..L
    backward = [2 / fan_out[l] * ones[depth - 2 - l] / ones[depth - 1 - l] for l in range(depth - 1)]
    backward.append(len(graph.x) / ((graph.num_classes - 1) * ones[0]))
    if mode == "forward":
        return forward
    if mode == "backward":
        return backward
    if mean == "harmonic":
        return [2 / (1 / f + 1 / b) for f, b in zip(forward, backward)]
    return [(f + b) / 2 for f, b in zip(forward, backward)]


def virgo_init(model: GCN, graph: GraphData, generator: torch.Generator, mode: str = "both",
               mean: str = "harmonic") -> list[float]:
    """Draw every layer's weights from U(+-sqrt(3 v_l)); returns the bounds sqrt(3 v_l)."""
    bounds = [(3 * v) ** 0.5 for v in virgo_variances(model, graph, mode, mean)]
    with torch.no_grad():
        for layer, bound in zip(model.layers, bounds):
            layer.weight.uniform_(-bound, bound, generator=generator)
    return bounds


def standard_init(model: GCN, name: str, generator: torch.Generator) -> None:
    """Xavier-uniform (DGL GraphConv's default) or Kaiming-uniform (fan-in, ReLU gain: the official "kaifor") weights."""
    for layer in model.layers:
        if name == "xavier":
            nn.init.xavier_uniform_(layer.weight, generator=generator)
        elif name == "kaiming":
            nn.init.kaiming_uniform_(layer.weight, mode="fan_in", nonlinearity="relu", generator=generator)
        else:
            raise ValueError(f"name must be xavier or kaiming, got {name!r}")


def layer_variances(model: GCN, graph: GraphData) -> tuple[list[float], list[float]]:
    """Per-layer variance of the pre-activation outputs and of the cross-entropy gradient (training nodes) with respect
    to them, in training mode at the model's current weights."""
    outputs = []
    logits = model(graph.x, graph.adjacency, keep=outputs)
    for h in outputs:
        h.retain_grad()
    F.cross_entropy(logits[graph.train_mask], graph.y[graph.train_mask]).backward()
    forward = [h.detach().var().item() for h in outputs]
    backward = [h.grad.var().item() for h in outputs]
    model.zero_grad(set_to_none=True)
    return forward, backward


def digits_knn_graph(seed: int, k: int = 10, labels_per_class: int = 20, validation: int = 500,
                     test: int = 1000) -> GraphData:
    """scikit-learn's 1,797 digits as nodes (64 pixel features / 16), joined to their k nearest neighbours in pixel
    space (symmetrised); per ``seed`` a Planetoid-style split: ``labels_per_class`` labelled training nodes per
    class, ``validation`` validation nodes and ``test`` test nodes drawn from the rest."""
    from sklearn.datasets import load_digits

    for name, value in (("labels_per_class", labels_per_class), ("validation", validation), ("test", test)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    digits = load_digits()
    x, y = torch.from_numpy(digits.data / 16.0).float(), torch.from_numpy(digits.target).long()
    n, classes = len(y), int(y.max()) + 1
    if labels_per_class * classes + validation + test > n:
        raise ValueError(f"the split needs {labels_per_class * classes + validation + test} nodes, the graph has {n}")
    gen = torch.Generator().manual_seed(95_000 + seed)
    order = torch.randperm(n, generator=gen)
    train = torch.cat([order[y[order] == c][:labels_per_class] for c in range(classes)])
    rest = order[~torch.isin(order, train)]
    masks = [torch.zeros(n, dtype=torch.bool) for _ in range(3)]
    for mask, rows in zip(masks, (train, rest[:validation], rest[validation : validation + test])):
        mask[rows] = True
    return GraphData(x, y, normalized_adjacency(knn_edges(x, k), n), *masks, classes)
