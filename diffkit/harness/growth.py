"""MixtureGrowth (Pham et al., "MixtureGrowth: Growing Neural Networks by Recombining Learned Parameters",
WACV 2024, arXiv 2311.04251; chaudatascience/mixturegrowth ``models/layers.py``) on the harness MLP.

Two small members are trained whose hidden-to-hidden layers are linear combinations of templates shared across those
layers, W_l = sum_k alpha_{l,k} T_k. Growing doubles the width: each grown hidden layer is the 2 x 2 block matrix

    [[W_l^A, N_l^AB],
     [N_l^BA, W_l^B]]

whose diagonal blocks are the members' weights and whose new off-diagonal blocks are, for MixtureGrowth, fresh linear
combinations of the members' trained templates (both banks, 2K templates), for random growth random matrices. The
first layer stacks the members' rows (the input is shared), the head averages their logits, so with zero
off-diagonal blocks the grown network computes the mean of the two members' logits.

Simplification (why): after growth the grown network here is a plain MLP with free weights, the same architecture
as the from-scratch baseline, so the comparison isolates how the grown weights are initialised; the paper keeps
training template-parameterised layers. New blocks are rescaled to the mean Frobenius norm of the two diagonal
blocks so template and random growth differ in direction only, not in scale.
"""

import torch
from torch import nn


GROWTH_INITS = ("templates", "random", "zero")


class TemplateLinear(nn.Module):
    """A linear layer whose weight is sum_k alpha_k T_k over a template bank (K, out, in) shared with other layers."""

    def __init__(self, bank: nn.Parameter, generator: torch.Generator | None = None):
        super().__init__()
        if not (isinstance(bank, nn.Parameter) and bank.dim() == 3):
            raise TypeError(f"bank must be an nn.Parameter of shape (templates, out, in), got {type(bank).__name__}")
        self.bank = bank  # shared: every layer of the group registers the same Parameter
        k, out_features, in_features = bank.shape
        # a random unit coefficient vector: the combination of independent templates keeps a template's variance
        alpha = torch.randn(k, generator=generator)
        self.coefficients = nn.Parameter(alpha / alpha.norm())
        bound = in_features ** -0.5
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound, generator=generator))

    def weight(self) -> torch.Tensor:
        return torch.einsum("k,koi->oi", self.coefficients, self.bank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight(), self.bias)


class TemplateMLP(nn.Module):
    """MixtureGrowth member: Linear(in, hidden) -> ReLU -> (depth - 1) x [TemplateLinear(hidden, hidden) -> ReLU] ->
    Linear(hidden, classes); the hidden-to-hidden layers share one bank of ``templates`` templates."""

    def __init__(self, num_features: int, num_classes: int, hidden: int = 128, depth: int = 3, templates: int = 2):
        for name, value, low in (("num_features", num_features, 1), ("num_classes", num_classes, 1),
                                 ("hidden", hidden, 1), ("depth", depth, 2), ("templates", templates, 1)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        super().__init__()
        self.stem = nn.Linear(num_features, hidden)
        bound = hidden ** -0.5  # nn.Linear's default init range for each template
        self.bank = nn.Parameter(torch.empty(templates, hidden, hidden).uniform_(-bound, bound))
        self.blocks = nn.ModuleList(TemplateLinear(self.bank) for _ in range(depth - 1))
        self.head = nn.Linear(hidden, num_classes)

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


def _new_block(init: str, templates: torch.Tensor, norm: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if init == "zero":
        return torch.zeros(templates.shape[1:])
    if init == "templates":
        beta = torch.randn(len(templates), generator=generator)
        block = torch.einsum("k,koi->oi", beta, templates)
    else:
        block = torch.randn(templates.shape[1:], generator=generator)
    return block * (norm / block.norm().clamp_min(torch.finfo(block.dtype).tiny))


@torch.no_grad()
def grow(a: TemplateMLP, b: TemplateMLP, init: str = "templates", generator: torch.Generator | None = None
         ) -> nn.Sequential:
    """The MLP of twice the members' width grown from members ``a`` and ``b`` (module docstring); ``init`` fills the
    new off-diagonal blocks: ``templates`` (MixtureGrowth), ``random`` or ``zero``."""
    if not (isinstance(a, TemplateMLP) and isinstance(b, TemplateMLP)):
        raise TypeError(f"a and b must be TemplateMLP members, got {type(a).__name__} and {type(b).__name__}")
    if init not in GROWTH_INITS:
        raise ValueError(f"init must be one of {list(GROWTH_INITS)}, got {init!r}")
    if [p.shape for p in a.parameters()] != [p.shape for p in b.parameters()] or len(a.blocks) != len(b.blocks):
        raise ValueError("a and b must have the same architecture (width, depth, number of templates)")
    generator = generator or torch.Generator().manual_seed(0)
    templates = torch.cat([a.bank, b.bank]).detach()  # the trained templates of both members
    layers = []
    stem = nn.Linear(a.stem.in_features, 2 * a.stem.out_features)
    stem.weight.copy_(torch.cat([a.stem.weight, b.stem.weight]))
    stem.bias.copy_(torch.cat([a.stem.bias, b.stem.bias]))
    layers += [stem, nn.ReLU()]
    for block_a, block_b in zip(a.blocks, b.blocks):
        wa, wb = block_a.weight(), block_b.weight()
        norm = (wa.norm() + wb.norm()) / 2
        grown = nn.Linear(2 * wa.shape[1], 2 * wa.shape[0])
        grown.weight.copy_(torch.cat([torch.cat([wa, _new_block(init, templates, norm, generator)], 1),
                                      torch.cat([_new_block(init, templates, norm, generator), wb], 1)]))
        grown.bias.copy_(torch.cat([block_a.bias, block_b.bias]))
        layers += [grown, nn.ReLU()]
    # averaging the heads makes the grown net, with zero new blocks, the members' logit ensemble
    head = nn.Linear(2 * a.head.in_features, a.head.out_features)
    head.weight.copy_(torch.cat([a.head.weight, b.head.weight], 1) / 2)
    head.bias.copy_((a.head.bias + b.head.bias) / 2)
    layers.append(head)
    return nn.Sequential(*layers)


class Growth:
    """The algorithm of a ``grow`` card: members train ``member_epochs`` epochs, are grown with ``init``, and the
    grown network trains the rest of the card's epochs (every step plain ERM, run by ``experiment._grow``)."""

    def __init__(self, init: str = "templates", member_epochs: int = 30):
        if init not in GROWTH_INITS:
            raise ValueError(f"init must be one of {list(GROWTH_INITS)}, got {init!r}")
        if not (isinstance(member_epochs, int) and not isinstance(member_epochs, bool) and member_epochs > 0):
            raise ValueError(f"member_epochs must be a positive int, got {member_epochs!r}")
        self.init, self.member_epochs = init, member_epochs

    def grow(self, a: TemplateMLP, b: TemplateMLP, generator: torch.Generator | None = None) -> nn.Sequential:
        return grow(a, b, self.init, generator)
