"""ScoreDVI (Cheng, Liu & Tan, "Score Priors Guided Deep Variational Inference for Unsupervised Real-World Single
Image Denoising", ICCV 2023; alwaysuu/ScoreDVI ``ScoreDVI.py``), a deep-image-prior baseline, and the noise they
are measured on.

Per noisy image y, four small networks of y are fitted (nothing is learned across images): a UNet gives a K-component
mixture of non-i.i.d. Gaussians N(mu_k, sigma_k^2) for the clean image, DnCNNs give Gamma posteriors (alpha, beta) of
each component's noise precision, the responsibilities pi and their Dirichlet parameters. The loss (the paper's Eq. 11)
is the expected Gaussian likelihood of y (Eq. 12), KL terms for the Gamma (Eq. 14), categorical (Eq. 15) and Dirichlet
(Eq. 16) posteriors, and lambda times the image prior term (Eq. 13), sum_k pi_k (-1/2 log sigma_k^2 - E_q log p(z)),
whose gradient comes from Tweedie's formula: a custom autograd function passes z = mu_k + sigma_k n forward and
(D_k(z) - z) / sigma_k^2 backward, D_k a blind Gaussian denoiser (the score of p smoothed at noise sigma_k). The
estimate is an EMA (0.9) of sum_k pi_k mu_k over the iterations. lambda follows the official noise rule: lambda if
the estimated noise std is <= 10/255, 1 up to 25/255, 1/lambda above (lambda = 0 switches the prior off).

Official settings (``ScoreDVI.py``): K = 3, lambda = 0.5, alpha_0 = 1, beta_0 = 0.01 / 0.005 / 0.02 (CC / PolyU /
SIDD), Adam 1e-3, 400 iterations, EMA 0.9, 5 Monte-Carlo samples, a second run when the mean sigma exceeds 0.05.
Here, for 16 x 16 grey patches on a CPU: the UNet has 2 levels of 16 and 32 channels (official 4 levels from 64), the
DnCNNs 5 layers of 16 channels (official 32), the prior denoisers are K bias-free DnCNNs of 6 layers x 16 channels
(official 20 x 64) trained blind on clean training patches over noise ranges up to 15, 30 and 55 / 255 (the official
checkpoints' ranges are not in the code: a stand-in), and the noise
level for the lambda rule is Immerkaer's estimator after a pixel-shuffle by 2 (the official one is Liu et al.'s on a
pixel-shuffle by 4, which a 16 x 16 patch is too small for).

All images are fitted at once, each with its own networks: every layer is a grouped convolution with one group per
image (and batch norm over one image's channels), which is exactly N independent runs computed together.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def _positive(name: str, value, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value >= 0 if allow_zero else value > 0)):
        raise ValueError(f"{name} must be a number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def _count(name: str, value, low: int = 1) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _images(name: str, value) -> torch.Tensor:
    if not (isinstance(value, torch.Tensor) and value.dim() == 4 and value.numel() > 0):
        raise ValueError(f"{name} must be an (N, C, H, W) tensor, got {tuple(getattr(value, 'shape', ()))}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or inf")
    return value


# -- the noise ------------------------------------------------------------------------------------------------------


def box_blur(x: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over the size x size block starting at each pixel, circular (every pixel gets the same noise variance)."""
    out = torch.zeros_like(x)
    for i in range(size):
        for j in range(size):
            out = out + torch.roll(x, (-i, -j), dims=(-2, -1))
    return out / size**2


def box_blur_transpose(x: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros_like(x)
    for i in range(size):
        for j in range(size):
            out = out + torch.roll(x, (i, j), dims=(-2, -1))
    return out / size**2


class PoissonGaussianBlurNoise:
    """Signal-dependent, spatially correlated noise: Poisson-Gaussian noise n = gain P(x / gain) - x + sigma g, then
    blurred by a ``blur`` x ``blur`` box, y = x + B n (the correlation a demosaicing or denoising camera pipeline
    leaves; the clean image itself is not blurred). Per pixel, Var(y | x) = mean over the box of (gain x + sigma^2)
    / blur^2."""

    def __init__(self, gain: float = 0.05, sigma: float = 0.08, blur: int = 2):
        self.gain, self.sigma = _positive("gain", gain), _positive("sigma", sigma, allow_zero=True)
        self.blur = _count("blur", blur)

    def sample(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        x = _images("x", x)
        g = torch.Generator().manual_seed(seed)
        counts = torch.poisson(x.clamp(min=0).double().cpu() / self.gain, generator=g)
        noise = counts * self.gain - x.double().cpu() + self.sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)
        return x + box_blur(noise, self.blur).to(x.dtype).to(x.device)

    def tweedie(self, y: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """A Gaussian approximation of the noise for Noise2Score: x_hat = y + B D B^T s(y), D = diag(gain y + sigma^2)
        with y for the unknown x (Tweedie's formula for correlated Gaussian noise of covariance B D B^T; this noise
        is no exponential family, so Noise2Score has no exact formula here)."""
        y, score = _images("y", y), _images("score", score)
        variance = self.gain * y.clamp(min=0) + self.sigma**2
        return y + box_blur(variance * box_blur_transpose(score, self.blur), self.blur)


def estimate_noise_std(y: torch.Tensor, shuffle: int = 2) -> torch.Tensor:
    """Per-image noise std: Immerkaer's estimator (1996), sqrt(pi / 2) / 6 mean |y * L| with L the 3 x 3 mask
    [[1, -2, 1], [-2, 4, -2], [1, -2, 1]], on the sub-images of a pixel-shuffle by ``shuffle`` (which breaks the
    spatial correlation of the noise, as the official code's pixel-shuffle does)."""
    y = _images("y", y)
    n, c, h, w = y.shape
    if h % shuffle or w % shuffle or h // shuffle < 3 or w // shuffle < 3:
        raise ValueError(f"estimate_noise_std needs sides divisible by {shuffle} into at least 3 pixels, got {h} x {w}")
    subs = F.pixel_unshuffle(y, shuffle).reshape(n * c * shuffle**2, 1, h // shuffle, w // shuffle)
    mask = torch.tensor([[1.0, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=y.dtype, device=y.device).view(1, 1, 3, 3)
    response = F.conv2d(subs, mask).reshape(n, -1).abs().mean(1)
    return math.sqrt(math.pi / 2) / 6 * response


def prior_weight(lam: float, noise_std: torch.Tensor) -> torch.Tensor:
    """The official noise-aware lambda: lam where the std (on [0, 1]) is <= 10 / 255, 1 up to 25 / 255, 1 / lam
    above (``int(sqrt(var) * 255)`` thresholds, as ``ScoreDVI.py``); lam = 0 turns the prior off everywhere."""
    if lam == 0:
        return torch.zeros_like(noise_std)
    level = (noise_std * 255).floor()
    return torch.where(level <= 10, torch.full_like(level, lam), torch.where(level <= 25, torch.ones_like(level),
                                                                               torch.full_like(level, 1 / lam)))


# -- the score prior --------------------------------------------------------------------------------------------------


class _Tweedie(torch.autograd.Function):
    """z forward; grad * (D(z) - z) / sigma^2 backward (the official ``ScoreFunction``)."""

    @staticmethod
    def forward(ctx, z, denoised, variance):
        ctx.save_for_backward(z, denoised, variance)
        return z.clone()

    @staticmethod
    def backward(ctx, grad):
        z, denoised, variance = ctx.saved_tensors
        return grad * (denoised - z) / variance, None, None


def prior_term(mu: torch.Tensor, log_var: torch.Tensor, pi: torch.Tensor, denoise, mc_samples: int = 5,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. 13 per image: mean over pixels of sum_k pi_k (-1/2 log sigma_k^2 - mean over samples of E[log p(z)]),
    z = mu_k + sigma_k n, where log p's gradient is (D_k(z) - z) / sigma_k^2. ``mu``, ``log_var``, ``pi``:
    (N, K, C, H, W); ``denoise(z, k)`` is D_k on (M, C, H, W). Returns (N,)."""
    var = log_var.exp()
    noise = torch.randn((mc_samples, *mu.shape), generator=generator, dtype=mu.dtype).to(mu.device)
    z = mu + var.sqrt() * noise  # (M, N, K, C, H, W)
    scored = []
    for k in range(mu.shape[1]):
        zk = z[:, :, k]
        with torch.no_grad():
            denoised = denoise(zk.reshape(-1, *zk.shape[2:]), k).reshape(zk.shape)
        scored.append(_Tweedie.apply(zk, denoised, var[:, k].detach().expand_as(zk)))
    log_p = torch.stack(scored, 2).mean(0)  # its value is z's; only its gradient means log p
    return ((-0.5 * log_var - log_p) * pi).sum(1).flatten(1).mean(1)


# -- the networks: one per image, computed together ---------------------------------------------------------------------


class _Grouped(nn.Module):
    """Runs a network of grouped convolutions on (N, C, H, W) as N independent networks (one group per image)."""

    def __init__(self, images: int):
        super().__init__()
        self.images = images

    def to_groups(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, -1, *x.shape[-2:])

    def from_groups(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.images, -1, *x.shape[-2:])


def _conv(images: int, c_in: int, c_out: int, kernel: int = 3, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(images * c_in, images * c_out, kernel, padding=kernel // 2, groups=images, bias=bias)


class GroupedDnCNN(_Grouped):
    """The official DnCNN(in, out, nc, nb) with act_mode "BR": conv + ReLU, (nb - 2) x (conv + batch norm + ReLU),
    conv; one per image."""

    def __init__(self, images: int, c_in: int, c_out: int, width: int = 32, depth: int = 5):
        super().__init__(images)
        layers = [_conv(images, c_in, width), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [_conv(images, width, width), nn.BatchNorm2d(images * width), nn.ReLU()]
        layers.append(_conv(images, width, c_out))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.from_groups(self.body(self.to_groups(x)))


class GroupedUNet(_Grouped):
    """The official UNet_New (double conv + batch norm + ReLU blocks, max-pool down, bilinear up, skips), two levels
    of ``width`` and 2 ``width`` channels; one per image."""

    def __init__(self, images: int, c_in: int, c_out: int, width: int = 32):
        super().__init__(images)

        def double(a, b):
            return nn.Sequential(_conv(images, a, b), nn.BatchNorm2d(images * b), nn.ReLU(),
                                 _conv(images, b, b), nn.BatchNorm2d(images * b), nn.ReLU())

        self.inc, self.down1, self.down2 = double(c_in, width), double(width, 2 * width), double(2 * width, 2 * width)
        self.up1, self.up2 = double(4 * width, width), double(2 * width, width)
        self.out = _conv(images, width, c_out, kernel=1)

    def _up_cat(self, skip, x):
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.to_groups(torch.cat([self.from_groups(skip), self.from_groups(x)], 1))  # per image [skip, up]

    def forward(self, x):
        e1 = self.inc(self.to_groups(x))
        e2 = self.down1(F.max_pool2d(e1, 2))
        bottom = self.down2(F.max_pool2d(e2, 2))
        u = self.up1(self._up_cat(e2, bottom))
        return self.from_groups(self.out(self.up2(self._up_cat(e1, u))))


# -- the blind denoisers of the prior -------------------------------------------------------------------------------


class _BiasFreeNorm(nn.Module):
    """The official BF_DNCNN's batch norm without mean subtraction: x / sd (batch sd in training, a running one in
    evaluation) * gamma."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("running_sd", torch.ones(1, channels, 1, 1))
        self.gamma = nn.Parameter((torch.randn(1, channels, 1, 1) * (2.0 / 9.0 / 64.0)).clamp(-0.025, 0.025))

    def forward(self, x):
        if self.training:
            sd = torch.sqrt(x.var(dim=(0, 2, 3), keepdim=True, unbiased=False) + 1e-5)
            with torch.no_grad():
                self.running_sd.lerp_(sd, 0.1)
        else:
            sd = self.running_sd
        return x / sd * self.gamma


class BiasFreeDnCNN(nn.Module):
    """A blind Gaussian denoiser in the style of the official BF_DNCNN (Mohan et al., ICLR 2020): bias-free
    convolutions and norms, so it is homogeneous in its input; returns x minus the predicted noise."""

    def __init__(self, channels: int = 1, width: int = 16, depth: int = 6):
        super().__init__()
        layers = [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), _BiasFreeNorm(width), nn.ReLU()]
        layers.append(nn.Conv2d(width, channels, 3, padding=1, bias=False))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return x - self.body(x)


class DenoiserBank(nn.Module):
    """K blind denoisers for ScoreDVI's K components, denoiser k trained on noise std uniform in [0, sigma_max[k]]
    (the training split's clean images, ``prior_loss``)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, sigma_max=(15 / 255, 30 / 255, 55 / 255),
                 width: int = 16, depth: int = 6):
        super().__init__()
        if in_channels != out_channels:
            raise ValueError(f"a denoiser maps images to images: in_channels {in_channels} != out_channels {out_channels}")
        if not (isinstance(sigma_max, (list, tuple)) and sigma_max):
            raise ValueError(f"sigma_max must be a non-empty list of noise levels, one per denoiser, got {sigma_max!r}")
        self.sigma_max = [_positive("sigma_max", s) for s in sigma_max]
        self.denoisers = nn.ModuleList(BiasFreeDnCNN(in_channels, _count("width", width), _count("depth", depth, 3))
                                       for _ in sigma_max)

    def forward(self, x: torch.Tensor, k: int = 0) -> torch.Tensor:
        return self.denoisers[k](x)


def prior_loss(model, sigma_max: list[float], clean: torch.Tensor) -> torch.Tensor:
    """Blind training of the bank: the sum over its denoisers of the MSE of denoising clean + sigma n, with sigma ~
    U(0, sigma_max[k]) per image. ``model(x, k)`` is the (possibly DDP-wrapped) bank."""
    loss = 0.0
    for k, top in enumerate(sigma_max):
        sigma = torch.rand(len(clean), 1, 1, 1, device=clean.device) * top
        loss = loss + F.mse_loss(model(clean + sigma * torch.randn_like(clean), k), clean)
    return loss


# -- the variational inference --------------------------------------------------------------------------------------


LOG_MIN, LOG_MAX = math.log(1e-8), math.log(1e4)


def score_dvi(y: torch.Tensor, denoise=None, *, components: int = 3, lam: float = 0.5, noise_rule: bool = True,
              alpha0: float = 1.0, beta0: float = 0.005, lr: float = 1e-3, iterations: int = 400, ema: float = 0.9,
              mc_samples: int = 5, width: int = 16, generator: torch.Generator | None = None) -> dict:
    """ScoreDVI on each image of ``y`` (N, C, H, W) with its own networks; ``denoise(z, k)`` is the k-th blind
    denoiser (needed unless ``lam`` = 0). Returns {"estimate": the EMA of sum_k pi_k mu_k, "mu": the last mixture mean,
    "sigma_mean": each image's mean sigma_k, "lam": each image's prior weight}."""
    y = _images("y", y)
    check_score_dvi(components, lam, alpha0, beta0, lr, iterations, ema, mc_samples, width)
    if lam > 0 and denoise is None:
        raise ValueError("lam > 0 needs the prior's denoisers (denoise(z, k))")
    n, c, h, w = y.shape
    if h % 4 or w % 4:
        raise ValueError(f"the UNet pools twice: image sides must be multiples of 4, got {h} x {w}")
    with torch.enable_grad():  # an optimisation, also when called under no_grad
        return _score_dvi(y, denoise, components, lam, noise_rule, alpha0, beta0, lr, iterations, ema, mc_samples,
                          width, generator)


def check_score_dvi(components, lam, alpha0, beta0, lr, iterations, ema, mc_samples, width) -> None:
    _count("components", components), _count("iterations", iterations), _count("mc_samples", mc_samples)
    _count("width", width)
    _positive("lam", lam, allow_zero=True), _positive("alpha0", alpha0), _positive("beta0", beta0), _positive("lr", lr)
    if not (isinstance(ema, (int, float)) and 0 <= ema < 1):
        raise ValueError(f"ema must be in [0, 1), got {ema!r}")


def _score_dvi(y, denoise, components, lam, noise_rule, alpha0, beta0, lr, iterations, ema, mc_samples, width,
               generator) -> dict:
    n, c, h, w = y.shape
    K = components
    weight = prior_weight(lam, estimate_noise_std(y)) if noise_rule else torch.full((n,), lam, device=y.device)
    x_net = GroupedUNet(n, c, 2 * K * c, width).to(y.device)  # mu_k, log sigma_k^2
    phi_net = GroupedDnCNN(n, c, 2 * K * c, width).to(y.device)  # log alpha_k, log beta_k
    z_net = GroupedDnCNN(n, c, K * c, width).to(y.device)  # responsibilities pi_k (softmax over k)
    omg_net = GroupedDnCNN(n, c, K * c, width).to(y.device)  # their Dirichlet parameters
    params = [p for net in (x_net, phi_net, z_net, omg_net) for p in net.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    d0 = torch.ones(1, K, 1, 1, 1, device=y.device, dtype=y.dtype)
    estimate = y.clone()
    for _ in range(iterations):
        pi = z_net(y).reshape(n, K, c, h, w).softmax(1)
        d = omg_net(y).clamp(LOG_MIN, LOG_MAX).exp().reshape(n, K, c, h, w)
        digamma_diff = torch.digamma(d) - torch.digamma(d.sum(1, keepdim=True))
        kl_pi = (pi * ((pi + 1e-8).log() - digamma_diff)).sum(1).flatten(1).mean(1)  # Eq. 15
        log_norm = torch.lgamma(d.sum(1)) - torch.lgamma(d).sum(1)  # Eq. 16
        log_norm0 = torch.lgamma(d0.sum(1)) - torch.lgamma(d0).sum(1)
        kl_dirichlet = (log_norm - log_norm0).flatten(1).mean(1) + ((d - d0) * digamma_diff).sum(1).flatten(1).mean(1)
        log_alpha, log_beta = phi_net(y).clamp(LOG_MIN, LOG_MAX).reshape(n, K, 2 * c, h, w).split(c, dim=2)
        alpha, beta = log_alpha.exp(), log_beta.exp()
        kl_gamma = (((alpha - alpha0) * torch.digamma(alpha) + math.lgamma(alpha0) - torch.lgamma(alpha)
                     + alpha0 * (log_beta - math.log(beta0)) + beta0 * (log_alpha - log_beta).exp() - alpha) * pi
                    ).sum(1).flatten(1).mean(1)  # Eq. 14
        mu, log_var = x_net(y).reshape(n, K, 2 * c, h, w).split(c, dim=2)
        log_var = log_var.clamp(LOG_MIN, LOG_MAX)
        likelihood = -(((torch.digamma(alpha) - log_beta) * 0.5 - 0.5 * ((mu - y[:, None]).square() + log_var.exp())
                        * alpha / beta) * pi).sum(1).flatten(1).mean(1)  # Eq. 12
        loss = likelihood + kl_gamma + kl_pi + kl_dirichlet
        if lam > 0:
            loss = loss + weight * prior_term(mu, log_var, pi, denoise, mc_samples, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # each image's loss reaches only its own networks
        optimizer.step()
        with torch.no_grad():
            mean = (mu * pi).sum(1)  # Eq. 18
            estimate = estimate * ema + mean.detach() * (1 - ema)
    sigma_mean = log_var.detach().exp().sqrt().flatten(1).mean(1)
    return {"estimate": estimate.detach(), "mu": mean.detach(), "sigma_mean": sigma_mean, "lam": weight}


def deep_image_prior(y: torch.Tensor, *, iterations: int = 400, lr: float = 1e-3, ema: float = 0.9, width: int = 16,
                     input_scale: float = 0.1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Deep image prior (Ulyanov, Vedaldi & Lempitsky, CVPR 2018) with ScoreDVI's UNet: fit UNet(z) to each noisy
    image by MSE from a fixed random input z ~ U(0, ``input_scale``), Adam, and return the EMA of the outputs."""
    y = _images("y", y)
    iterations = _count("iterations", iterations)
    n, c, h, w = y.shape
    if h % 4 or w % 4:
        raise ValueError(f"the UNet pools twice: image sides must be multiples of 4, got {h} x {w}")
    with torch.enable_grad():
        return _deep_image_prior(y, iterations, lr, ema, width, input_scale, generator)


def _deep_image_prior(y, iterations, lr, ema, width, input_scale, generator) -> torch.Tensor:
    n, c, h, w = y.shape
    net = GroupedUNet(n, c, c, width).to(y.device)
    z = (torch.rand(y.shape, generator=generator, dtype=y.dtype) * input_scale).to(y.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    estimate = y.clone()
    for _ in range(iterations):
        out = net(z)
        loss = (out - y).square().flatten(1).mean(1).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        estimate = estimate * ema + out.detach() * (1 - ema)
    return estimate


# -- harness algorithms ---------------------------------------------------------------------------------------------


class _PerImage:
    """The training phase of a per-image method in the denoise task: fit the blind denoisers of the score prior on
    the clean training images (the external clean data the paper's prior is trained on). Only ScoreDVI's prior term
    reads them."""

    def __call__(self, state, batch: dict):
        if not isinstance(state.unwrapped_model, DenoiserBank):
            raise ValueError("a per-image denoising method trains a denoiser_bank model, got "
                             f"{type(state.unwrapped_model).__name__}")
        return prior_loss(state.model, state.unwrapped_model.sigma_max, batch["y"]), None


class ScoreDVI(_PerImage):
    """Training: the prior's blind denoisers. ``estimate``: ``score_dvi`` on every noisy image (a second run for the
    images whose mean sigma exceeds ``rerun_sigma``, as the official code)."""

    def __init__(self, components: int = 3, lam: float = 0.5, noise_rule: bool = True, alpha0: float = 1.0,
                 beta0: float = 0.005, lr: float = 1e-3, iterations: int = 400, ema: float = 0.9, mc_samples: int = 5,
                 width: int = 16, rerun_sigma: float = 0.05):
        self.options = {"components": components, "lam": lam, "noise_rule": noise_rule, "alpha0": alpha0,
                        "beta0": beta0, "lr": lr, "iterations": iterations, "ema": ema, "mc_samples": mc_samples,
                        "width": width}
        check_score_dvi(components, lam, alpha0, beta0, lr, iterations, ema, mc_samples, width)
        self.rerun_sigma = _positive("rerun_sigma", rerun_sigma)

    def estimate(self, model: DenoiserBank, y: torch.Tensor, noise) -> torch.Tensor:
        model.eval().requires_grad_(False)
        if self.options["components"] > len(model.denoisers):
            raise ValueError(f"ScoreDVI with {self.options['components']} components needs as many prior denoisers; the "
                             f"denoiser_bank has {len(model.denoisers)}")
        out = score_dvi(y, model, **self.options)
        again = out["sigma_mean"] > self.rerun_sigma
        estimate = out["estimate"].clone()
        if again.any():
            estimate[again] = score_dvi(y[again], model, **self.options)["estimate"]
        return estimate


class DeepImagePrior(_PerImage):
    """The deep-image-prior baseline with ScoreDVI's UNet (``deep_image_prior``)."""

    def __init__(self, iterations: int = 400, lr: float = 1e-3, ema: float = 0.9, width: int = 16):
        _count("iterations", iterations), _positive("lr", lr), _count("width", width)
        if not (isinstance(ema, (int, float)) and 0 <= ema < 1):
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        self.options = {"iterations": iterations, "lr": lr, "ema": ema, "width": width}

    def estimate(self, model, y: torch.Tensor, noise) -> torch.Tensor:
        return deep_image_prior(y, **self.options)
