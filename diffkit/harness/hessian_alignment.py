"""Hessian and gradient alignment for domain generalisation (Hemati et al., "Understanding Hessian Alignment for
Domain Generalization", ICCV 2023, arXiv 2308.11778; huawei-noah/Federated-Learning ``HessianAlignment/domainbed/
algorithms.py`` classes HGP and Hutchinson, ``HessianAlignment/cmnist/cmnist_HGP.py``).

The paper bounds the transfer gap between domains by how far the classifier head's gradients and Hessians differ
across training environments, and penalises both, on the head's parameters only (cheap: the head is one layer):

    L = mean_e l_e + (1/E) sum_e [ alpha ||C_e - sg(C_mean)||^2 + beta ||g_e - sg(g_mean)||^2 ],

with g_e = grad_head l_e, sg the stop-gradient, and the Hessian information C_e either

- HGP: the Hessian-gradient product H_e g_e, computed without forming H_e from the identity
  H g = ||g|| grad ||g|| (grad ||g|| = H g / ||g||), i.e. two extra backward passes; or
- Hutchinson: the Hessian diagonal, estimated as mean_k z_k * (H_e z_k) over Rademacher probes z_k.

The "mean" terms come from the mean of the environment losses.
"""

import torch
from torch import nn


def flat_grad(output: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """The gradient of a scalar ``output`` w.r.t. ``params``, flattened, with its graph kept (it is differentiated
    again, by the Hessian terms and by the penalty's backward pass)."""
    return torch.cat([g.flatten() for g in torch.autograd.grad(output, params, create_graph=True)])


def hessian_gradient_product(loss: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, H g) for g = grad loss, by the identity H g = ||g|| grad ||g|| (Hemati et al. 2023, Sec. 4.2)."""
    g = flat_grad(loss, params)
    # the tiny offset keeps grad ||g|| finite at g = 0; it multiplies back out exactly, so H g is unbiased
    norm = (g.square().sum() + 1e-30).sqrt()
    return g, norm * flat_grad(norm, params)


def rademacher_probes(count: int, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(count, size) independent +-1 entries."""
    if not (isinstance(count, int) and count > 0):
        raise ValueError(f"probes must be a positive int, got {count!r}")
    return torch.randint(0, 2, (count, size), generator=generator).float() * 2 - 1


def hutchinson_diagonal(g: torch.Tensor, params: list[torch.Tensor], probes: torch.Tensor) -> torch.Tensor:
    """Hutchinson's estimate of diag(H) for the gradient g (with its graph) of a loss w.r.t. ``params``:
    mean_k z_k * (H z_k), H z = grad <g, z> (Bekas, Kokiopoulou & Saad 2007; the reference's calc_hessian_diag)."""
    if probes.dim() != 2 or probes.shape[1] != g.numel():
        raise ValueError(f"probes must be (count, {g.numel()}), got {tuple(probes.shape)}")
    probes = probes.to(g)
    return torch.stack([z * flat_grad(g @ z, params) for z in probes]).mean(0)


def alignment_penalty(env_losses: list[torch.Tensor], params: list[torch.Tensor], alpha: float, beta: float,
                      curvature) -> torch.Tensor:
    """(1/E) sum_e alpha ||C_e - sg(C_mean)||^2 + beta ||g_e - sg(g_mean)||^2, where ``curvature(loss)`` returns
    (g, C) and the mean terms come from the mean of the environment losses."""
    if not env_losses:
        raise ValueError("env_losses must hold at least one environment's loss")
    mean_g, mean_c = curvature(torch.stack(env_losses).mean())
    mean_g, mean_c = mean_g.detach(), mean_c.detach()
    terms = []
    for loss in env_losses:
        g, c = curvature(loss)
        terms.append(alpha * (c - mean_c).square().sum() + beta * (g - mean_g).square().sum())
    return torch.stack(terms).mean()


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(featuriser, linear head) of an ``nn.Sequential`` that ends in a Linear layer (the harness MLP)."""
    if not (isinstance(model, nn.Sequential) and len(model) > 1 and isinstance(model[-1], nn.Linear)):
        raise TypeError(f"the model must be an nn.Sequential ending in an nn.Linear head, got {type(model).__name__}")
    return model[:-1], model[-1]


class HessianAlignment:
    """Training algorithm: the mean of the per-environment losses plus the alignment penalty on the head
    (Hemati et al. 2023). ``estimator`` "hgp" aligns Hessian-gradient products, "hutchinson" Hessian diagonals from
    ``probes`` Rademacher probes. Batches must carry an ``env`` key.

    ``penalty_weight`` / ``anneal_steps`` follow the ColoredMNIST script (the IRM template): the penalty enters with
    weight 1 for the first ``anneal_steps`` steps, then with ``penalty_weight``, the whole loss divided by it to keep
    the step size. Hutchinson draws one probe set per step for all environments and the mean (common random numbers,
    so that differences between environments are not probe noise; the reference draws fresh probes per call).
    """

    def __init__(self, estimator: str = "hgp", alpha: float = 1e-4, beta: float = 5e-3, probes: int = 300,
                 penalty_weight: float = 1.0, anneal_steps: int = 0):
        if estimator not in ("hgp", "hutchinson"):
            raise ValueError(f"estimator must be 'hgp' or 'hutchinson', got {estimator!r}")
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not (isinstance(penalty_weight, (int, float)) and penalty_weight >= 1):
            raise ValueError(f"penalty_weight must be a number >= 1, got {penalty_weight!r}")
        if not (isinstance(anneal_steps, int) and anneal_steps >= 0):
            raise ValueError(f"anneal_steps must be an int >= 0, got {anneal_steps!r}")
        rademacher_probes(probes, 1)  # validates probes
        self.estimator, self.alpha, self.beta, self.probes = estimator, float(alpha), float(beta), probes
        self.penalty_weight, self.anneal_steps = float(penalty_weight), anneal_steps

    def __call__(self, state, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if "env" not in batch:
            raise ValueError("HessianAlignment needs batches with an 'env' key (a data method such as "
                             "colored_environments adds it)")
        if state.accelerator.num_processes > 1:
            raise ValueError("HessianAlignment runs in one process: its per-environment double backward on the head "
                             "is not synchronised by DDP")
        featuriser, head = split_head(state.unwrapped_model)
        logits = head(featuriser(batch["x"]))
        params = list(head.parameters())
        env_losses = [state.criterion(logits[m], batch["y"][m], batch["index"][m])
                      for m in (batch["env"] == e for e in batch["env"].unique())]
        if self.estimator == "hgp":
            def curvature(loss):
                return hessian_gradient_product(loss, params)
        else:
            probes = rademacher_probes(self.probes, sum(p.numel() for p in params))

            def curvature(loss):
                g = flat_grad(loss, params)
                return g, hutchinson_diagonal(g, params, probes)

        penalty = alignment_penalty(env_losses, params, self.alpha, self.beta, curvature)
        weight = self.penalty_weight if state.step >= self.anneal_steps else 1.0
        state.logs["alignment_penalty"] = penalty.item()
        loss = torch.stack(env_losses).mean() + weight * penalty
        return loss / weight, logits


def downsample(data, seed: int, factor: int = 2):
    """Every ``factor``-th pixel of an image data set in both directions, as the ColoredMNIST scripts shrink MNIST to
    14 x 14 (``images.reshape((-1, 28, 28))[:, ::2, ::2]``); labels and extras unchanged."""
    from .data import HarnessData

    if data.image_shape is None:
        raise ValueError("downsample needs an image data set (digits or mnist5k)")
    if isinstance(factor, bool) or not (isinstance(factor, int) and factor >= 1):
        raise ValueError(f"factor must be an int >= 1, got {factor!r}")
    c, h, w = data.image_shape

    def shrink(x):
        return x.view(-1, c, h, w)[..., ::factor, ::factor].flatten(1)

    return HarnessData(shrink(data.x_train), data.y_train, shrink(data.x_test), data.y_test, data.num_classes,
                       dict(data.train_extra), dict(data.test_extra), (c, -(-h // factor), -(-w // factor)))
