"""A world with an exact answer for diffusion with forward models: 1-D Gaussian-process signals seen through
windows (research note, Sec. 3.5).

S = f + b h with f ~ GP(0, k_RBF) on L points, h a fixed bump on the right end of the signal and b = +-1 a
fair random sign (``bump=0`` gives the plain GP). Given a noise-free window of S, the posterior is a mixture
of two Gaussians, one per sign, each the Gaussian conditional of f; with the window off the bump the sign
stays a coin flip, so the posterior is bimodal.
"""

import math

import torch


class GaussianProcessSignals:
    def __init__(self, length: int = 32, length_scale: float = 4.0, bump: float = 0.0, bump_width: int = 10,
                 jitter: float = 1e-4):
        if length < 2 or length_scale <= 0 or not 0 <= bump_width <= length:
            raise ValueError(f"need length >= 2, length_scale > 0, 0 <= bump_width <= length; got "
                             f"{length}, {length_scale}, {bump_width}")
        self.length, self.bump_amplitude = length, float(bump)
        x = torch.arange(length, dtype=torch.float64)
        self.covariance = torch.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / length_scale**2) + jitter * torch.eye(length)
        self.bump = torch.zeros(length, dtype=torch.float64)  # a sin^2 hump on the last bump_width points
        if bump_width:
            self.bump[length - bump_width :] = bump * torch.sin(math.pi * (torch.arange(bump_width) + 0.5) / bump_width) ** 2
        self._chol = torch.linalg.cholesky(self.covariance)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(signals (n, 1, L) float32, signs (n,))."""
        f = torch.randn(n, self.length, generator=generator, dtype=torch.float64) @ self._chol.T
        sign = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
        return (f + sign[:, None] * self.bump).float()[:, None], sign

    def posterior(self, observed: torch.Tensor, index: torch.Tensor):
        """p(S | S[index] = observed) for one signal: (weights (2,), means (2, L), covariance (L, L)) of the
        mixture over the sign b = -1, +1."""
        observed = torch.as_tensor(observed, dtype=torch.float64).flatten()
        index = torch.as_tensor(index).long().flatten()
        k_cc = self.covariance[index][:, index]
        k_ac = self.covariance[:, index]
        gain = torch.linalg.solve(k_cc, k_ac.T).T  # K_ac K_cc^-1
        covariance = self.covariance - gain @ k_ac.T
        means, log_weights = [], []
        for b in (-1.0, 1.0):
            residual = observed - b * self.bump[index]
            means.append(b * self.bump + gain @ residual)
            log_weights.append(-0.5 * residual @ torch.linalg.solve(k_cc, residual))
        weights = torch.softmax(torch.stack(log_weights), 0)
        return weights, torch.stack(means), 0.5 * (covariance + covariance.T)

    def prior_std(self) -> torch.Tensor:
        """Per-coordinate std of S under the prior (the mixture over the sign)."""
        return (self.covariance.diagonal() + self.bump**2).sqrt()
