"""Image completion guided by modalities: plain, summed adapter features, or MaGIC's consistent modality
blending (CMB; Yu et al., ICLR 2024, as the official ``ddim_infer.py`` runs it).

CMB: every modality k runs its own trajectory z^k from the same noise with its adapter's features added to the
encoder. During the first P steps the main latent z_t, which never receives adapter features itself, takes Q
gradient steps

    z_t <- z_t - eta_t * grad_z  sum_k w_k mean_l || F_l(z_t, t) - F_l^k(z^k_t, t) ||^2,   eta_t = sigma_t^2 / alpha_t^2

that pull the plain UNet's encoder features F toward each modality's guided features F^k (with equal w_k the
minimiser is their mean), then steps with the plain UNet. The known region is kept RePaint-style for a pixel
model: after every step, outside the mask the sample is the known image noised to the current level with the
starting noise (diffusers' inpainting pipelines for 4-channel UNets do the same).
"""

from dataclasses import dataclass

import torch

from ..denoiser import Denoiser, _batch_cat
from ..schedule import StepGrid
from .features import encoder_features, injected


MODES = ("sum", "cmb")


@dataclass
class Modality:
    """One modality's adapter features for the batch (one tensor per UNet down block) and its strength, which
    scales the features (T2I-Adapter's conditioning scale, MultiAdapter's weight)."""

    features: list[torch.Tensor]
    strength: float = 1.0

    def scaled(self) -> list[torch.Tensor]:
        return [self.strength * f for f in self.features]


@dataclass
class Completion:
    sample: torch.Tensor
    blend_losses: torch.Tensor  # (P, Q): the blending loss before each gradient step, summed over the batch


def _repeat(value, k: int):
    """Conditioning for k copies of the batch, stacked along the batch (tensors, lists/tuples, dicts)."""
    if torch.is_tensor(value):
        return value.repeat(k, *([1] * (value.ndim - 1)))
    if isinstance(value, (list, tuple)):
        return type(value)(_repeat(v, k) for v in value)
    if isinstance(value, dict):
        return {name: _repeat(v, k) for name, v in value.items()}
    return value


def _guided_batch(x, cond, uncond):
    """The (conditional; unconditional) batch MaGIC computes features on, or the conditional one alone."""
    return (x, cond) if uncond is None else (torch.cat([x, x]), _batch_cat(cond, uncond))


def blend_loss(denoiser: Denoiser, z, t, targets: list[list[torch.Tensor]], cond=None, uncond=None, layers=None, weights=None):
    """Per-sample CMB loss, shape (B,): sum_k w_k mean_l MSE(F_l(z, t), F_l^k), where ``targets[k]`` holds the
    modality's encoder features on the same (conditional; unconditional) batch; ``layers`` selects features."""
    xx, cc = _guided_batch(z, cond, uncond)
    feats = encoder_features(denoiser.model, lambda: denoiser(xx, t, cc))
    layers = range(len(feats)) if layers is None else layers
    weights = [1.0] * len(targets) if weights is None else weights
    b = z.shape[0]
    loss = z.new_zeros(b)
    for w, target in zip(weights, targets):
        per_layer = [(feats[l] - target[l]).pow(2).reshape(-1, b, feats[l][0].numel()).mean(dim=(0, 2)) for l in layers]
        loss = loss + w * torch.stack(per_layer).mean(dim=0)
    return loss


def blend_update(denoiser, z, t, eta: float, targets, iterations: int, cond=None, uncond=None, layers=None, weights=None):
    """Q gradient steps of size eta on the blending loss; returns the new latent and the loss before each step."""
    losses = []
    for _ in range(iterations):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            loss = blend_loss(denoiser, z, t, targets, cond, uncond, layers, weights)
            (grad,) = torch.autograd.grad(loss.sum(), z)
        losses.append(loss.sum().item())
        z = (z - eta * grad).detach()
    return z, losses


def complete(
    denoiser: Denoiser,
    solver,
    noise: torch.Tensor,
    timesteps: torch.Tensor | StepGrid,
    known: torch.Tensor,
    mask: torch.Tensor,
    modalities: list[Modality] = (),
    mode: str = "cmb",
    blend_steps: int = 0,
    blend_iterations: int = 5,
    step_scale: float = 1.0,
    max_step_size: float | None = None,
    layers: list[int] | None = None,
    cond: dict | None = None,
    uncond: dict | None = None,
    guidance=None,
    generator: torch.Generator | None = None,
    callback=None,
    **solver_opts,
) -> Completion:
    """Fill ``mask`` (1 = unknown) of ``known`` by running ``solver`` from ``noise`` over ``timesteps`` (a
    ``StepGrid`` or a plain timestep array).

    ``mode="sum"`` adds sum_k s_k f_k to the main trajectory's encoder at every step (no modality: plain
    completion; one: T2I-Adapter); ``mode="cmb"`` blends by the latent updates of the first ``blend_steps`` (P)
    steps, ``blend_iterations`` (Q) each, of size ``step_scale * sigma_t^2 / alpha_t^2`` (at most
    ``max_step_size``). With P = 0 the run is plain completion.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    grid = timesteps if isinstance(timesteps, StepGrid) else StepGrid.from_timesteps(denoiser.schedule, timesteps)
    n = grid.num_steps
    if not 0 <= blend_steps <= n:
        raise ValueError(f"blend_steps must be in [0, {n}] (the number of steps), got {blend_steps}")
    if blend_iterations < 0:
        raise ValueError(f"blend_iterations must be >= 0, got {blend_iterations}")
    unet = denoiser.model
    t_model = grid.model_timesteps(noise.device)
    keep = 1 - mask

    def paint(x, i):  # the branches' batch stacks k copies of the images: broadcast over the copies
        copies = x.view(-1, *known.shape)
        return (mask * copies + keep * grid.add_noise(known, noise, i)).view_as(x)

    def run(x, feats, cond_, uncond_, on_step, stop_after=None):
        def step(info):
            i = info["step"] + 1
            x_i = paint(info["x"], i)
            return {"x": on_step(x_i, i), "stop": stop_after is not None and i >= stop_after}

        with injected(unet, feats):
            return solver(denoiser, x, grid, cond=cond_, uncond=uncond_, guidance=guidance, generator=generator,
                          callback=step, **solver_opts)

    def user_step(x, i):
        if callback is not None:
            out = callback({"step": i - 1, "t": t_model[i - 1], "x": x})
            if isinstance(out, dict) and "x" in out:
                return out["x"]
        return x

    x = noise  # pure noise everywhere at the start, as diffusers' inpainting pipelines at strength 1
    if mode == "sum" or not modalities or blend_steps == 0 or blend_iterations == 0:
        summed = None
        if mode == "sum" and modalities:
            summed = [sum(parts) for parts in zip(*(m.scaled() for m in modalities))]
        sample = run(x, summed, cond, uncond, user_step)
        return Completion(sample, torch.zeros(0, blend_iterations))

    # 1. Every modality's own trajectory from the same noise (batched), kept for the first P steps.
    k, b = len(modalities), noise.shape[0]
    branch_feats = [torch.cat(parts) for parts in zip(*(m.scaled() for m in modalities))]
    branch_cond, branch_uncond = _repeat(cond, k), _repeat(uncond, k)
    branch = [x.repeat(k, 1, 1, 1)]

    def keep_branch(x_i, i):
        branch.append(x_i)
        return x_i

    if blend_steps > 1:
        run(branch[0], branch_feats, branch_cond, branch_uncond, keep_branch, stop_after=blend_steps - 1)

    # 2. The main trajectory: plain UNet steps; the first P preceded by Q feature-matching gradient steps.
    losses = []

    def blend(x_i, i):
        t = t_model[i]
        with torch.no_grad():
            zz, cc = _guided_batch(branch[i], branch_cond, branch_uncond)
            with injected(unet, branch_feats):
                feats = encoder_features(unet, lambda: denoiser(zz, t, cc))
        halves = 1 if uncond is None else 2
        # back to one feature list per modality, each on the (conditional; unconditional) batch of b
        targets = [[f.reshape(halves, k, b, *f.shape[1:])[:, j].reshape(halves * b, *f.shape[1:]) for f in feats]
                   for j in range(k)]
        eta = step_scale * grid.rho[i] ** 2
        if max_step_size is not None:
            eta = min(eta, max_step_size)
        z, step_losses = blend_update(denoiser, x_i, t, eta, targets, blend_iterations, cond, uncond, layers)
        losses.append(step_losses)
        return paint(z, i)

    def main_step(x_i, i):
        if i < blend_steps:
            x_i = blend(x_i, i)
        return user_step(x_i, i)

    sample = run(blend(x, 0), None, cond, uncond, main_step)
    return Completion(sample, torch.tensor(losses))
