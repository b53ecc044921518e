"""Forward models y = A(x) + sigma_y n on image batches (B, C, H, W) in [-1, 1].

The solvers need only ``forward(x)``, differentiable in x: any object with one is an operator (a user-defined
forward model included). They use what else it has: ``pinv(y)``, a right inverse (A(pinv(y)) = y), for
initialisation and PiGDM; ``linear`` and ``adjoint(y)``, A^T; ``input_shape(y_shape)`` / ``output_shape(x_shape)``;
``sigma_y``. Without a ``pinv`` a linear operator falls back to its adjoint and a nonlinear one to zeros
(``initial_estimate``). Subclassing ``Operator`` provides all of them: a linear subclass that defines only
``forward`` gets its exact adjoint from autograd.

Blur is circular, so it is diagonal in Fourier space: its adjoint and its Tikhonov inverse are exact. Every
adjoint here satisfies <A x, y> = <x, A^T y> to float64 rounding (tests/test_inverse_operators.py).
"""

import math

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor


def _hw(size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {size!r}")
    return int(h), int(w)


def _image_shape(shape) -> tuple[int, ...]:
    shape = tuple(int(n) for n in shape)
    if len(shape) != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {shape}")
    return shape


def _conjugate_gradient(apply, b: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Solve apply(z) = b for a symmetric positive definite ``apply`` (Hestenes & Stiefel 1952)."""
    z = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = r.square().sum()
    stop = tol**2 * rr
    for _ in range(max_iter):
        if rr <= stop:
            break
        q = apply(p)
        step = rr / (p * q).sum()
        z, r = z + step * p, r - step * q
        rr, rr_old = r.square().sum(), rr
        p = r + (rr / rr_old) * p
    return z


class Operator:
    """A forward model: ``forward`` is A, ``measure`` adds N(0, sigma_y^2) noise, ``then`` composes."""

    linear = False

    def __init__(self, sigma_y: float = 0.0):
        if not (isinstance(sigma_y, (int, float)) and math.isfinite(sigma_y) and sigma_y >= 0):
            raise ValueError(f"sigma_y must be a finite number >= 0, got {sigma_y!r}")
        self.sigma_y = float(sigma_y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define forward(x)")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """A^T y: the vector-Jacobian product of forward, exact for a linear map (at any point, here 0)."""
        if not self.linear:
            raise TypeError(f"{type(self).__name__} is nonlinear: it has no adjoint")
        with torch.enable_grad():
            x = torch.zeros(self.input_shape(y.shape), device=y.device, dtype=y.dtype, requires_grad=True)
            return torch.autograd.grad(self.forward(x), x, y)[0]

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """A crude inverse where no better one is defined: A^T y if linear, else zeros of the image shape."""
        if self.linear:
            return self.adjoint(y)
        return torch.zeros(self.input_shape(y.shape), device=y.device, dtype=y.dtype)

    def measure(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        """y = A(x) + sigma_y n, n ~ N(0, I)."""
        y = self.forward(x)
        if self.sigma_y == 0:
            return y
        return y + self.sigma_y * randn_tensor(y.shape, generator=generator, device=y.device, dtype=y.dtype)

    def output_shape(self, input_shape) -> tuple[int, ...]:
        return _image_shape(input_shape)

    def input_shape(self, output_shape) -> tuple[int, ...]:
        return _image_shape(output_shape)

    def check_measurement(self, y: torch.Tensor, image_shape) -> None:
        """Raise ValueError unless y has the shape ``forward`` gives images of ``image_shape``."""
        check_measurement(self, y, image_shape)

    def then(self, other) -> "Compose":
        """This operator followed by ``other``: x -> other(self(x))."""
        return Compose(self, other)

    @classmethod
    def from_deepinv(cls, physics, sigma_y: float | None = None) -> "Operator":
        """A deepinv ``Physics`` as an operator on [-1, 1] images: x -> physics.A((x + 1) / 2), noise-free, with
        ``pinv`` from its ``A_dagger`` and the adjoint of its linear part (``DeepinvOperator``)."""
        return DeepinvOperator(physics, sigma_y)


def check_measurement(operator, y: torch.Tensor, image_shape) -> None:
    """Raise ValueError unless y is a finite tensor of the shape ``operator`` maps ``image_shape`` to.

    Operators without ``output_shape`` are run once on zeros to find it.
    """
    if not torch.is_tensor(y):
        raise TypeError(f"y must be a tensor, got {type(y).__name__}")
    if not torch.isfinite(y).all():
        raise ValueError("y (the measurement) contains NaN or inf")
    image_shape = tuple(int(n) for n in image_shape)
    if hasattr(operator, "output_shape"):
        expected = tuple(operator.output_shape(image_shape))
    else:
        with torch.no_grad():
            expected = tuple(operator.forward(torch.zeros(image_shape, device=y.device, dtype=y.dtype)).shape)
    if tuple(y.shape) != expected:
        raise ValueError(
            f"y has shape {tuple(y.shape)}, but {type(operator).__name__} maps images of shape {image_shape} "
            f"to measurements of shape {expected}"
        )


def initial_estimate(operator, y: torch.Tensor) -> torch.Tensor:
    """pinv(y) if the operator has one, else A^T y for a linear one, else zeros of ``input_shape(y.shape)``."""
    if hasattr(operator, "pinv"):
        return operator.pinv(y)
    if getattr(operator, "linear", False) and hasattr(operator, "adjoint"):
        return operator.adjoint(y)
    if hasattr(operator, "input_shape"):
        return torch.zeros(operator.input_shape(y.shape), device=y.device, dtype=y.dtype)
    raise ValueError(
        f"{type(operator).__name__} has no pinv, adjoint or input_shape: pass the initial image (or noise) explicitly"
    )


# -- masks ------------------------------------------------------------------------------------------


def box_mask(size, box: float = 0.5) -> torch.Tensor:
    """(1, 1, H, W) mask, 1 = observed, with a centred hole spanning ``box`` of each side."""
    h, w = _hw(size)
    if not 0 < box < 1:
        raise ValueError(f"box must lie in (0, 1), got {box!r}")
    bh, bw = max(1, round(box * h)), max(1, round(box * w))
    top, left = (h - bh) // 2, (w - bw) // 2
    mask = torch.ones(1, 1, h, w)
    mask[..., top : top + bh, left : left + bw] = 0
    return mask


def random_mask(size, fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """(1, 1, H, W) mask with exactly round(fraction * H * W) pixels missing, chosen uniformly by ``seed``."""
    h, w = _hw(size)
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction (of missing pixels) must lie in [0, 1), got {fraction!r}")
    missing = torch.randperm(h * w, generator=torch.Generator().manual_seed(seed))[: round(fraction * h * w)]
    mask = torch.ones(h * w)
    mask[missing] = 0
    return mask.reshape(1, 1, h, w)


def stroke_mask(size, seed: int = 0, num_strokes: int = 4, max_vertices: int = 5) -> torch.Tensor:
    """(1, 1, H, W) free-form mask: random brush strokes, polylines of random width (Yu et al. 2019, Algorithm 1)."""
    h, w = _hw(size)
    g = torch.Generator().manual_seed(seed)
    scale = max(h, w)
    grid = torch.stack(torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij"), -1).reshape(-1, 2)
    hole = torch.zeros(h * w, dtype=torch.bool)
    for _ in range(num_strokes):
        n = int(torch.randint(2, max_vertices + 1, (1,), generator=g))
        radius = scale * (0.03 + 0.05 * torch.rand((), generator=g))
        # a random walk of vertices: each segment 10-30% of the image size in a random direction
        angles = 2 * math.pi * torch.rand(n - 1, generator=g)
        lengths = scale * (0.1 + 0.2 * torch.rand(n - 1, generator=g))
        start = torch.rand(2, generator=g) * torch.tensor([h, w])
        steps = torch.stack([lengths * angles.sin(), lengths * angles.cos()], -1)
        vertices = torch.cat([start[None], start + steps.cumsum(0)])
        for a, b in zip(vertices[:-1], vertices[1:]):
            # distance from every pixel centre to the segment ab
            ab = b - a
            t = (((grid - a) @ ab) / ab.square().sum().clamp(min=1e-12)).clamp(0, 1)
            hole |= (grid - a - t[:, None] * ab).norm(dim=1) <= radius
    return (~hole).float().reshape(1, 1, h, w)


# -- linear operators -------------------------------------------------------------------------------


class Inpainting(Operator):
    """y = m * x for a 0/1 mask m (1 = observed), broadcast over batch and channels; missing pixels read 0."""

    linear = True

    def __init__(self, mask: torch.Tensor, sigma_y: float = 0.0):
        super().__init__(sigma_y)
        mask = torch.as_tensor(mask)
        mask = mask[None, None] if mask.ndim == 2 else mask
        if mask.ndim != 4 or not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"mask must be a 0/1 tensor of shape (H, W) or (B|1, C|1, H, W), got {tuple(mask.shape)}")
        self.mask = mask.float()

    def _m(self, like):
        return self.mask.to(device=like.device, dtype=like.dtype)

    def forward(self, x):
        return x * self._m(x)

    def adjoint(self, y):
        return y * self._m(y)

    def pinv(self, y):
        # A is an orthogonal projection: A^T = A^+ = A
        return y * self._m(y)

    def measure(self, x, generator=None):
        # missing pixels are not measured, so they carry no noise either
        return super().measure(x, generator) * self._m(x)

    def output_shape(self, input_shape):
        shape = _image_shape(input_shape)
        try:
            broadcast = torch.broadcast_shapes(shape, tuple(self.mask.shape))
        except RuntimeError:
            broadcast = None
        if broadcast != shape:
            raise ValueError(f"mask of shape {tuple(self.mask.shape)} does not fit images of shape {shape}")
        return shape

    input_shape = output_shape


class SuperResolution(Operator):
    """Average pooling over factor x factor blocks (DDRM's and RED-Diff's ``sr{k}``)."""

    linear = True

    def __init__(self, factor: int = 4, sigma_y: float = 0.0):
        super().__init__(sigma_y)
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
        self.factor = factor

    def forward(self, x):
        # a reshape-mean rather than F.avg_pool2d, whose float64 CPU backward is ~100x slower
        self.output_shape(x.shape)  # the size must divide by the factor
        f = self.factor
        return x.unflatten(-1, (x.shape[-1] // f, f)).unflatten(-3, (x.shape[-2] // f, f)).mean((-3, -1))

    def _upsample(self, y):
        return y.repeat_interleave(self.factor, -2).repeat_interleave(self.factor, -1)

    def adjoint(self, y):
        return self._upsample(y) / self.factor**2

    def pinv(self, y):
        # A A^T = I / factor^2, so A^+ = A^T (A A^T)^-1 = nearest upsampling
        return self._upsample(y)

    def output_shape(self, input_shape):
        b, c, h, w = _image_shape(input_shape)
        if h % self.factor or w % self.factor:
            raise ValueError(f"image size {h}x{w} is not divisible by the factor {self.factor}")
        return b, c, h // self.factor, w // self.factor

    def input_shape(self, output_shape):
        b, c, h, w = _image_shape(output_shape)
        return b, c, h * self.factor, w * self.factor


class BicubicDownsampling(SuperResolution):
    """Antialiased bicubic downsampling by ``factor`` (PyTorch's, as PIL resizes); adjoint by autograd,
    pseudo-inverse A^T (A A^T)^-1 y by conjugate gradients (the least-norm preimage)."""

    def __init__(self, factor: int = 4, sigma_y: float = 0.0, cg_iters: int = 100, cg_tol: float = 1e-8):
        super().__init__(factor, sigma_y)
        self.cg_iters, self.cg_tol = cg_iters, cg_tol

    def forward(self, x):
        self.output_shape(x.shape)  # the size must divide by the factor
        size = (x.shape[-2] // self.factor, x.shape[-1] // self.factor)
        return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)

    adjoint = Operator.adjoint

    def pinv(self, y):
        z = _conjugate_gradient(lambda v: self.forward(self.adjoint(v)), y, self.cg_iters, self.cg_tol)
        return self.adjoint(z)


class Blur(Operator):
    """Circular convolution with a normalised kernel, so A = F^-1 diag(K) F: A^T uses conj(K), and ``pinv`` is
    the Tikhonov inverse conj(K) / (|K|^2 + reg), exact in Fourier space."""

    linear = True

    def __init__(self, kernel: torch.Tensor, sigma_y: float = 0.0, reg: float = 1e-3):
        super().__init__(sigma_y)
        kernel = torch.as_tensor(kernel, dtype=torch.float64)
        if kernel.ndim != 2 or not torch.isfinite(kernel).all() or kernel.sum() <= 0:
            raise ValueError(f"kernel must be a finite 2-D tensor with a positive sum, got {tuple(kernel.shape)}")
        if not reg > 0:
            raise ValueError(f"reg must be > 0, got {reg!r}")
        self.kernel, self.reg = kernel / kernel.sum(), float(reg)

    @classmethod
    def gaussian(cls, std: float, kernel_size: int | None = None, **kwargs) -> "Blur":
        """Isotropic Gaussian of ``std`` pixels over ``kernel_size`` taps (default 2 ceil(3 std) + 1)."""
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std!r}")
        size = 2 * math.ceil(3 * std) + 1 if kernel_size is None else kernel_size
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"kernel_size must be an integer >= 1, got {kernel_size!r}")
        r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        k = torch.exp(-(r**2) / (2 * std**2))
        return cls(k[:, None] * k[None, :], **kwargs)

    @classmethod
    def uniform(cls, size: int = 9, **kwargs) -> "Blur":
        """A size x size box (RED-Diff's ``deblur_uni`` is 9)."""
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an integer >= 1, got {size!r}")
        return cls(torch.ones(size, size), **kwargs)

    def _otf(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """Transfer function: the kernel centred on pixel (0, 0), periodised if it is larger than the image."""
        kh, kw = self.kernel.shape
        rows = (torch.arange(kh) - kh // 2) % h
        cols = (torch.arange(kw) - kw // 2) % w
        psf = torch.zeros(h, w, dtype=torch.float64)
        psf.index_put_((rows[:, None].expand(kh, kw), cols[None, :].expand(kh, kw)), self.kernel, accumulate=True)
        return torch.fft.fft2(psf.to(device=like.device, dtype=like.dtype))

    def _filter(self, x, transfer):
        return torch.fft.ifft2(torch.fft.fft2(x) * transfer).real

    def forward(self, x):
        return self._filter(x, self._otf(*x.shape[-2:], x))

    def adjoint(self, y):
        return self._filter(y, self._otf(*y.shape[-2:], y).conj())

    def pinv(self, y):
        k = self._otf(*y.shape[-2:], y)
        return self._filter(y, k.conj() / (k.abs().square() + self.reg))


class Denoising(Operator):
    """y = x + sigma_y n."""

    linear = True

    def forward(self, x):
        return x

    def adjoint(self, y):
        return y

    def pinv(self, y):
        return y


class Colorization(Operator):
    """RGB -> gray as the channel mean (RED-Diff's ``color``); A^T spreads y / 3, the pseudo-inverse copies y."""

    linear = True

    def forward(self, x):
        return x.mean(1, keepdim=True)

    def adjoint(self, y):
        return y.expand(-1, 3, -1, -1) / 3

    def pinv(self, y):
        # A A^T = 1/3, so A^+ = 3 A^T
        return y.expand(-1, 3, -1, -1).clone()

    def output_shape(self, input_shape):
        b, c, h, w = _image_shape(input_shape)
        if c != 3:
            raise ValueError(f"colorization needs RGB images, got {c} channels")
        return b, 1, h, w

    def input_shape(self, output_shape):
        b, _, h, w = _image_shape(output_shape)
        return b, 3, h, w


# -- nonlinear operators ----------------------------------------------------------------------------


class PhaseRetrieval(Operator):
    """y = |FFT(zero-padded x)| (DPS / RED-Diff ``phase_retrieval``); ``pinv`` = |IFFT(y)| cropped, as there.

    As in the official code, each side is padded by int(oversample / 8 * size) pixels (64 for 256 at
    oversample 2). The FFT is orthonormal and DC-centred, so ||y|| = ||x||.
    """

    def __init__(self, oversample: float = 2.0, sigma_y: float = 0.0):
        super().__init__(sigma_y)
        if not oversample > 0:
            raise ValueError(f"oversample must be > 0, got {oversample!r}")
        self.oversample = float(oversample)

    def _pad(self, n: int) -> int:
        return int(self.oversample / 8 * n)

    def forward(self, x):
        ph, pw = self._pad(x.shape[-2]), self._pad(x.shape[-1])
        spectrum = torch.fft.fft2(F.pad(x, (pw, pw, ph, ph)), norm="ortho")
        return torch.fft.fftshift(spectrum, dim=(-2, -1)).abs()

    def pinv(self, y):
        h, w = self.input_shape(y.shape)[-2:]
        ph, pw = self._pad(h), self._pad(w)
        x = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(y, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))
        return x.abs()[..., ph : ph + h, pw : pw + w]

    def output_shape(self, input_shape):
        b, c, h, w = _image_shape(input_shape)
        return b, c, h + 2 * self._pad(h), w + 2 * self._pad(w)

    def input_shape(self, output_shape):
        b, c, h, w = _image_shape(output_shape)
        sizes = [next((n for n in range(1, m + 1) if n + 2 * self._pad(n) == m), None) for m in (h, w)]
        if None in sizes:
            raise ValueError(f"no image size gives a {h}x{w} spectrum at oversample {self.oversample}")
        return b, c, *sizes


class HDR(Operator):
    """y = clip(scale x, -1, 1) (RED-Diff's ``hdr``, scale 2); ``pinv`` = y / scale, exact where nothing clipped."""

    def __init__(self, scale: float = 2.0, sigma_y: float = 0.0):
        super().__init__(sigma_y)
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.scale = float(scale)

    def forward(self, x):
        return (x * self.scale).clamp(-1, 1)

    def pinv(self, y):
        return y / self.scale


# -- composition and specs --------------------------------------------------------------------------


class Compose(Operator):
    """x -> ops[-1](...ops[0](x)); the adjoint applies the adjoints in reverse order, ``pinv`` likewise (a right
    inverse whenever every stage's is). ``measure`` adds each stage's noise where it occurs."""

    def __init__(self, *ops):
        if not ops:
            raise ValueError("Compose needs at least one operator")
        flat = []
        for op in ops:
            if not hasattr(op, "forward"):
                raise TypeError(f"operators must have a forward method, got {type(op).__name__}")
            flat.extend(op.ops if isinstance(op, Compose) else [op])
        super().__init__(getattr(flat[-1], "sigma_y", 0.0))
        self.ops = flat
        self.linear = all(getattr(op, "linear", False) for op in flat)

    def forward(self, x):
        for op in self.ops:
            x = op.forward(x)
        return x

    def adjoint(self, y):
        if not self.linear:
            raise TypeError("the composition has a nonlinear stage: it has no adjoint")
        for op in reversed(self.ops):
            y = op.adjoint(y)
        return y

    def pinv(self, y):
        for op in reversed(self.ops):
            y = initial_estimate(op, y)
        return y

    def measure(self, x, generator=None):
        for op in self.ops:
            x = op.measure(x, generator) if hasattr(op, "measure") else op.forward(x)
        return x

    def output_shape(self, input_shape):
        shape = _image_shape(input_shape)
        for op in self.ops:
            shape = tuple(op.output_shape(shape)) if hasattr(op, "output_shape") else shape
        return shape

    def input_shape(self, output_shape):
        shape = _image_shape(output_shape)
        for op in reversed(self.ops):
            shape = tuple(op.input_shape(shape)) if hasattr(op, "input_shape") else shape
        return shape


# -- deepinv's forward models ----------------------------------------------------------------------
# deepinv works on images in [0, 1], diffkit on [-1, 1]; measurements stay in deepinv's units, so a measurement
# deepinv made can be passed as it is. deepinv is an optional peer (it needs torchvision); nothing here imports it.


class DeepinvOperator(Operator):
    """x -> A((x + 1) / 2) for a deepinv ``Physics``: ``pinv`` is deepinv's ``A_dagger`` mapped back to [-1, 1] (a right
    inverse wherever A_dagger is one), ``adjoint`` is the adjoint of the linear part, A^T y / 2."""

    def __init__(self, physics, sigma_y: float | None = None):
        if not callable(getattr(physics, "A", None)):
            raise TypeError(f"physics must be a deepinv Physics with a noise-free A(x), got {type(physics).__name__}")
        if sigma_y is None:  # deepinv's Gaussian noise model carries its std
            sigma_y = float(getattr(getattr(physics, "noise_model", None), "sigma", 0.0) or 0.0)
        super().__init__(sigma_y)
        self.physics = physics
        self.linear_part = callable(getattr(physics, "A_adjoint", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.physics.A((x + 1) / 2)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """The adjoint of x -> A(x) / 2, the linear part of this affine map."""
        if not self.linear_part:
            raise TypeError(f"{type(self.physics).__name__} is not a linear physics: it has no A_adjoint")
        return self.physics.A_adjoint(y) / 2

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        if callable(getattr(self.physics, "A_dagger", None)):
            return 2 * self.physics.A_dagger(y) - 1
        if self.linear_part:
            return 2 * self.physics.A_adjoint(y) - 1
        return super().pinv(y)

    def output_shape(self, input_shape) -> tuple[int, ...]:
        with torch.no_grad():
            return tuple(self.forward(torch.zeros(_image_shape(input_shape))).shape)

    def input_shape(self, output_shape) -> tuple[int, ...]:
        if not self.linear_part:
            raise ValueError("the image shape of a nonlinear deepinv physics is unknown: pass the starting noise")
        with torch.no_grad():
            return tuple(self.physics.A_adjoint(torch.zeros(tuple(int(n) for n in output_shape))).shape)


def _number(spec: str, text: str, kind):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or (kind is int and value != int(value)):
        raise ValueError(f"operator spec {spec!r}: {text!r} is not {'an integer' if kind is int else 'a number'}")
    return kind(value)


# name -> (builder(args, sigma_y, image_size, seed), kinds of its optional numeric arguments)
_SPECS = {
    "inpaint_box": (lambda a, s, size, seed: Inpainting(box_mask(size, *a), s), (float,)),
    "inpaint_random": (lambda a, s, size, seed: Inpainting(random_mask(size, *a, seed=seed), s), (float,)),
    "inpaint_strokes": (lambda a, s, size, seed: Inpainting(stroke_mask(size, seed), s), ()),
    "sr": (lambda a, s, size, seed: SuperResolution(*a, sigma_y=s), (int,)),
    "sr_bicubic": (lambda a, s, size, seed: BicubicDownsampling(*a, sigma_y=s), (int,)),
    "blur_gauss": (lambda a, s, size, seed: Blur.gaussian(*(a or [3.0]), sigma_y=s), (float, int)),
    "blur_uniform": (lambda a, s, size, seed: Blur.uniform(*a, sigma_y=s), (int,)),
    "denoise": (lambda a, s, size, seed: Denoising(s), ()),
    "color": (lambda a, s, size, seed: Colorization(s), ()),
    "phase": (lambda a, s, size, seed: PhaseRetrieval(*a, sigma_y=s), (float,)),
    "hdr": (lambda a, s, size, seed: HDR(*a, sigma_y=s), (float,)),
}
OPERATORS = tuple(_SPECS)


def make_operator(spec: str, *, sigma_y: float = 0.0, image_size=None, seed: int = 0) -> Operator:
    """Build an operator from a spec such as "sr:4", "inpaint_random:0.5", "blur_gauss:3.0[:kernel_size]".

    Specs joined by "+" compose left to right ("blur_gauss:1.0+sr:2"); the noise sigma_y is added after the
    last. Inpainting specs need ``image_size`` (int or (H, W)); ``seed`` picks random and stroke masks.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"operator spec must be a non-empty string, got {spec!r}")
    parts = [p.strip() for p in spec.split("+")]
    ops = []
    for i, part in enumerate(parts):
        name, *texts = part.split(":")
        if name not in _SPECS:
            raise ValueError(f"unknown operator {name!r} in spec {spec!r}; allowed: {', '.join(OPERATORS)}")
        build, kinds = _SPECS[name]
        if len(texts) > len(kinds):
            raise ValueError(f"operator spec {part!r} takes at most {len(kinds)} argument(s), got {len(texts)}")
        if name.startswith("inpaint") and image_size is None:
            raise ValueError(f"operator spec {part!r} needs image_size to build its mask")
        args = [_number(part, text, kind) for text, kind in zip(texts, kinds)]
        ops.append(build(args, sigma_y if i == len(parts) - 1 else 0.0, image_size, seed))
    return ops[0] if len(ops) == 1 else Compose(*ops)
