"""OFQ's confidence-guided annealing (CGA) and query-key reparameterisation (QKR) (Liu, Liu & Cheng,
"Oscillation-free Quantization for Low-bit Vision Transformers", ICML 2023, arXiv 2302.02210; nbasyl/OFQ), and a
tiny ViT for 8x8 digits to try them on. StatsQ itself is in ``statsq.py``.

CGA, as the reference ``cga.py`` does it (``freeze_outside_boundary_weight_idx`` and the masking around
``optimizer.step()`` in ``train_one_epoch``; defaults ``--boundaryRange 0.005``, ``--freeze_for_n_epochs 15``):

- confidence: with StatsQ's pre-rounding value b = clamp(W / s, -1, 1 - 1e-6) n - 1/2 (s = 2 mean|W| per row,
  code k = round(b)), a weight is *unconfident* when b - i lies in [1/2 - r, 1/2 + r] for some integer i from the
  tensor's smallest code to its largest code minus one (the code range is taken over the whole tensor, so the clamp
  edges b = -n - 1/2 and b ~ n - 1/2 never count as boundaries); every other weight is frozen.
- when: the mask is recomputed at *every step* of the annealing, after the backward pass, from the current weights
  (and so from the current row scale s, which drifts a little as the unfrozen weights move; the reference lets it).
  Frozen weights get a zero gradient and their values are restored after the optimiser step, so momentum and weight
  decay cannot move them either.
- which weights: the StatsQ linears (qkv or v, proj, fc1, fc2 of the blocks); under QKR the W_q and W_k parameters
  are *not* frozen (the reference's ``QAttention_qkreparam_4_cga`` quantiser detaches b for confident entries of the
  fused matrix, but its output is detached anyway, so that has no effect on any gradient; it is not reproduced).
- schedule: ``cga.py`` is a fine-tuning run resumed from the trained checkpoint with its scheduler stepped to the end
  of the cosine decay (``start_epoch = args.epochs``, ``lr_scheduler.step(start_epoch)``), so it runs
  ``freeze_for_n_epochs`` epochs at the minimum learning rate (the recipe's ``min_lr`` 1e-5 after ``lr`` 5e-4). Here
  the annealing is the last ``freeze_epochs`` epochs of the card's budget; a card reproduces the cool-down with its
  ``lr_schedule`` (a cosine stage down to the minimum, then a constant stage at it covering the annealing epochs,
  ``schedules.py``), and its control arm runs the same schedule without CGA, so every arm takes the same steps.

QKR (``src/quantization/modules/attention.py``, ``QAttention_qkreparam``): W_q and W_k stay bias-free
full-precision parameters; every forward fuses them per head, W_qk^h = W_q^h^T W_k^h (dim x dim), quantises the
stack of the heads' matrices (heads * dim rows) with StatsQ row by row, and the logits are x Q(W_qk^h) x^T / sqrt(d)
(d the head width); v and proj stay StatsQ linears. The reference also quantises activations (LSQ) and adds
learnable biases around them; the harness keeps activations full precision.
"""

import math

import torch
from torch import nn

from .algorithms import ERM
from .statsq import STATSQ_CLAMP, StatsQLinear, statsq, statsq_codes


# --- confidence-guided annealing ---------------------------------------------------------------------------------

def _check_boundary_range(boundary_range) -> None:
    if not (isinstance(boundary_range, (int, float)) and 0 < boundary_range < 0.5):
        raise ValueError(f"boundary_range must be a number in (0, 0.5), got {boundary_range!r}")


def statsq_prerounding(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """StatsQ's value before rounding, b = w_c 2^(b-1) - 1/2, and the integer codes round(b) (both detached)."""
    codes, scale = statsq_codes(weight, bits)
    return (weight.detach() / scale).clamp(-1, STATSQ_CLAMP) * 2 ** (bits - 1) - 0.5, codes


def cga_frozen_mask(weight: torch.Tensor, bits: int, boundary_range: float = 0.005) -> torch.Tensor:
    """True where CGA freezes a weight: b is farther than ``boundary_range`` from every boundary i + 1/2 between
    two codes, i from the tensor's smallest code to its largest minus one (the reference's tensor-wide range)."""
    _check_boundary_range(boundary_range)
    b, codes = statsq_prerounding(weight, bits)
    near = torch.zeros_like(b, dtype=torch.bool)
    for i in range(int(codes.min()), int(codes.max())):
        near |= (b - i >= 0.5 - boundary_range) & (b - i <= 0.5 + boundary_range)
    return ~near


class ConfidenceGuidedAnnealing(ERM):
    """CGA: plain ERM steps, and for the last ``freeze_epochs`` epochs every confident weight of every StatsQ linear
    is frozen (zero gradient, value restored after the optimiser step), the mask recomputed at every step. Also a
    training hook; logs the mean frozen fraction over the annealing steps (``cga_frozen_fraction``, and per epoch
    as a curve)."""

    def __init__(self, freeze_epochs: int = 15, boundary_range: float = 0.005):
        if not (isinstance(freeze_epochs, int) and not isinstance(freeze_epochs, bool) and freeze_epochs > 0):
            raise ValueError(f"freeze_epochs must be a positive int, got {freeze_epochs!r}")
        _check_boundary_range(boundary_range)
        self.freeze_epochs, self.boundary_range = freeze_epochs, boundary_range
        self.layers, self.saved, self.fractions, self.handle = [], [], [], None

    def annealing(self, state) -> bool:
        return state.epoch >= state.epochs - self.freeze_epochs

    def on_train_start(self, state) -> None:
        if not self.freeze_epochs < state.epochs:
            raise ValueError(f"freeze_epochs must be < the {state.epochs} training epochs (CGA anneals the end of "
                             f"training), got {self.freeze_epochs}")
        self.layers = [m for m in state.unwrapped_model.modules() if isinstance(m, StatsQLinear)]
        if not self.layers:
            raise ValueError("CGA needs a model with StatsQ linear layers")
        # restore right after every optimiser step; accelerate's wrapper steps the torch optimiser it holds
        optimizer = getattr(state.optimizer, "optimizer", state.optimizer)
        self.handle = optimizer.register_step_post_hook(lambda *args: self._restore())

    @torch.no_grad()
    def after_backward(self, state) -> None:
        self.saved = []
        if not self.annealing(state):
            return
        frozen_count = total = 0
        for layer in self.layers:
            frozen = cga_frozen_mask(layer.weight, layer.bits, self.boundary_range)
            if layer.weight.grad is not None:
                layer.weight.grad.masked_fill_(frozen, 0.0)
            self.saved.append((layer.weight, frozen, layer.weight.detach().clone()))
            frozen_count, total = frozen_count + int(frozen.sum()), total + frozen.numel()
        self.fractions.append((state.epoch + 1, frozen_count / total))

    @torch.no_grad()
    def _restore(self) -> None:
        for weight, frozen, value in self.saved:
            weight.copy_(torch.where(frozen, value, weight))
        self.saved = []

    def on_train_end(self, state) -> None:
        if self.handle is not None:
            self.handle.remove()
        if not self.fractions:
            return
        by_epoch = {}
        for epoch, fraction in self.fractions:
            by_epoch.setdefault(epoch, []).append(fraction)
        state.logs["cga_frozen_fraction"] = sum(f for _, f in self.fractions) / len(self.fractions)
        curve = [[epoch, sum(f) / len(f)] for epoch, f in by_epoch.items()]
        state.logs.setdefault("curves", {})["cga_frozen_fraction"] = curve


# --- attention with StatsQ weights, with and without QKR ---------------------------------------------------------

def _linear(in_features: int, out_features: int, bits: int | None, bias: bool = True) -> nn.Linear:
    if bits is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return StatsQLinear(in_features, out_features, bits, bias=bias)


class QueryKey(nn.Module):
    """Per-head attention logits q k^T / sqrt(d) from bias-free query and key projections, each quantised on its own
    (StatsQ linears) when ``bits`` is set: the baseline QKR replaces."""

    def __init__(self, dim: int, heads: int, bits: int | None = None):
        super().__init__()
        self.heads, self.bits, self.scale = heads, bits, (dim // heads) ** -0.5
        self.q, self.k = self._projection(dim), self._projection(dim)

    def _projection(self, dim: int) -> nn.Linear:
        return _linear(dim, dim, self.bits, bias=False)  # bias-free, as the reference's QKR q and k

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, heads, N, d)
        return t.view(*t.shape[:2], self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._split(self.q(x)) @ self._split(self.k(x)).transpose(-2, -1) * self.scale


class FusedQueryKey(QueryKey):
    """QKR: W_q, W_k are full-precision parameters; what is quantised (StatsQ, row by row over the heads' stacked
    matrices) is each head's W_qk^h = W_q^h^T W_k^h, and the logits are x Q(W_qk^h) x^T / sqrt(d).
    ``integer_weight`` gives the fused matrix's codes, so the level-flip count sees them."""

    def __init__(self, dim: int, heads: int, bits: int):
        if bits is None:
            raise ValueError("QKR reparameterises the quantised query-key product: it needs bits, got None")
        super().__init__(dim, heads, bits)

    def _projection(self, dim: int) -> nn.Linear:
        return nn.Linear(dim, dim, bias=False)

    def fused_weight(self) -> torch.Tensor:
        """(heads * dim, dim): rows h * dim .. (h + 1) * dim - 1 are W_qk^h = W_q^h^T W_k^h."""
        dim = self.q.in_features
        wq, wk = self.q.weight.view(self.heads, -1, dim), self.k.weight.view(self.heads, -1, dim)
        return (wq.transpose(1, 2) @ wk).reshape(self.heads * dim, dim)

    def integer_weight(self) -> torch.Tensor:
        return statsq_codes(self.fused_weight(), self.bits)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = statsq(self.fused_weight(), self.bits).view(self.heads, x.shape[-1], x.shape[-1])
        return torch.einsum("bnc,hcd,bmd->bhnm", x, w, x) * self.scale


class StatsQAttention(nn.Module):
    """Multi-head self-attention: logits from ``QueryKey`` (or ``FusedQueryKey`` with ``qkr``), values and output
    projection StatsQ linears when ``bits`` is set (full precision when None)."""

    def __init__(self, dim: int, heads: int, bits: int | None = None, qkr: bool = False):
        super().__init__()
        if not (isinstance(heads, int) and heads > 0 and isinstance(dim, int) and dim > 0 and dim % heads == 0):
            raise ValueError(f"need positive ints dim and heads with heads dividing dim, got dim={dim!r}, "
                             f"heads={heads!r}")
        if bits is not None:
            statsq_codes(torch.ones(1, 1), bits)  # validates bits
        if not isinstance(qkr, bool):
            raise ValueError(f"qkr must be true or false, got {qkr!r}")
        self.heads = heads
        self.qk = FusedQueryKey(dim, heads, bits) if qkr else QueryKey(dim, heads, bits)
        self.v, self.proj = _linear(dim, dim, bits), _linear(dim, dim, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        attention = self.qk(x).softmax(dim=-1)
        v = self.v(x).view(b, n, self.heads, -1).transpose(1, 2)
        return self.proj((attention @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN x), then x + MLP(LN x), MLP = fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, bits: int | None, qkr: bool):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1, self.attn = nn.LayerNorm(dim), StatsQAttention(dim, heads, bits, qkr)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(_linear(dim, hidden, bits), nn.GELU(), _linear(hidden, dim, bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A DeiT-style ViT for small square grey images given as flat feature vectors (8x8 digits: 64 features, patch
    2 -> 16 tokens and a class token): linear patch embedding and learned position embedding, ``depth`` pre-norm
    blocks, final LayerNorm, linear head on the class token. ``bits`` puts StatsQ on the blocks' linears (q, k, v,
    proj, fc1, fc2), ``qkr`` fuses q and k (QKR); patch embedding and head stay full precision, as in the paper."""

    def __init__(self, num_features: int, num_classes: int, dim: int = 32, depth: int = 2, heads: int = 2,
                 mlp_ratio: float = 2, patch: int = 2, bits: int | None = None, qkr: bool = False):
        super().__init__()
        side = math.isqrt(num_features) if isinstance(num_features, int) and num_features > 0 else 0
        if not (side * side == num_features and isinstance(patch, int) and patch > 0 and side % patch == 0):
            raise ValueError(f"num_features must be a square side^2 with side divisible by patch, got "
                             f"num_features={num_features!r}, patch={patch!r}")
        if not (isinstance(depth, int) and depth > 0 and isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0):
            raise ValueError(f"need a positive int depth and mlp_ratio > 0, got depth={depth!r}, "
                             f"mlp_ratio={mlp_ratio!r}")
        self.side, self.patch = side, patch
        tokens = (side // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)  # a stride-``patch`` convolution on the image
        self.cls_token = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, 1, dim), std=0.02))
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, tokens + 1, dim), std=0.02))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, bits, qkr) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, side^2) -> (B, tokens, patch^2), patches in row-major order, pixels row-major inside each."""
        g, p = self.side // self.patch, self.patch
        return x.reshape(-1, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(-1, g * g, p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(self.patches(x))
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(t))[:, 0])
