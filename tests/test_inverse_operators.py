"""Forward operators: exact adjoints, right inverses, composition, specs and shape errors (all float64)."""

import math

import pytest
import torch

from diffkit.inverse import (
    HDR,
    BicubicDownsampling,
    Blur,
    Colorization,
    Compose,
    Denoising,
    Inpainting,
    Operator,
    PhaseRetrieval,
    SuperResolution,
    box_mask,
    make_operator,
    random_mask,
    stroke_mask,
)


SHAPE = (2, 3, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class _Subsample(Operator):
    """A user-defined linear operator that defines only forward and input_shape: its adjoint comes from autograd."""

    linear = True

    def forward(self, x):
        return 2 * x[..., ::2, 1::2]

    def output_shape(self, input_shape):
        b, c, h, w = input_shape
        return b, c, h // 2, w // 2

    def input_shape(self, output_shape):
        b, c, h, w = output_shape
        return b, c, 2 * h, 2 * w


LINEAR = {
    "inpaint_box": lambda: Inpainting(box_mask(16)),
    "inpaint_random": lambda: Inpainting(random_mask(16, 0.7, seed=3)),
    "inpaint_strokes": lambda: Inpainting(stroke_mask(16, seed=1)),
    "inpaint_per_channel": lambda: Inpainting(_randn((1, 3, 16, 16), 9) > 0),
    "sr2": lambda: SuperResolution(2),
    "sr4": lambda: SuperResolution(4),
    "sr_bicubic2": lambda: BicubicDownsampling(2),
    "sr_bicubic4": lambda: BicubicDownsampling(4),
    "blur_gauss": lambda: Blur.gaussian(1.5),
    "blur_gauss_wider_than_image": lambda: Blur.gaussian(3.0, kernel_size=21),
    "blur_uniform": lambda: Blur.uniform(9),
    "blur_asymmetric": lambda: Blur(_randn((3, 4), 5).abs()),
    "denoise": lambda: Denoising(),
    "color": lambda: Colorization(),
    "user_subsample": lambda: _Subsample(),
    "blur_then_sr": lambda: Blur.gaussian(1.0).then(SuperResolution(2)),
    "sr_then_color_then_sr": lambda: Compose(SuperResolution(2), Colorization(), BicubicDownsampling(2)),
}


@pytest.mark.parametrize("name", LINEAR)
def test_adjoint_identity(name):
    """<A x, y> = <x, A^T y> for random x, y in float64: the adjoint is the exact transpose."""
    op = LINEAR[name]()
    assert op.linear
    x = _randn(SHAPE, 0)
    y = _randn(op.output_shape(SHAPE), 1)
    lhs, rhs = (op.forward(x) * y).sum(), (x * op.adjoint(y)).sum()
    assert op.adjoint(y).shape == SHAPE
    assert abs(lhs - rhs) <= 1e-12 * (op.forward(x).norm() * y.norm()), (lhs.item(), rhs.item())


@pytest.mark.parametrize("name", ["sr2", "sr4", "color", "denoise", "sr_then_color_then_sr"])
def test_pinv_is_an_exact_right_inverse(name):
    """A(pinv(y)) = y for any y: these operators have full row rank and closed-form pseudo-inverses."""
    op = LINEAR[name]()
    y = _randn(op.output_shape(SHAPE), 2)
    assert torch.allclose(op.forward(op.pinv(y)), y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["inpaint_box", "inpaint_random", "inpaint_strokes", "inpaint_per_channel"])
def test_inpainting_pinv_on_measurements(name):
    """A is a projection: pinv(A x) = A x and A(pinv(y)) = y on measurements; missing pixels read and stay 0."""
    op = LINEAR[name]()
    y = op.forward(_randn(SHAPE, 3))
    assert torch.equal(op.pinv(y), y) and torch.equal(op.forward(op.pinv(y)), y)
    assert torch.all(y[(op.mask == 0).expand(SHAPE)] == 0)


def test_pinv_of_avg_pool_is_the_least_norm_preimage():
    """pinv(y) = A^T (A A^T)^-1 y: it lies in the row space, so any other preimage x (A x = y) is longer."""
    op = SuperResolution(4)
    x = _randn(SHAPE, 4)
    x_min = op.pinv(op.forward(x))
    assert torch.allclose(op.pinv(op.forward(x_min)), x_min, atol=1e-12)
    assert x_min.norm() < x.norm()
    # x - x_min is in the null space, orthogonal to x_min
    assert abs((x_min * (x - x_min)).sum()) < 1e-10


@pytest.mark.parametrize("factor", [2, 4])
def test_bicubic_pinv_by_conjugate_gradients(factor):
    """CG on A A^T z = y gives A(pinv(y)) = y to its tolerance (1e-8), and pinv(y) = A^T z is in the row space."""
    op = BicubicDownsampling(factor)
    y = _randn(op.output_shape(SHAPE), 5)
    x = op.pinv(y)
    assert (op.forward(x) - y).norm() <= 1e-7 * y.norm()
    assert torch.allclose(op.pinv(op.forward(x)), x, atol=1e-6)


@pytest.mark.parametrize("name", ["blur_gauss", "blur_gauss_wider_than_image", "blur_uniform", "blur_asymmetric"])
def test_blur_pinv_is_the_tikhonov_inverse(name):
    """pinv solves (A^T A + reg I) x = A^T y exactly; for y = A x, each Fourier coefficient of A(pinv(y)) - y is
    reg |K| / (|K|^2 + reg) <= sqrt(reg) / 2 times x's, so ||A(pinv(A x)) - A x|| <= sqrt(reg) / 2 ||x||."""
    op = LINEAR[name]()
    y = _randn(SHAPE, 6)
    x = op.pinv(y)
    assert torch.allclose(op.adjoint(op.forward(x)) + op.reg * x, op.adjoint(y), atol=1e-12)
    x_true = _randn(SHAPE, 7)
    y = op.forward(x_true)
    assert (op.forward(op.pinv(y)) - y).norm() <= math.sqrt(op.reg) / 2 * x_true.norm()


def test_blur_is_a_normalised_circular_convolution():
    """Constant images pass unchanged (the kernel sums to 1), and a shifted image blurs to the shifted blur."""
    op = Blur.gaussian(2.0)
    flat = torch.full(SHAPE, 0.3, dtype=torch.float64)
    assert torch.allclose(op.forward(flat), flat)
    x = _randn(SHAPE, 8)
    assert torch.allclose(op.forward(x.roll(3, -1)), op.forward(x).roll(3, -1), atol=1e-12)
    # a point spreads into the Gaussian's shape, centred on the point
    delta = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    delta[..., 8, 8] = 1
    out = op.forward(delta)[0, 0]
    assert out.argmax() == 8 * 16 + 8 and torch.allclose(out, out.flip(0).roll(1, 0), atol=1e-12)


def test_phase_retrieval_is_the_magnitude_of_an_orthonormal_spectrum():
    """||y|| = ||x|| (orthonormal FFT of the zero-padded image); y is blind to sign and flips (the trivial
    ambiguities); pinv crops |IFFT(y)| back to the image size, as the official code."""
    op = PhaseRetrieval(oversample=2.0)
    x = _randn(SHAPE, 9)
    y = op.forward(x)
    assert y.shape == op.output_shape(SHAPE) == (2, 3, 24, 24)  # 16 + 2 * int(2 / 8 * 16)
    assert op.input_shape(y.shape) == SHAPE
    assert torch.allclose(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), atol=1e-12)
    assert torch.allclose(op.forward(-x), y, atol=1e-12)
    assert torch.allclose(op.forward(x.flip(-1, -2)), y, atol=1e-12)
    x_hat = op.pinv(y)
    assert x_hat.shape == SHAPE and torch.all(x_hat >= 0)
    assert not op.linear
    with pytest.raises(TypeError, match="nonlinear"):
        op.adjoint(y)


def test_hdr_clips_and_its_pinv_undoes_the_gain():
    op = HDR()
    x = _randn(SHAPE, 10) * 0.6
    y = op.forward(x)
    assert y.abs().max() <= 1 and torch.equal(y, (2 * x).clamp(-1, 1))
    inside = (2 * x).abs() < 1
    assert torch.allclose(op.pinv(y)[inside], x[inside])


def test_compose_applies_in_order_and_its_adjoint_in_reverse():
    """Compose(a, b) = b after a; a.then(b) is the same; nested compositions flatten."""
    a, b = Colorization(), SuperResolution(2)
    op = a.then(b)
    x = _randn(SHAPE, 11)
    assert torch.equal(op.forward(x), b.forward(a.forward(x)))
    assert op.output_shape(SHAPE) == (2, 1, 8, 8) and op.input_shape((2, 1, 8, 8)) == SHAPE
    y = _randn((2, 1, 8, 8), 12)
    assert torch.equal(op.adjoint(y), a.adjoint(b.adjoint(y)))
    assert len(Compose(op, Denoising()).ops) == 3
    with pytest.raises(ValueError, match="not divisible"):
        op.output_shape((2, 3, 7, 7))  # each stage checks the shape the previous one hands it
    with pytest.raises(ValueError, match="RGB"):
        b.then(a).output_shape((2, 1, 8, 8))
    assert not Compose(b, HDR()).linear


def test_measure_adds_noise_of_std_sigma_y_after_the_last_stage():
    op = make_operator("blur_gauss:1.0+sr:2", sigma_y=0.1)
    x = _randn((64, 3, 16, 16), 13)
    noise = op.measure(x, torch.Generator().manual_seed(0)) - op.forward(x)
    assert abs(noise.std().item() - 0.1) < 0.005
    same_seed = [op.measure(x, torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(*same_seed)
    masked = Inpainting(box_mask(16), sigma_y=0.1)
    y = masked.measure(x, torch.Generator().manual_seed(0))
    assert torch.all(y[(masked.mask == 0).expand_as(y)] == 0)  # no noise where nothing is measured


def test_masks():
    box = box_mask(16, 0.5)
    assert box.shape == (1, 1, 16, 16) and box.sum() == 256 - 64 and box[..., 4:12, 4:12].sum() == 0
    rand = random_mask(16, 0.3, seed=1)
    assert (rand == 0).sum() == round(0.3 * 256)
    assert torch.equal(rand, random_mask(16, 0.3, seed=1)) and not torch.equal(rand, random_mask(16, 0.3, seed=2))
    strokes = [stroke_mask(32, seed=s) for s in range(4)]
    assert torch.equal(strokes[0], stroke_mask(32, seed=0))
    assert all(0.02 < (m == 0).float().mean() < 0.6 for m in strokes)
    assert len({m.sum().item() for m in strokes}) > 1


@pytest.mark.parametrize(
    "spec, kind, check",
    [
        ("inpaint_box", Inpainting, lambda op: op.mask.sum() == 256 - 64),
        ("inpaint_random:0.25", Inpainting, lambda op: (op.mask == 0).sum() == 64),
        ("inpaint_strokes", Inpainting, lambda op: torch.equal(op.mask, stroke_mask(16, seed=0))),
        ("sr:2", SuperResolution, lambda op: op.factor == 2),
        ("sr", SuperResolution, lambda op: op.factor == 4),
        ("sr_bicubic:4", BicubicDownsampling, lambda op: op.factor == 4),
        ("blur_gauss:3.0", Blur, lambda op: op.kernel.shape == (19, 19)),
        ("blur_gauss:1.0:5", Blur, lambda op: op.kernel.shape == (5, 5)),
        ("blur_uniform:9", Blur, lambda op: op.kernel.shape == (9, 9) and torch.all(op.kernel == 1 / 81)),
        ("denoise", Denoising, lambda op: True),
        ("color", Colorization, lambda op: True),
        ("phase", PhaseRetrieval, lambda op: op.oversample == 2),
        ("hdr", HDR, lambda op: op.scale == 2),
        ("blur_gauss:1.0 + sr:2", Compose, lambda op: [o.sigma_y for o in op.ops] == [0.0, 0.05]),
    ],
)
def test_make_operator(spec, kind, check):
    op = make_operator(spec, sigma_y=0.05, image_size=16)
    assert isinstance(op, kind) and op.sigma_y == 0.05 and check(op)


@pytest.mark.parametrize(
    "spec, kwargs, match",
    [
        ("warp", {}, "unknown operator 'warp'.*allowed: inpaint_box, .*hdr"),
        ("sr:x", {}, "'x' is not an integer"),
        ("sr:2.5", {}, "'2.5' is not an integer"),
        ("sr:2:3", {}, "at most 1 argument"),
        ("blur_gauss:nan", {}, "not a number"),
        ("blur_gauss:-1", {}, "std must be > 0"),
        ("inpaint_random:1.5", {"image_size": 16}, "fraction"),
        ("inpaint_box", {}, "needs image_size"),
        ("sr:2+", {}, "unknown operator ''"),
        ("", {}, "non-empty"),
        ("denoise", {"sigma_y": -0.1}, "sigma_y must be"),
    ],
)
def test_make_operator_rejects_bad_specs(spec, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_operator(spec, **kwargs)


def test_shape_mismatch_names_both_shapes():
    op = SuperResolution(2)
    with pytest.raises(ValueError, match=r"y has shape \(2, 3, 4, 4\).*\(2, 3, 16, 16\).*\(2, 3, 8, 8\)"):
        op.check_measurement(torch.zeros(2, 3, 4, 4), SHAPE)
    with pytest.raises(ValueError, match="not divisible"):
        op.check_measurement(torch.zeros(2, 3, 4, 4), (2, 3, 9, 9))
    with pytest.raises(ValueError, match="does not fit"):
        Inpainting(box_mask(8)).check_measurement(torch.zeros(SHAPE), SHAPE)
    with pytest.raises(ValueError, match="NaN"):
        Denoising().check_measurement(torch.full(SHAPE, math.nan), SHAPE)
    Colorization().check_measurement(torch.zeros(2, 1, 16, 16), SHAPE)  # the right shape passes


class _DeepinvLikeDownsampling:
    """deepinv's LinearPhysics interface (A, A_adjoint, A_dagger, noise_model.sigma) for 2x average pooling on
    [0, 1] images, standing in for deepinv (an optional peer that needs torchvision)."""

    class noise_model:
        sigma = 0.1

    def A(self, x):
        return torch.nn.functional.avg_pool2d(x, 2)

    def A_adjoint(self, y):
        return torch.nn.functional.interpolate(y, scale_factor=2, mode="nearest") / 4

    def A_dagger(self, y):
        return torch.nn.functional.interpolate(y, scale_factor=2, mode="nearest")


def test_deepinv_physics_as_an_operator_on_minus_one_to_one_images():
    from diffkit.inverse import Operator, red_diff

    physics = _DeepinvLikeDownsampling()
    op = Operator.from_deepinv(physics)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    assert torch.allclose(op.forward(x), physics.A((x + 1) / 2))  # measurements in deepinv's units, noise-free
    assert op.sigma_y == 0.1 and op.output_shape(x.shape) == (2, 3, 4, 4) and op.input_shape((2, 3, 4, 4)) == x.shape
    y = op.forward(x)
    assert torch.allclose(op.forward(op.pinv(y)), y)  # a right inverse on [-1, 1] images
    v, w = torch.randn_like(x), torch.randn_like(y)  # <L v, w> = <v, L^T w> for the linear part L v = A(v) / 2
    assert torch.allclose((physics.A(v) / 2 * w).sum(), (v * op.adjoint(w)).sum())
    from diffkit import Denoiser, NoiseSchedule
    from helpers import NearlyTrainedModel

    schedule = NoiseSchedule.from_config({"beta_schedule": "linear"})
    denoiser = Denoiser(NearlyTrainedModel(schedule, "epsilon"), schedule, "epsilon")
    restored = red_diff(denoiser, y.float(), op, num_steps=5)
    assert restored.shape == x.shape and torch.isfinite(restored).all()


def test_real_deepinv_physics_when_installed():
    from diffkit.inverse import Operator

    dinv = pytest.importorskip("deepinv")
    physics = dinv.physics.Downsampling(img_size=(3, 8, 8), factor=2, filter=None)
    op = Operator.from_deepinv(physics)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert torch.allclose(op.forward(x), physics.A((x + 1) / 2))
    assert torch.allclose(op.forward(op.pinv(op.forward(x))), op.forward(x), atol=1e-5)
