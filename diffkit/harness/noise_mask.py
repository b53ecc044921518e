"""Policy-Gradient-Driven Noise Mask (PGNM; Yavuz & Yang, arXiv 2406.14568; official code
ogrenenmakine/Policy-Gradient-Driven-Noise-Mask, moved to convergedmachine/..., ``_policy_gradient/``).

A small policy network reads the image and outputs logits (alpha, beta) for every cell of a grid x grid mask; they
are blended with running bases, new = 0.9 base + 0.1 head(x), while the bases follow the batch-mean head output with
an EMA of 0.99 (``create_model.MaskGenerator``). A mask is sampled from Beta(exp alpha, exp beta) per cell -- without
gradient --, upsampled (nearest) to the image size and Gaussian-blurred, and the classifier sees image * mask. The
official objective (``train_one_epoch.py``) is

    loss = mean_b( log sum_cells p(mask_cell) ) * CE_batch-mean

one backward pass through both networks: the policy gets CE times the gradient of the (log-sum-exp over cells of
the) log-density -- REINFORCE-like, without a baseline, with the loss as the cost --, and the classifier gets the CE
gradient scaled by that log-sum-exp. The detached-reward variant keeps the policy term and trains the classifier on
the plain CE: loss = mean_b(lse) * CE.detach() + CE. The policy only shapes pre-training: it is dropped and the
classifier fine-tuned on clean images.

Official settings: the classifier SGD lr 0.1, momentum 0.9, wd 1e-4, step decay x0.1 every 30 of 90 epochs; the
policy SGD lr = lr / 10 with the same momentum and decay, cosine-annealed to 0 over the run (``get_optim.py``);
grid 64 on 224-pixel images, blur kernel 13, sigma 6; initial bases ~ U[0, 1); fine-tuning 10 epochs, SGD lr 1e-3
with 7 epochs of linear warm-up from 1% (``_normal/get_optim.py``, README).
"""

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_blur(images: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` for (B, C, H, W) tensors: a separable, normalised Gaussian kernel of odd size
    ``kernel`` over offsets -(kernel-1)/2..(kernel-1)/2, reflect padding."""
    if not (isinstance(kernel, int) and kernel >= 1 and kernel % 2 == 1):
        raise ValueError(f"kernel must be an odd positive int, got {kernel!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    offsets = torch.linspace(-(kernel - 1) / 2, (kernel - 1) / 2, kernel, dtype=images.dtype, device=images.device)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = weights / weights.sum()
    c, half = images.shape[1], kernel // 2
    x = F.pad(images, (half, half, half, half), mode="reflect")
    x = F.conv2d(x, weights.view(1, 1, 1, -1).expand(c, 1, 1, kernel), groups=c)
    return F.conv2d(x, weights.view(1, 1, -1, 1).expand(c, 1, kernel, 1), groups=c)


class SmallCNN(nn.Module):
    """conv3x3-BN-ReLU blocks (max-pooling between them), global average pooling and a linear head: the classifier of
    the noise-mask card (a small stand-in for the official ResNets). ``features(x)`` is the pooled representation."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        if not (isinstance(widths, (list, tuple)) and widths and all(isinstance(w, int) and w > 0 for w in widths)):
            raise ValueError(f"widths must be a non-empty list of positive ints, got {widths!r}")
        layers, channels = [], image_shape[0]
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            channels = width
        self.image_shape = tuple(image_shape)
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = channels
        self.head = nn.Linear(channels, num_classes) if num_classes else nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.view(len(x), *self.image_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MaskPolicy(nn.Module):
    """The official ``MaskGenerator``: a feature extractor (here a small CNN) and two heads, each Linear-BN-ReLU,
    Linear-BN-ReLU, Linear to grid^2 logits, for alpha and beta."""

    def __init__(self, image_shape: tuple[int, int, int], grid: int, widths: tuple[int, ...] = (8, 16, 32)):
        super().__init__()
        if not (isinstance(grid, int) and grid >= 1):
            raise ValueError(f"grid must be a positive int, got {grid!r}")
        self.grid = grid
        self.features = SmallCNN(image_shape, 0, widths)
        dim = self.features.feature_dim

        def head():
            return nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, dim),
                                 nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, grid * grid))

        self.alpha, self.beta = head(), head()

    def forward(self, x, base_alpha, base_beta, decay: float = 0.9):
        """(new_alpha, new_beta, base_alpha, base_beta): per-image logits blended with the bases, and the bases moved
        0.01 towards the batch mean of the heads' outputs (detached)."""
        h = self.features(x)
        alpha, beta = self.alpha(h), self.beta(h)
        new_alpha = decay * base_alpha + (1 - decay) * alpha
        new_beta = decay * base_beta + (1 - decay) * beta
        base_alpha = 0.99 * base_alpha + 0.01 * alpha.detach().mean(0, keepdim=True)
        base_beta = 0.99 * base_beta + 0.01 * beta.detach().mean(0, keepdim=True)
        return new_alpha, new_beta, base_alpha, base_beta


def sample_mask(alpha: torch.Tensor, beta: torch.Tensor, image_size: tuple[int, int], kernel: int, sigma: float):
    """Sample per-cell Beta(exp alpha, exp beta) values (no gradient), and turn them into an image mask: nearest
    upsampling of the grid to ``image_size`` and a Gaussian blur. Returns (cells (B, grid^2), the distribution,
    mask (B, 1, H, W))."""
    distribution = torch.distributions.Beta(alpha.exp(), beta.exp())
    cells = distribution.sample()
    grid = int(round(cells.shape[1] ** 0.5))
    mask = F.interpolate(cells.view(-1, 1, grid, grid), size=image_size)
    return cells, distribution, gaussian_blur(mask, kernel, sigma)


def pgnm_loss(log_prob: torch.Tensor, ce: torch.Tensor, detached: bool = False) -> torch.Tensor:
    """The official PGNM objective mean_b(logsumexp over cells of log p) * CE (``ce`` the batch-mean cross-entropy),
    or with ``detached`` the variant mean_b(lse) * CE.detach() + CE."""
    lse = torch.logsumexp(log_prob, 1).mean()
    return lse * ce.detach() + ce if detached else lse * ce


class NoiseMaskPretraining:
    """Harness algorithm (and hook) for pre-training a classifier under one of the card's input perturbations:

    - "none": the clean image;
    - "random_mask": masks from Beta(exp a0, exp b0) with the initial random bases a0, b0 ~ U[0, 1) kept fixed (no
      policy), upsampled and blurred as PGNM's;
    - "pgnm" / "pgnm_detached": the learned policy with the official loss / the detached-reward variant; the policy
      has its own SGD optimizer (lr = ``policy_lr_factor`` x the classifier's, cosine-annealed to 0 over the epochs);
    - "additive_noise": image + N(0, noise_std^2).

    Masks and noise touch only this algorithm's training steps; anything else (fine-tuning, evaluation) sees clean
    images."""

    KINDS = ("none", "random_mask", "pgnm", "pgnm_detached", "additive_noise")

    def __init__(self, kind: str, image_shape: tuple[int, int, int], grid: int = 8, kernel: int = 3,
                 sigma: float = 0.5, noise_std: float = 0.22, policy_lr_factor: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 1e-4, lr: float = 0.1, epochs: int = 1):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {', '.join(self.KINDS)}, got {kind!r}")
        if not noise_std > 0:
            raise ValueError(f"noise_std must be > 0, got {noise_std!r}")
        gaussian_blur(torch.zeros(1, 1, kernel, kernel), kernel, sigma)  # validates kernel / sigma now
        self.kind, self.image_shape = kind, tuple(image_shape)
        self.kernel, self.sigma, self.noise_std = kernel, sigma, noise_std
        # the official initial bases: U[0, 1) logits per cell (drawn from the run's seeded global generator)
        self.base_alpha, self.base_beta = torch.rand(1, grid * grid), torch.rand(1, grid * grid)
        self.policy = self.policy_optimizer = self.policy_schedule = None
        if kind in ("pgnm", "pgnm_detached"):
            self.policy = MaskPolicy(image_shape, grid)
            self.policy_optimizer = torch.optim.SGD(self.policy.parameters(), lr=lr * policy_lr_factor,
                                                    momentum=momentum, weight_decay=weight_decay)
            self.policy_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.policy_optimizer, T_max=epochs)
        self.lse_history = []

    def masked_input(self, x: torch.Tensor):
        """The perturbed batch and, for the policy, the per-cell log-densities of the sampled mask."""
        images = x.view(len(x), *self.image_shape)
        if self.kind == "none":
            return x, None
        if self.kind == "additive_noise":
            return x + self.noise_std * torch.randn_like(x), None
        if self.kind == "random_mask":
            alpha, beta = self.base_alpha.expand(len(x), -1), self.base_beta.expand(len(x), -1)
            _, _, mask = sample_mask(alpha, beta, self.image_shape[1:], self.kernel, self.sigma)
            return (images * mask).view_as(x), None
        self.policy.train()
        alpha, beta, self.base_alpha, self.base_beta = self.policy(images, self.base_alpha, self.base_beta)
        self.base_alpha, self.base_beta = self.base_alpha.detach(), self.base_beta.detach()
        cells, distribution, mask = sample_mask(alpha, beta, self.image_shape[1:], self.kernel, self.sigma)
        return (images * mask).view_as(x), distribution.log_prob(cells)

    def __call__(self, state, batch: dict):
        if state.accelerator.num_processes > 1:
            raise ValueError("noise-mask pre-training runs in a single process (the policy is not distributed)")
        if self.policy is not None:
            self.policy.to(batch["x"].device)
            self.policy_optimizer.zero_grad(set_to_none=True)
        x, log_prob = self.masked_input(batch["x"])
        logits = state.model(x)
        ce = F.cross_entropy(logits, batch["y"])
        if log_prob is None:
            return ce, logits
        loss = pgnm_loss(log_prob, ce, detached=self.kind == "pgnm_detached")
        self.lse_history.append(torch.logsumexp(log_prob.detach(), 1).mean().item())
        return loss, logits

    def after_backward(self, state) -> None:
        if self.policy_optimizer is not None:
            self.policy_optimizer.step()

    def on_epoch_end(self, state) -> None:
        if self.policy_schedule is not None:
            self.policy_schedule.step()
