"""Training a generator from observations alone (Tewari et al., NeurIPS 2023, Sec. 3 and the official p_losses).

The data are groups of observations of the same unseen signal, (B, V, *observation_shape), with their views.
Per step each group's views are drawn in a fresh random order (the official data loaders pick the context and
target frames of a scene at random on every item): the first ``n`` are the context, the next one is the target;
only the target observation is noised; the generator predicts the signal from the context, the noisy target,
their views and the noise level; the loss compares the signal rendered at the target view and at every remaining
(clean) view with those observations. The signal itself never enters the loss.
"""

import copy

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..schedule import NoiseSchedule
from .forward_models import check_signal, merge_lifted


MODES = ("dfm", "regression", "observation")


def observe(forward_model, signals: torch.Tensor, views_per_signal: int, generator: torch.Generator | None = None):
    """A training set: ``views_per_signal`` random views of each signal -> (observations (B, V, ...), views (B, V, ...)).
    The signals themselves are dropped."""
    check_signal(forward_model, signals, "signals")
    views = torch.stack([forward_model.random_views(len(signals), generator) for _ in range(views_per_signal)], 1)
    observations = torch.stack([forward_model(signals, views[:, k]) for k in range(views_per_signal)], 1)
    return observations, views


def generator_inputs(forward_model, context, noisy_target: torch.Tensor, target_view: torch.Tensor) -> torch.Tensor:
    """The generator's input: lifted context, its mask, lifted noisy target observation, its mask (channels)."""
    canvas, mask = context
    target_canvas, target_mask = forward_model.lift(noisy_target, target_view)
    return torch.cat([canvas, mask, target_canvas, target_mask], dim=1)


def lift_context(forward_model, observations: torch.Tensor, views: torch.Tensor):
    """Merge the context views (B, n, ...) into one lifted canvas and mask."""
    return merge_lifted([forward_model.lift(observations[:, k], views[:, k]) for k in range(observations.shape[1])])


def shuffle_views(observations: torch.Tensor, views: torch.Tensor, generator: torch.Generator | None = None):
    """Each group's (observation, view) pairs in a random order of its own."""
    order = torch.argsort(torch.rand(views.shape[:2], generator=generator), dim=1)

    def take(x):
        return torch.take_along_dim(x, order.view(*order.shape, *[1] * (x.ndim - 2)).to(x.device), dim=1)

    return take(observations), take(views)


def dfm_loss(
    model,
    forward_model,
    schedule: NoiseSchedule,
    observations: torch.Tensor,
    views: torch.Tensor,
    num_context: int = 1,
    p_uncond: float = 0.1,
    mode: str = "dfm",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The DFM loss on one batch of view groups.

    ``mode``: "dfm" (the method), "regression" (the same multi-view loss, but the generator sees no noisy
    target: a deterministic regressor of the signal from the context) or "observation" (the loss on the
    noisy target view only: diffusion on observations, which never learns the signal outside that view).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    b, v = observations.shape[:2]
    if not 1 <= num_context <= v - (1 if mode == "observation" else 2):
        raise ValueError(f"num_context={num_context} leaves no target and extra view among {v} views per signal")
    device, dtype = observations.device, observations.dtype
    context = lift_context(forward_model, observations[:, :num_context], views[:, :num_context])
    # classifier-free guidance on the context: drop it (zero canvas and mask) for a fraction of the batch
    keep = (torch.rand(b, generator=generator) >= p_uncond).to(device, dtype).view(b, *([1] * (context[0].ndim - 1)))
    context = (context[0] * keep, context[1] * keep)

    target, target_view = observations[:, num_context], views[:, num_context]
    if mode == "regression":  # the regressor's input carries no target: pure noise level, zero observation
        t = torch.full((b,), schedule.num_train_timesteps - 1)
        noisy = torch.zeros_like(target)
    else:  # noise only the target observation (Sec. 3.2)
        t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=generator)
        eps = torch.randn(target.shape, generator=generator).to(device, dtype)
        noisy = schedule.add_noise(target, eps, t)
    inputs = generator_inputs(forward_model, context, noisy, target_view)
    signal = model(inputs, t.to(device), return_dict=False)[0]

    rendered = range(num_context, num_context + 1 if mode == "observation" else v)
    return torch.stack([F.mse_loss(forward_model(signal, views[:, k]), observations[:, k]) for k in rendered]).mean()


def train_dfm(
    model,
    forward_model,
    schedule: NoiseSchedule,
    observations: torch.Tensor,
    views: torch.Tensor,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 1e-3,
    max_context: int = 2,
    p_uncond: float = 0.1,
    mode: str = "dfm",
    ema_decay: float | None = 0.999,
    seed: int = 0,
    accelerator: Accelerator | None = None,
    progress: bool = True,
) -> tuple[torch.nn.Module, list[float]]:
    """Adam on ``dfm_loss`` with 1..``max_context`` context views per step, each group's views in a fresh random
    order (so every view serves as context and as target); returns (the EMA model or the trained one, the loss per
    step). Runs under accelerate: each process draws its own batches."""
    if observations.shape[:2] != views.shape[:2]:
        raise ValueError(f"observations {tuple(observations.shape)} and views {tuple(views.shape)} disagree on (B, V)")
    if not torch.isfinite(observations).all():
        raise ValueError("observations contain NaN or inf")
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    rng = torch.Generator().manual_seed(seed + accelerator.process_index)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=ema_decay) if ema_decay else None
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc=f"training ({mode})", disable=not progress or not accelerator.is_local_main_process):
        index = torch.randint(0, len(observations), (batch_size,), generator=rng)
        num_context = int(torch.randint(1, max_context + 1, (), generator=rng))
        batch_observations, batch_views = shuffle_views(observations[index], views[index], rng)
        loss = dfm_loss(
            model, forward_model, schedule, batch_observations.to(accelerator.device), batch_views,
            num_context=num_context, p_uncond=p_uncond, mode=mode, generator=rng,
        )
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        if ema is not None:
            ema.step(accelerator.unwrap_model(model).parameters())
        losses.append(loss.item())
    trained = accelerator.unwrap_model(model)
    if ema is not None:
        trained = copy.deepcopy(trained)
        ema.copy_to(trained.parameters())
    return trained.eval(), losses
