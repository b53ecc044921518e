"""Training pieces shared by the scripts that train diffusion models: the denoising loss and an EMA."""

import copy

import torch

from .denoiser import convert
from .schedule import NoiseSchedule


def diffusion_loss(
    model,
    schedule: NoiseSchedule,
    prediction_type: str,
    x0: torch.Tensor,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Ho et al. (2020) simple loss: noise x0 at uniform integer t, regress the network on its target
    (eps, x0, v or the flow velocity) with mean squared error."""
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    alpha, sigma = schedule.coefficients(t, x0)
    x_t = schedule.add_noise(x0, eps, t)
    target = convert(eps, "epsilon", prediction_type, x_t, alpha, sigma)
    pred = model(x_t, t, **(cond or {}), return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), target.float())


class EMA:
    """Exponential moving average of a model's parameters, with the usual warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay, self.steps = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
