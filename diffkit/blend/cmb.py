"""Image completion guided by modalities: plain, summed features, or MaGIC's consistent modality blending (CMB;
Yu et al., ICLR 2024, as the official ``ldm/models/diffusion/ddim_infer.py`` of yeates/MaGIC runs it).

CMB: every modality k runs its own trajectory z^k from the same noise, conditioned by its own network: a
T2I-Adapter's features added inside the encoder (MaGIC's MCU-Nets) or a ControlNet's residuals added to the skip
tensors. During the first P steps the main latent z_t, which never receives any modality's features itself, takes
Q gradient steps on

    L(z) = sum_k w_k mean_l || F_l(z, t) - F_l^k(z^k_t, t) ||^2

that pull the plain UNet's features F toward each modality's features F^k (with equal w_k the minimiser is their
mean), then steps with the plain UNet. F are MaGIC's encoder features for adapters (``conv_in`` and every skip
tensor) and the effective skip features for ControlNets (the skip tensors and the mid block's output with the
residuals added, as the decoder receives them).

The step on z (``step_rule``):

- ``"line_search"`` (``LineSearch``, the default): a backtracking (Armijo) line search on L, sample by sample. It
  starts from the step that would remove the whole loss if L were linear along the gradient, L / |g|^2 (no larger
  step is justified for a loss that is >= 0), and halves it until the loss falls by at least half of what that
  linear model predicts. It has no scale to set: the step is the same if L or z is rescaled, so it transfers
  between schedules and models, and every accepted step lowers the loss.
- ``"official"`` (``OfficialStep``): MaGIC's eta_t = sigma_t^2 / alpha_t^2, ``img - grad_cond * sigmas[i] ** 2``
  with ``sigmas = sqrt_recipm1_alphas_cumprod`` in ``ddim_infer.py``. Its scale is Stable Diffusion's: below 220 on
  SD's schedule, but 4e8 at t = 999 on a cosine schedule, where it diverges unless capped (``max_step_size``).

The branch window (``cond_tau``): ``ddim_infer.py`` feeds branch k its modality only at steps whose DDIM index
(counted down from n - 1) is at least int((1 - cond_tau) n); later blended steps take the branches' plain-UNet
features. The released entry point (``modules/inference_base.py``) calls ``DDIMSampler.sample`` without
``cond_tau``, whose default 1.0 ("paper: 1.0") feeds every step; 0.4 is only ``ddim_sampling``'s own keyword
default (the first 20 of 50 steps). diffkit defaults to 1.0, as the released code runs, and applies the same window
to summed features (``ddim.py``'s non-CMB path gates its single adapter the same way).

The known region is kept RePaint-style: after every step, outside the mask the sample is the known image noised to
the current level with the starting noise (diffusers' inpainting pipelines for 4-channel UNets do the same), and
the gradient steps move only the masked region (the rest would be reset anyway).
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..denoiser import Denoiser, _batch_cat
from ..schedule import StepGrid
from .controlnets import ControlNetModality, controlled
from .features import encoder_features, injected, network


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
    """The completed sample and the blending diagnostics, one row per blended step (P rows; none without blending).

    ``blend_losses`` (P, Q + 1): the blending loss, summed over the batch, before each gradient step and after the
    last. ``residual_losses`` (P,): the loss each modality's features keep against the plain UNet's at that
    modality's own branch latent, summed over modalities and batch: the part of the targets that the injected
    features (adapter features, ControlNet residuals) make, which the plain UNet does not produce even at the
    branch's latent. ``floor_losses`` (P,): the loss at the modalities' mean features, its minimum over any
    features (no latent gets below it: it measures how much the modalities disagree). ``loss_removed`` (P,): the
    fraction of the loss the Q steps removed."""

    sample: torch.Tensor
    blend_losses: torch.Tensor
    residual_losses: torch.Tensor
    floor_losses: torch.Tensor

    @property
    def loss_removed(self) -> torch.Tensor:
        return 1 - self.blend_losses[:, -1] / self.blend_losses[:, 0]


# -- step rules ---------------------------------------------------------------------------------------------------


def _rows_of(value, rows: torch.Tensor, batch: int):
    """Samples ``rows`` of conditioning (tensors with the batch first, dicts of them) or of a feature stacked as
    (halves, batch, ...)."""
    if torch.is_tensor(value) and value.ndim and value.shape[0] % batch == 0:
        return value.reshape(-1, batch, *value.shape[1:])[:, rows].reshape(-1, *value.shape[1:])
    if isinstance(value, dict):
        return {name: _rows_of(v, rows, batch) for name, v in value.items()}
    return value


class _Objective:
    """The per-sample blending loss at fixed t and targets, on the whole batch or on some of its samples."""

    def __init__(self, denoiser, t, targets, cond, uncond, layers, weights, mid, batch: int):
        self.denoiser, self.t, self.targets, self.cond, self.uncond = denoiser, t, targets, cond, uncond
        self.layers, self.weights, self.mid, self.batch = layers, weights, mid, batch

    def __call__(self, z: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        targets, cond, uncond, b = self.targets, self.cond, self.uncond, self.batch
        if rows is not None:
            targets = [[_rows_of(f, rows, b) for f in target] for target in targets]
            cond, uncond = _rows_of(cond, rows, b), _rows_of(uncond, rows, b)
        return blend_loss(self.denoiser, z, self.t, targets, cond, uncond, self.layers, self.weights, self.mid)


@dataclass(frozen=True)
class LineSearch:
    """Backtracking (Armijo) line search on the blending loss, sample by sample: the default step rule.

    Each gradient step starts from the Polyak step L / |g|^2 (where the loss's linear model reaches 0), or from
    ``growth`` times the step the sample's previous gradient step accepted if that is smaller (the previous blended
    step's last, at a blended step's first), and halves it (at most ``max_halvings`` times; then the sample stays) until
    L(z - eta g) <= L(z) - ``sufficient_decrease`` * eta |g|^2. With ``sufficient_decrease`` = 0.5 a quadratic loss
    accepts exactly the steps up to its minimiser along -g, so backtracking from above never overshoots it.
    Invariant to rescaling the loss or the latent: nothing depends on the schedule's sigma / alpha."""

    sufficient_decrease: float = 0.5
    max_halvings: int = 30
    growth: float = 2.0

    def __post_init__(self):
        if not 0 < self.sufficient_decrease < 1:
            raise ValueError(f"sufficient_decrease must be in (0, 1), got {self.sufficient_decrease!r}")
        if not (isinstance(self.max_halvings, int) and self.max_halvings >= 0):
            raise ValueError(f"max_halvings must be an integer >= 0, got {self.max_halvings!r}")
        if not self.growth >= 1:
            raise ValueError(f"growth must be >= 1, got {self.growth!r}")

    def step(self, objective, z, loss, grad, rho, memory: dict):
        """(new z, its per-sample loss) from z, its loss and gradient; ``memory`` carries the accepted steps."""
        g2 = grad.pow(2).flatten(1).sum(1)
        eta = torch.where(g2 > 0, loss / g2.clamp_min(torch.finfo(g2.dtype).tiny), torch.zeros_like(g2))
        previous = memory.get("accepted")
        if previous is not None and previous.shape == eta.shape:
            # a sample no step could lower keeps 0 within its blended step, and starts afresh at the next
            eta = torch.minimum(eta, torch.where(previous > 0, self.growth * previous, eta if memory.get("fresh") else previous))
        new_z, new_loss, accepted = z.clone(), loss.clone(), torch.zeros_like(eta)
        pending = torch.nonzero(eta > 0).flatten()
        shape = (-1,) + (1,) * (z.ndim - 1)
        for _ in range(self.max_halvings + 1):
            if not len(pending):
                break
            trial = z[pending] - eta[pending].view(shape) * grad[pending]
            with torch.no_grad():
                trial_loss = objective(trial, pending)
            ok = trial_loss <= loss[pending] - self.sufficient_decrease * eta[pending] * g2[pending]
            done = pending[ok]
            new_z[done], new_loss[done], accepted[done] = trial[ok], trial_loss[ok], eta[done]
            pending = pending[~ok]
            eta[pending] = eta[pending] / 2
        memory.update(accepted=accepted, fresh=False)
        return new_z, new_loss


@dataclass(frozen=True)
class OfficialStep:
    """MaGIC's step, eta_t = ``scale`` * sigma_t^2 / alpha_t^2, at most ``max_step_size`` (None: uncapped, as the
    official code). Source: ``img = img - grad_cond * sigmas[i] ** 2``, ``sigmas = sqrt_recipm1_alphas_cumprod``
    (yeates/MaGIC ``ldm/models/diffusion/ddim_infer.py``). On a cosine schedule it needs a cap (about 10 on the
    default model), where Stable Diffusion's schedule keeps it below 220."""

    scale: float = 1.0
    max_step_size: float | None = None

    def __post_init__(self):
        if not (isinstance(self.scale, (int, float)) and 0 < self.scale < float("inf")):
            raise ValueError(f"scale must be a finite number > 0, got {self.scale!r}")
        if self.max_step_size is not None and not (isinstance(self.max_step_size, (int, float))
                                                   and 0 < self.max_step_size < float("inf")):
            raise ValueError(f"max_step_size must be None or a finite number > 0, got {self.max_step_size!r}")

    def size(self, rho: float) -> float:
        eta = self.scale * rho**2
        return eta if self.max_step_size is None else min(eta, self.max_step_size)

    def step(self, objective, z, loss, grad, rho, memory: dict):
        return z - self.size(rho) * grad, None


STEP_RULES = {"line_search": LineSearch, "official": OfficialStep}


def step_rule_for(rule) -> LineSearch | OfficialStep:
    """A step rule from its name (``STEP_RULES``, default options) or an instance, which is returned as is."""
    if isinstance(rule, (LineSearch, OfficialStep)):
        return rule
    if isinstance(rule, str) and rule in STEP_RULES:
        return STEP_RULES[rule]()
    raise ValueError(f"step_rule must be one of {sorted(STEP_RULES)} or a LineSearch / OfficialStep, got {rule!r}")


# -- the blending loss and its gradient steps ----------------------------------------------------------------------


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


def _per_sample(feats, targets, b: int, layers=None, weights=None) -> torch.Tensor:
    layers = range(len(feats)) if layers is None else layers
    weights = [1.0] * len(targets) if weights is None else weights
    loss = feats[0].new_zeros(b)
    for w, target in zip(weights, targets):
        per_layer = [(feats[l] - target[l]).pow(2).reshape(-1, b, feats[l][0].numel()).mean(dim=(0, 2)) for l in layers]
        loss = loss + w * torch.stack(per_layer).mean(dim=0)
    return loss


def blend_loss(denoiser: Denoiser, z, t, targets: list[list[torch.Tensor]], cond=None, uncond=None, layers=None,
               weights=None, mid: bool = False):
    """Per-sample CMB loss, shape (B,): sum_k w_k mean_l MSE(F_l(z, t), F_l^k), where ``targets[k]`` holds the
    modality's features on the same (conditional; unconditional) batch; ``layers`` selects features; ``mid``: the
    effective skip features (ControlNet modalities) instead of the encoder features (adapters)."""
    xx, cc = _guided_batch(z, cond, uncond)
    feats = encoder_features(denoiser.model, lambda: denoiser(xx, t, cc), mid=mid)
    return _per_sample(feats, targets, z.shape[0], layers, weights)


def blend_update(denoiser, z, t, targets, iterations: int, step_rule="line_search", rho: float | None = None,
                 cond=None, uncond=None, layers=None, weights=None, mask=None, mid: bool = False,
                 memory: dict | None = None):
    """``iterations`` (Q) gradient steps on the blending loss by ``step_rule`` (``"line_search"``, ``"official"`` or
    a rule instance; the official rule needs ``rho`` = sigma_t / alpha_t). ``mask`` (1 = free) restricts the steps
    to the masked region. ``memory``: a dict the rule keeps its state in from one blended step to the next (the line
    search's last accepted steps). Returns the new latent and the loss summed over the batch before each step and
    after the last (Q + 1 floats)."""
    rule = step_rule_for(step_rule)
    if isinstance(rule, OfficialStep) and rho is None:
        raise ValueError("the official step sigma_t^2 / alpha_t^2 needs rho = sigma_t / alpha_t")
    objective = _Objective(denoiser, t, targets, cond, uncond, layers, weights, mid, z.shape[0])
    losses, loss = [], None
    memory = {} if memory is None else memory
    memory["fresh"] = True
    z = z.detach()
    for _ in range(iterations):
        with torch.enable_grad():
            z = z.requires_grad_(True)
            loss = objective(z)
            (grad,) = torch.autograd.grad(loss.sum(), z)
        z, loss = z.detach(), loss.detach()
        if mask is not None:
            grad = grad * mask
        losses.append(loss.sum().item())
        z, loss = rule.step(objective, z, loss, grad, rho, memory)
    if iterations:
        if loss is None:  # a rule that does not evaluate the loss at its new point
            with torch.no_grad():
                loss = objective(z)
        losses.append(loss.sum().item())
    return z, losses


# -- completion ----------------------------------------------------------------------------------------------------


def _kind(modalities) -> str | None:
    kinds = {type(m) for m in modalities}
    unknown = kinds - {Modality, ControlNetModality}
    if unknown:
        raise TypeError(f"modalities must be Modality (adapter features) or ControlNetModality, got {sorted(k.__name__ for k in unknown)}")
    if len(kinds) > 1:
        raise ValueError("the modalities mix T2I-Adapter features and ControlNets; blend one kind per call")
    return None if not kinds else ("controlnet" if ControlNetModality in kinds else "adapter")


def _conditioned(unet, modalities, stacked: bool, when):
    """Every forward of ``unet`` conditioned by ``modalities``: summed over them, or one per stacked group."""
    if not modalities:
        return nullcontext()
    if isinstance(modalities[0], ControlNetModality):
        return controlled(unet, modalities, stacked=stacked, when=when)
    combine = torch.cat if stacked else (lambda parts: sum(parts))
    return injected(unet, [combine(parts) for parts in zip(*(m.scaled() for m in modalities))], when=when)


def complete(
    denoiser: Denoiser,
    solver,
    noise: torch.Tensor,
    timesteps: torch.Tensor | StepGrid,
    known: torch.Tensor,
    mask: torch.Tensor,
    modalities: list[Modality] | list[ControlNetModality] = (),
    mode: str = "cmb",
    blend_steps: int = 0,
    blend_iterations: int = 5,
    step_rule="line_search",
    cond_tau: float = 1.0,
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

    ``mode="sum"`` conditions the main trajectory on every modality at once (adapter features summed, as diffusers'
    MultiAdapter; ControlNet residuals summed, as its MultiControlNetModel); no modality: plain completion.
    ``mode="cmb"`` blends by the latent updates of the first ``blend_steps`` (P) steps, ``blend_iterations`` (Q)
    each, by ``step_rule`` (see the module). ``cond_tau``: the modalities condition steps i < n - int((1 - cond_tau) n)
    only (MaGIC's window; 1.0 = every step). With P = 0 the run is plain completion.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rule = step_rule_for(step_rule)
    if isinstance(cond_tau, bool) or not (isinstance(cond_tau, (int, float)) and 0 <= cond_tau <= 1):
        raise ValueError(f"cond_tau must be a number in [0, 1] (the fraction of steps the modalities condition), got {cond_tau!r}")
    modalities = list(modalities)
    kind = _kind(modalities)
    unet = denoiser.model
    if kind == "controlnet" and getattr(network(unet).config, "cross_attention_dim", None) is None:
        raise ValueError(f"ControlNets condition a UNet2DConditionModel (SD 1.x / 2.x, SDXL); this network is a "
                         f"{type(network(unet)).__name__}, which diffusers' ControlNetModel does not serve")
    grid = timesteps if isinstance(timesteps, StepGrid) else StepGrid.from_timesteps(denoiser.schedule, timesteps)
    n = grid.num_steps
    if not 0 <= blend_steps <= n:
        raise ValueError(f"blend_steps must be in [0, {n}] (the number of steps), got {blend_steps}")
    if blend_iterations < 0:
        raise ValueError(f"blend_iterations must be >= 0, got {blend_iterations}")
    fed_until = n - int((1 - cond_tau) * n)  # ddim_infer.py: fed while index = n - 1 - i >= int((1 - cond_tau) n)
    mid = kind == "controlnet"
    t_model = grid.model_timesteps(noise.device)
    keep = 1 - mask

    def paint(x, i):  # the branches' batch stacks k copies of the images: broadcast over the copies
        copies = x.view(-1, *known.shape)
        return (mask * copies + keep * grid.add_noise(known, noise, i)).view_as(x)

    def run(x, mods, cond_, uncond_, on_step, stacked=False, stop_after=None):
        at = {"step": 0}

        def step(info):
            i = info["step"] + 1
            at["step"] = i
            x_i, stop = on_step(paint(info["x"], i), i)
            return {"x": x_i, "stop": stop or (stop_after is not None and i >= stop_after)}

        with _conditioned(unet, mods, stacked, when=lambda: at["step"] < fed_until):
            return solver(denoiser, x, grid, cond=cond_, uncond=uncond_, guidance=guidance, generator=generator,
                          callback=step, **solver_opts)

    def user_step(x, i):
        if callback is not None:
            out = callback({"step": i - 1, "t": t_model[i - 1], "x": x})
            if isinstance(out, dict):
                return out.get("x", x), bool(out.get("stop", False))
        return x, False

    x = noise  # pure noise everywhere at the start, as diffusers' inpainting pipelines at strength 1
    if mode == "sum" or not modalities or blend_steps == 0 or blend_iterations == 0:
        sample = run(x, modalities if mode == "sum" else [], cond, uncond, user_step)
        return Completion(sample, torch.zeros(0, blend_iterations + 1), torch.zeros(0), torch.zeros(0))

    # 1. Every modality's own trajectory from the same noise (batched), kept for the first P steps.
    k, b = len(modalities), noise.shape[0]
    branch_cond, branch_uncond = _repeat(cond, k), _repeat(uncond, k)
    branch = [x.repeat(k, 1, 1, 1)]

    def keep_branch(x_i, i):
        branch.append(x_i)
        return x_i, False

    if blend_steps > 1:
        run(branch[0], modalities, branch_cond, branch_uncond, keep_branch, stacked=True, stop_after=blend_steps - 1)

    # 2. The main trajectory: plain UNet steps; the first P preceded by Q feature-matching gradient steps.
    losses, residual, floor, memory = [], [], [], {}
    halves = 1 if uncond is None else 2

    def per_modality(feats):  # one feature list per modality, each on the (conditional; unconditional) batch of b
        return [[f.reshape(halves, k, b, *f.shape[1:])[:, j].reshape(halves * b, *f.shape[1:]) for f in feats]
                for j in range(k)]

    def blend(x_i, i):
        t, fed = t_model[i], i < fed_until
        with torch.no_grad():
            zz, cc = _guided_batch(branch[i], branch_cond, branch_uncond)
            with _conditioned(unet, modalities, stacked=True, when=lambda: fed):
                targets = per_modality(encoder_features(unet, lambda: denoiser(zz, t, cc), mid=mid))
            plain = per_modality(encoder_features(unet, lambda: denoiser(zz, t, cc), mid=mid))
        residual.append(sum(_per_sample(p, [tg], b, layers).sum().item() for p, tg in zip(plain, targets)))
        mean = [torch.stack(parts).mean(0) for parts in zip(*targets)]  # the minimiser of the equal-weight loss
        floor.append(_per_sample(mean, targets, b, layers).sum().item())
        z, step_losses = blend_update(denoiser, x_i, t, targets, blend_iterations, rule, grid.rho[i], cond, uncond,
                                      layers, mask=mask, mid=mid, memory=memory)
        losses.append(step_losses)
        return paint(z, i)

    def main_step(x_i, i):
        if i < blend_steps:
            x_i = blend(x_i, i)
        return user_step(x_i, i)

    sample = run(blend(x, 0), [], cond, uncond, main_step)
    return Completion(sample, torch.tensor(losses), torch.tensor(residual), torch.tensor(floor))
