"""Visual anagrams: one sample that shows a different condition under each view.

Baseline, Geng, Park & Owens, "Visual Anagrams", CVPR 2024 (dangeng/visual_anagrams ``samplers.py``): at every
step each view i runs the (guided) denoiser on P_i x_t with its own condition, the predictions are mapped back
through P_i^-1 and averaged.

Multi-task additions, Xu et al., "Diffusion-based Visual Anagram as Multi-task Learning", WACV 2025
(Pixtella/Anagram-MTL ``visual_anagrams/mtl.py``, ``samplers_mtl.py``):

- noise-vector balancing (NVB): weights alpha_i proportional to s_ii^-(1 + i/30) at step i of its 30, normalised over
  the views, where s_ii measures how well view i already shows its own condition (a noise-aware CLIP there; here
  any ``alignment`` callable, e.g. ``classifier_alignment``: the digits classifier's probability of the view's class
  on the view's predicted x0 -- a STAND-IN for the noise-aware CLIP). The view that lags gets more weight. The step
  fraction i/30 is written as the run's progress 1 - t/(N - 1), which matches it on a 30-step linspace grid and does
  not depend on the solver or the step count;
- noise-variance rectification (NVR): eps = c sum_i alpha_i eps_i with c = (sum alpha_i^2 + 2 sum_{i<j} rho_ij alpha_i
  alpha_j)^-1/2, so that the combination of unit-variance noise predictions keeps unit variance. Computed in eps
  space and converted back to x0 by ``diffkit.denoiser.convert``.

Both weights and c are constants for autograd, as in the official code (numpy and ``.item()``).
Anti-segregation (the paper's third part) needs cross-attention maps of each view's concept token; the
class-conditional UNet2DModel has none, so it is left out.

On ``rho_ij``: the official estimate is mean(eps_i * eps_j) (``correlation="mean"``), which is the correlation
coefficient only if every eps_i has exactly unit mean square. Near pure noise (the cosine schedule's first step,
alpha_t = 5e-5) every view predicts eps_i ~ x_t, whose mean square differs from 1 by O(1/sqrt(d)); then c differs from
1 by about as much and x0 = (x_t - sigma c sum alpha_i eps_i) / alpha_t gains (1 - c) x_t / alpha_t, hundreds of times
the data range. DeepFloyd IF's scheduler clips x0 (dynamic thresholding), which hides this; diffkit's solvers do
not. ``correlation="cosine"`` (the default) normalises by the norms, rho_ij = <eps_i, eps_j> / (|eps_i| |eps_j|):
the same value for unit-variance predictions, and exactly c = 1 where the views agree.
"""

import dataclasses
import functools
from typing import Callable

import torch

from .denoiser import StepState, _batch_cat, convert
from .views import View, check_view, make_view


CORRELATIONS = ("cosine", "mean")


def stack_views(conds: list[dict]) -> dict:
    """One conditioning dict for a view denoiser from one dict per view: tensors concatenated view-major along the
    batch (view 0's B entries, then view 1's, ...)."""
    if not (isinstance(conds, (list, tuple)) and conds and all(isinstance(c, dict) for c in conds)):
        raise TypeError(f"conds must be a non-empty list of conditioning dicts, one per view, got {type(conds).__name__}")
    return functools.reduce(_batch_cat, conds)


def balancing_weights(alignment: torch.Tensor, progress: float) -> torch.Tensor:
    """NVB's alpha_i = s_ii^-(1 + progress) / sum_j s_jj^-(1 + progress), over the views (dim 0); s in (0, 1]."""
    log_s = alignment.clamp(min=1e-12).log()
    return torch.softmax(-(1.0 + progress) * log_s, dim=0)


def rectification_scale(eps: torch.Tensor, weights: torch.Tensor, correlation: str = "cosine") -> torch.Tensor:
    """NVR's c = (sum_i alpha_i^2 + 2 sum_{i<j} rho_ij alpha_i alpha_j)^-1/2 per sample, for eps (V, B, ...) and
    weights (V, B); rho_ij from ``correlation`` ("cosine" or the official "mean", see the module docstring)."""
    if correlation not in CORRELATIONS:
        raise ValueError(f"correlation must be one of {CORRELATIONS}, got {correlation!r}")
    flat = eps.flatten(2).double()
    if correlation == "cosine":
        flat = flat / flat.norm(dim=2, keepdim=True).clamp(min=1e-30) * flat.shape[2] ** 0.5
    rho = torch.einsum("ibd,jbd->bij", flat, flat) / flat.shape[2]  # (B, V, V)
    w = weights.double().T  # (B, V)
    off_diagonal = rho - torch.diag_embed(torch.diagonal(rho, dim1=1, dim2=2))
    variance = w.square().sum(1) + torch.einsum("bi,bij,bj->b", w, off_diagonal, w)
    return variance.clamp(min=1e-12).rsqrt()


def classifier_alignment(classifier=None) -> Callable[[torch.Tensor, dict], torch.Tensor]:
    """s_ii for NVB from the digits classifier (STAND-IN for the paper's noise-aware CLIP): the probability of each
    view's ``cond["class_labels"]`` on that view's predicted x0, clamped to [-1, 1]."""
    from .classifier import load_classifier

    def alignment(x0: torch.Tensor, cond: dict) -> torch.Tensor:
        net = load_classifier(device=str(x0.device)) if classifier is None else classifier
        if not (isinstance(cond, dict) and torch.is_tensor(cond.get("class_labels"))):
            raise ValueError("classifier alignment needs cond['class_labels'], one class per view and sample")
        logits = net(x0.clamp(-1, 1).float())
        return logits.softmax(1).gather(1, cond["class_labels"].long().view(-1, 1)).squeeze(1)

    return alignment


class AnagramDenoiser:
    """A denoiser over views with the solver's model contract (``schedule``, ``prediction_type``, ``__call__``,
    ``guided_x0``), so every solver, guidance rule and AdjointDPM run on it unchanged.

    ``cond`` / ``uncond`` hold one condition per view, stacked view-major along the batch (``stack_views``): for
    samples of batch B and V views, their tensors have batch V * B. Each view is guided on its own (the inner
    denoiser's guidance runs on the V * B viewed samples), then the views' predictions are combined:
    Geng's mean (``rectify=False, alignment=None``), + NVR (``rectify=True``), + NVB (an ``alignment``).
    """

    def __init__(
        self,
        denoiser,
        views: list[str | View],
        *,
        rectify: bool = False,
        alignment: Callable[[torch.Tensor, dict], torch.Tensor] | None = None,
        correlation: str = "cosine",
    ):
        if not (isinstance(views, (list, tuple)) and len(views) >= 1):
            raise ValueError(f"views must be a non-empty list of view names or View objects, got {views!r}")
        if correlation not in CORRELATIONS:
            raise ValueError(f"correlation must be one of {CORRELATIONS}, got {correlation!r}")
        if alignment is not None and not callable(alignment):
            raise TypeError(f"alignment must be callable (x0, cond) -> s, got {type(alignment).__name__}")
        self.denoiser, self.schedule = denoiser, denoiser.schedule
        self.prediction_type = denoiser.prediction_type
        self.views = [make_view(v) for v in views]
        self.rectify, self.alignment, self.correlation = bool(rectify), alignment, correlation
        self._checked: set[tuple] = set()

    def _check(self, x: torch.Tensor, cond, uncond) -> None:
        shape = tuple(x.shape[1:])
        if shape not in self._checked:
            for view in self.views:
                check_view(view, shape)
            self._checked.add(shape)
        expected = len(self.views) * len(x)
        for name, c in (("cond", cond), ("uncond", uncond)):
            for key, value in (c or {}).items():
                if torch.is_tensor(value) and value.ndim > 0 and len(value) != expected:
                    raise ValueError(
                        f"{name}[{key!r}] must stack one condition per view (stack_views): batch {len(self.views)} "
                        f"views x {len(x)} samples = {expected}, got {len(value)}"
                    )

    def progress(self, t) -> float:
        """1 - t / (N - 1): 0 at pure noise, 1 at clean data (NVB's exponent is 1 + progress)."""
        t = float(torch.as_tensor(t).reshape(-1)[0])
        return min(max(1.0 - t / (self.schedule.num_train_timesteps - 1), 0.0), 1.0)

    def guided_x0(self, state: StepState, cond, uncond, guidance) -> torch.Tensor:
        """The views' guided x0 predictions at P_i x_t, mapped back and combined."""
        x = state.x
        self._check(x, cond, uncond)
        viewed = torch.cat([view.apply(x) for view in self.views])
        x0 = self.denoiser.guided_x0(dataclasses.replace(state, x=viewed), cond, uncond, guidance)
        V = len(self.views)
        back = torch.stack([view.inverse(part) for view, part in zip(self.views, x0.chunk(V))])  # (V, B, C, H, W)
        with torch.no_grad():  # the official weights are numpy constants
            if self.alignment is None:
                weights = torch.full(back.shape[:2], 1.0 / V, device=x.device, dtype=torch.float64)
            else:
                s = self.alignment(x0.detach(), cond).view(V, -1)
                weights = balancing_weights(s.double(), self.progress(state.t))
        w = weights.to(back.dtype).view(*weights.shape, *([1] * (back.ndim - 2)))
        if not self.rectify:
            # weights summing to 1: averaging x0 is averaging eps exactly, without dividing by alpha
            return (w * back).sum(0)
        # in float64: going back to x0 divides by alpha, 5e-5 at the cosine schedule's first step
        eps = convert(back.double(), "sample", "epsilon", x.double(), state.alpha, state.sigma)
        with torch.no_grad():
            c = rectification_scale(eps.detach(), weights, self.correlation)
        combined = c.view(-1, *([1] * (eps.ndim - 2))) * (weights.view_as(w) * eps).sum(0)
        return convert(combined, "epsilon", "sample", x.double(), state.alpha, state.sigma).to(x.dtype)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        """The combined unguided prediction in ``prediction_type`` (what RED-Diff and other raw-output users read)."""
        t_scalar = torch.as_tensor(t, dtype=torch.float64).reshape(-1)[0].cpu()
        alpha, sigma = self.schedule.alpha(t_scalar).item(), self.schedule.sigma(t_scalar).item()
        state = StepState(0, 1, torch.as_tensor(t), alpha, sigma, x)
        x0 = self.guided_x0(state, cond, None, None)
        return convert(x0, "sample", self.prediction_type, x, alpha, sigma)
