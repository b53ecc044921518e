"""Training algorithms: what one step computes from a batch. ``ERM`` is the plain loss; ``AdversarialL2`` is
L2 projected-gradient-descent adversarial training (Madry et al., "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018), the robust training Shah et al. (NeurIPS 2021) compare input gradients of."""

import torch
import torch.nn.functional as F


class ERM:
    """Empirical risk minimisation: the criterion on the clean batch."""

    def __call__(self, state, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = state.model(batch["x"])
        return state.criterion(logits, batch["y"], batch["index"]), logits


class AdversarialL2:
    """Train on L2 PGD adversarial examples: ``steps`` normalised-gradient ascent steps of size ``step_size``
    (default 2.5 eps / steps, Madry et al.'s choice) on the cross-entropy, each projected onto the eps-ball and the
    [0, 1] pixel box, from a zero start (deterministic, so runs are reproducible)."""

    def __init__(self, eps: float = 2.0, steps: int = 5, step_size: float | None = None):
        if not eps > 0 or not (isinstance(steps, int) and steps > 0):
            raise ValueError(f"need eps > 0 and a positive int steps, got eps={eps!r}, steps={steps!r}")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0 or None, got {step_size!r}")
        self.eps, self.steps = eps, steps
        self.step_size = 2.5 * eps / steps if step_size is None else step_size

    def attack(self, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        delta = torch.zeros_like(x)
        for _ in range(self.steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y), delta)
            with torch.no_grad():
                norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
                delta = delta + self.step_size * grad / norm
                scale = (self.eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1)
                delta = (x + delta * scale.view_as(norm)).clamp(0, 1) - x
        return delta.detach()

    def __call__(self, state, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        # the attack runs on the bare module: under DDP a forward without its backward would confuse the reducer
        x_adv = batch["x"] + self.attack(state.unwrapped_model, batch["x"], batch["y"])
        logits = state.model(x_adv)
        return state.criterion(logits, batch["y"], batch["index"]), logits
