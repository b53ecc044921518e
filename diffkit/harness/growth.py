"""MixtureGrowth (Pham et al., "MixtureGrowth: Growing Neural Networks by Recombining Learned Parameters",
WACV 2024, arXiv 2311.04251; chaudatascience/mixturegrowth ``models/layers.py`` ``SModule``, ``main.py``) on the
harness MLP.

Every layer of a member is a template layer, W = sum_k c_k T_k, with its own set of K templates (the official
default: 2 templates per set, no sharing across layers). Two members A and B are trained; growing doubles the width,
and each grown layer is assembled from blocks, each a linear combination of ONE template set (the official
``member_template_sets = [0, 1, 0, 1]``: blocks 0 and 2 use A's templates, 1 and 3 B's), in the official "diag"
layout

    hidden:  [[c_0 T^A, c_2 T^A],          stem:  [[c_0 T^A],        head:  [[c_0 T^A, c_1 T^B]]
              [c_3 T^B, c_1 T^B]]                  [c_1 T^B]]

so the first layer stacks the members' rows and the head adds their logits; with zero new blocks the grown network
computes the sum of the two members' logits. The new coefficients follow ``coefs_growing``: ``orthogonal`` (the
official default) takes c_i as the last right-singular vector of the coefficients before it (c_2 from [c_0; c_1],
c_3 from [c_0; c_1; c_2]; unit norm, ``coefs_noise_growing`` = 1), ``random`` draws them uniformly from [0, 1) (the
official ``random`` option), ``zero`` sets them to 0. After growth the templates are kept: the grown network trains
its template sets, all four coefficient vectors and the biases.

Deviation (why): the official templates are initialised by ``kaiming_normal_`` on the (K, out, in) tensor, a scale the
ResNet's BatchNorms absorb; the harness MLP has no BatchNorm, so each template starts at nn.Linear's default range and
a member's coefficients at a random unit vector, which gives its weights nn.Linear's scale.
"""

import torch
from torch import nn


GROWTH_INITS = ("orthogonal", "random", "zero")


class TemplateLinear(nn.Module):
    """A linear layer whose weight is sum_k c_k T_k over its own ``templates`` templates (K, out, in)."""

    def __init__(self, in_features: int, out_features: int, templates: int = 2):
        super().__init__()
        bound = in_features ** -0.5  # nn.Linear's default init range, per template
        self.bank = nn.Parameter(torch.empty(templates, out_features, in_features).uniform_(-bound, bound))
        c = torch.randn(templates)
        self.coefficients = nn.Parameter(c / c.norm())  # a unit vector keeps a template's variance
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))

    def weight(self) -> torch.Tensor:
        return torch.einsum("k,koi->oi", self.coefficients, self.bank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight(), self.bias)


class TemplateMLP(nn.Module):
    """MixtureGrowth member: TemplateLinear(in, hidden) -> ReLU -> (depth - 1) x [TemplateLinear(hidden, hidden) ->
    ReLU] -> TemplateLinear(hidden, classes), each layer with its own ``templates`` templates."""

    def __init__(self, num_features: int, num_classes: int, hidden: int = 128, depth: int = 3, templates: int = 2):
        for name, value, low in (("num_features", num_features, 1), ("num_classes", num_classes, 1),
                                 ("hidden", hidden, 1), ("depth", depth, 2), ("templates", templates, 1)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        super().__init__()
        self.stem = TemplateLinear(num_features, hidden, templates)
        self.blocks = nn.ModuleList(TemplateLinear(hidden, hidden, templates) for _ in range(depth - 1))
        self.head = TemplateLinear(hidden, num_classes, templates)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The post-ReLU activations of every hidden layer."""
        h = torch.relu(self.stem(x))
        out = [h]
        for block in self.blocks:
            h = torch.relu(block(h))
            out.append(h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)[-1])


class GrownLinear(nn.Module):
    """A grown layer: two template sets (A's and B's, trainable) and a grid of blocks, each block (set, coefficients)
    computing sum_k c_k T^set_k; ``layout`` is a list of rows of block names (the official diag layout)."""

    def __init__(self, bank_a: torch.Tensor, bank_b: torch.Tensor, coefficients: dict[str, tuple[str, torch.Tensor]],
                 layout: list[list[str]], bias: torch.Tensor):
        super().__init__()
        self.banks = nn.ParameterDict({"A": nn.Parameter(bank_a.detach().clone()),
                                       "B": nn.Parameter(bank_b.detach().clone())})
        self.sets = {name: template_set for name, (template_set, _) in coefficients.items()}
        self.coefficients = nn.ParameterDict({name: nn.Parameter(c.detach().clone())
                                              for name, (_, c) in coefficients.items()})
        self.layout = layout
        self.bias = nn.Parameter(bias.detach().clone())

    def block(self, name: str) -> torch.Tensor:
        return torch.einsum("k,koi->oi", self.coefficients[name], self.banks[self.sets[name]])

    def weight(self) -> torch.Tensor:
        return torch.cat([torch.cat([self.block(name) for name in row], 1) for row in self.layout], 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight(), self.bias)


class GrownTemplateMLP(nn.Module):
    """The grown network: GrownLinear layers with ReLU between them (see ``grow``)."""

    def __init__(self, layers: list[GrownLinear]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


def _new_coefficients(init: str, previous: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    if init == "orthogonal":  # main.py / layers.py growth_update: torch.linalg.svd(prev).Vh[-1] * coefs_noise_growing
        return torch.linalg.svd(torch.stack(previous)).Vh[-1]
    if init == "random":
        return torch.rand(previous[0].shape, generator=generator)
    return torch.zeros_like(previous[0])


@torch.no_grad()
def grow(a: TemplateMLP, b: TemplateMLP, init: str = "orthogonal", generator: torch.Generator | None = None
         ) -> GrownTemplateMLP:
    """The network of twice the members' width grown from members ``a`` and ``b`` (module docstring); ``init`` sets
    the new blocks' coefficients: ``orthogonal`` (MixtureGrowth's default), ``random`` or ``zero``."""
    if not (isinstance(a, TemplateMLP) and isinstance(b, TemplateMLP)):
        raise TypeError(f"a and b must be TemplateMLP members, got {type(a).__name__} and {type(b).__name__}")
    if init not in GROWTH_INITS:
        raise ValueError(f"init must be one of {list(GROWTH_INITS)}, got {init!r}")
    if [p.shape for p in a.parameters()] != [p.shape for p in b.parameters()]:
        raise ValueError("a and b must have the same architecture (width, depth, number of templates)")
    if not all(torch.isfinite(p).all() for p in (*a.parameters(), *b.parameters())):
        raise ValueError("the members' parameters are not all finite (their training diverged); nothing to grow")
    generator = generator or torch.Generator().manual_seed(0)
    layers = [GrownLinear(a.stem.bank, b.stem.bank, {"0": ("A", a.stem.coefficients), "1": ("B", b.stem.coefficients)},
                          [["0"], ["1"]], torch.cat([a.stem.bias, b.stem.bias]))]
    for block_a, block_b in zip(a.blocks, b.blocks):
        c0, c1 = block_a.coefficients.detach(), block_b.coefficients.detach()
        c2 = _new_coefficients(init, [c0, c1], generator)
        c3 = _new_coefficients(init, [c0, c1, c2], generator)
        layers.append(GrownLinear(block_a.bank, block_b.bank,
                                  {"0": ("A", c0), "1": ("B", c1), "2": ("A", c2), "3": ("B", c3)},
                                  [["0", "2"], ["3", "1"]], torch.cat([block_a.bias, block_b.bias])))
    layers.append(GrownLinear(a.head.bank, b.head.bank, {"0": ("A", a.head.coefficients), "1": ("B", b.head.coefficients)},
                              [["0", "1"]], a.head.bias + b.head.bias))
    return GrownTemplateMLP(layers)


class Growth:
    """The algorithm of a ``grow`` card: members train ``member_epochs`` epochs, are grown with ``init``, and the
    grown network (templates kept) trains the rest of the card's epochs (every step plain ERM, run by
    ``experiment._grow``)."""

    def __init__(self, init: str = "orthogonal", member_epochs: int = 30):
        if init not in GROWTH_INITS:
            raise ValueError(f"init must be one of {list(GROWTH_INITS)}, got {init!r}")
        if not (isinstance(member_epochs, int) and not isinstance(member_epochs, bool) and member_epochs > 0):
            raise ValueError(f"member_epochs must be a positive int, got {member_epochs!r}")
        self.init, self.member_epochs = init, member_epochs

    def grow(self, a: TemplateMLP, b: TemplateMLP, generator: torch.Generator | None = None) -> GrownTemplateMLP:
        return grow(a, b, self.init, generator)
