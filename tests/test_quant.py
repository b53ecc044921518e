"""PTQ4DM: quantiser error bounds, the Lp range search, the exact shortcut split, calibration sets that follow
the requested time-step distribution and hold the inputs as executed, and save/load of a quantised pipeline."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

import diffkit
from diffkit.pipelines import GuidedPipeline
from diffkit.quant import (
    QuantizedLayer,
    QuantizedModel,
    SplitShortcut,
    activation_range,
    build_calibration_set,
    find_shortcut_splits,
    quantize_model,
    quantize_pipeline,
    weight_scales,
)
from diffkit.quant.calibration import ndtc_step_indices, uniform_step_indices
from diffkit.quant.layers import pack_nibbles, unpack_nibbles
from diffkit.quant.scales import affine_params, fake_quantize_affine, quantize_symmetric

from helpers import tiny_unet


def tiny_pipeline(seed=0):
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    pipe = GuidedPipeline(tiny_unet(num_class_embeds=5, seed=seed), scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_quantise_dequantise_error_is_at_most_half_a_step(bits):
    w = torch.randn(16, 3, 3, 3) * torch.rand(16, 1, 1, 1) * 4
    scale = weight_scales(w, bits, "absmax")
    q = quantize_symmetric(w, scale.view(-1, 1, 1, 1), bits)
    assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1
    assert ((w - q * scale.view(-1, 1, 1, 1)).abs() <= scale.view(-1, 1, 1, 1) / 2 + 1e-6).all()
    x = torch.randn(10_000) * 3 + 1
    low, high = activation_range(x, bits, "absmax")
    scale, zero = affine_params(low, high, bits)
    assert ((x - fake_quantize_affine(x, scale, zero, bits)).abs() <= scale / 2 + 1e-5).all()
    assert fake_quantize_affine(torch.zeros(1), scale, zero, bits).item() == 0  # zero is exact (padding)


def test_four_bit_weights_pack_two_per_byte():
    q = torch.randint(-8, 8, (7, 3, 3), dtype=torch.int8)
    packed = pack_nibbles(q)
    assert packed.dtype == torch.uint8 and len(packed) == (q.numel() + 1) // 2
    assert torch.equal(unpack_nibbles(packed, q.shape), q)


def test_lp_search_never_loses_to_absmax_and_clips_outliers():
    torch.manual_seed(1)
    w = torch.distributions.StudentT(2.0).sample((8, 512))  # heavy tails: absmax spends the grid on a few values
    error = lambda scale, bits: (w - quantize_symmetric(w, scale[:, None], bits) * scale[:, None]).abs().pow(2.4).sum(1)  # noqa: E731
    lp, absmax = weight_scales(w, 4, "lp"), weight_scales(w, 4, "absmax")
    assert (error(lp, 4) < error(absmax, 4)).all() and (lp < absmax).all()
    for bits in (2, 8):  # the search includes absmax itself, so it can never do worse
        assert (error(weight_scales(w, bits, "lp"), bits) <= error(weight_scales(w, bits, "absmax"), bits) * (1 + 1e-6)).all()
    x = torch.cat([torch.randn(100_000), torch.tensor([60.0])])
    low, high = activation_range(x, 8, "lp")
    assert high < 60 and low > x.min()


def test_split_shortcut_is_exactly_the_concatenated_conv():
    conv = torch.nn.Conv2d(24, 16, 1).double()
    x = torch.randn(2, 24, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(SplitShortcut(conv, 10)(x), conv(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="cannot split"):
        SplitShortcut(conv, 24)


def test_shortcut_splits_found_on_a_unet_and_the_split_unet_is_unchanged():
    torch.manual_seed(0)
    channels = (8, 16, 24)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=2,
                       norm_num_groups=4, down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3).double()
    x, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([10.0, 700.0])
    splits = find_shortcut_splits(unet, x, t)
    # diffusers' decoder: block i has out = reversed(channels)[i]; its first ResNet sees the previous block's
    # output channels as h, the later ones its own out channels
    rev = channels[::-1]
    expected = {}
    for i, out in enumerate(rev):
        for j in range(3):
            h = (rev[max(i - 1, 0)] if j == 0 else out)
            if unet.up_blocks[i].resnets[j].conv_shortcut is not None:
                expected[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = h
    assert splits == expected and len(splits) == 9
    before = unet(x, t).sample
    for name, split in splits.items():
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent), child, SplitShortcut(unet.get_submodule(name), split))
    torch.testing.assert_close(unet(x, t).sample, before, rtol=1e-10, atol=1e-10)


def test_ndtc_and_uniform_follow_their_step_distributions():
    steps, n = 50, 40_000
    k = ndtc_step_indices(n, steps, 0.4, 0.4, torch.Generator().manual_seed(0))
    # P(k = j) for int(N(mu, sigma) * S) clamped: truncation toward zero sends (-1/S, 1/S) to 0 as well
    cdf = lambda z: 0.5 * (1 + math.erf((z - 0.4) / (0.4 * math.sqrt(2))))  # noqa: E731
    probs = [cdf(1 / steps)] + [cdf((j + 1) / steps) - cdf(j / steps) for j in range(1, steps - 1)] + [1 - cdf((steps - 1) / steps)]
    counts = torch.bincount(k, minlength=steps).double()
    expected = torch.tensor(probs, dtype=torch.float64) * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 90  # 49 degrees of freedom: 90 is beyond the 99.9% quantile (~85)
    assert counts[0] / n == pytest.approx(cdf(1 / steps), abs=0.01)  # ~17% clamp to the data end
    u = uniform_step_indices(1000, steps, 25)
    assert sorted(set(u.tolist())) == torch.linspace(0, 49, 25).round().long().tolist()
    assert set(torch.bincount(u)[torch.bincount(u) > 0].tolist()) == {40}


@pytest.mark.parametrize("policy", ["ndtc", "uniform"])
def test_calibration_rows_are_the_inputs_as_executed(policy):
    pipe = tiny_pipeline()
    seen = {}

    def keep(p, step, t, kw):  # the latents after step i are the network input of step i + 1
        seen[step + 1] = kw["latents"].clone()
        return {}

    steps = 10
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(4, (64,), generator=generator).tolist()
    pipe(class_labels=labels, num_inference_steps=steps, solver="ddim", generator=torch.Generator().manual_seed(4),
         output_type="latent", callback_on_step_end=keep)
    calib = build_calibration_set(pipe, 100, policy, num_inference_steps=steps, steps_used=5, class_labels=labels,
                                  generator=torch.Generator().manual_seed(4))
    timesteps = diffkit.make_timesteps(diffkit.NoiseSchedule.from_config(pipe.scheduler.config), "ddim", steps)
    assert len(calib) == 100
    for i in range(0, 100, 7):
        k = calib.step_index[i].item()
        call = steps - 1 - k  # k counts from the data end
        assert calib.timestep[i] == timesteps[call]
        if call > 0:
            rows = torch.cat([seen[call], seen[call]])  # CFG runs [cond; uncond] on the same latents
            assert any(torch.equal(calib.sample[i], r) for r in rows)
        label = calib.cond["class_labels"][i].item()
        assert label in labels or label == 4  # 4 = the null class of the unconditional rows


def test_naive_calibration_is_noise_at_uniform_timesteps():
    calib = build_calibration_set(tiny_pipeline(), 2000, "naive", num_inference_steps=2)
    assert abs(calib.sample.std().item() - 1) < 0.02 and (calib.step_index == -1).all()
    assert calib.timestep.min() < 20 and calib.timestep.max() > 980
    assert abs(calib.timestep.mean().item() - 499.5) < 20


def test_more_bits_less_error_on_the_default_model():
    pipe = diffkit.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    calib = build_calibration_set(pipe, 48, "uniform", num_inference_steps=8, steps_used=8)
    x, t, cond = next(calib.batches(48))
    with torch.no_grad():
        ref = pipe.unet(x, t, **cond).sample
        error = {bits: (quantize_model(pipe.unet, calib, bits)(x, t, **cond).sample - ref).pow(2).mean().item()
                 for bits in ("w8a8", "w4a8")}
    assert 0 < error["w8a8"] < error["w4a8"] < ref.pow(2).mean().item() / 10
    assert not any(isinstance(m, QuantizedLayer) for m in pipe.unet.modules())  # the float model is untouched


def test_quantised_pipeline_round_trips_with_identical_outputs(tmp_path):
    pipe = quantize_pipeline(tiny_pipeline(), "w4a8", "ndtc", n=32, num_inference_steps=4)
    assert isinstance(pipe.unet, QuantizedModel) and pipe.unet.config.sample_size == 8
    layers = [m for m in pipe.unet.modules() if isinstance(m, QuantizedLayer)]
    assert {m.weight_bits for m in layers} == {4, 8}  # first and last layers stay at 8 bits
    assert all(m.weight_integers().abs().max() <= 8 for m in layers if m.weight_bits == 4)
    run = lambda p: p(class_labels=[0, 3], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images  # noqa: E731
    before = run(pipe)
    pipe.save_pretrained(tmp_path / "q")
    assert not list((tmp_path / "q").rglob("*.bin"))
    loaded = diffkit.load_pipeline(tmp_path / "q")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.unet, QuantizedModel) and loaded.unet.recipe["calibration"] == "ndtc"
    assert torch.equal(run(loaded), before)


def test_bad_input_is_refused():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_pipeline(pipe, "w3a3")
    with pytest.raises(ValueError, match="policy must be one of"):
        build_calibration_set(pipe, 8, "gaussian")
    with pytest.raises(ValueError, match="positive integer"):
        build_calibration_set(pipe, 0)
    with pytest.raises(ValueError, match="range method"):
        weight_scales(torch.randn(4, 4), 8, "minmax")
    with pytest.raises(ValueError, match="NaN"):
        activation_range(torch.tensor([0.0, float("nan")]), 8)
    with pytest.raises(TypeError, match="only Conv2d and Linear"):
        QuantizedLayer(torch.nn.Embedding(3, 4), 8, 8)


def test_int8_graph_computes_what_the_simulation_computes():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 8, 3, padding=1)
    layer = QuantizedLayer.from_float(conv, 8, 8)
    x = torch.randn(4, 16, 6, 6) * 2 + 0.5
    layer.set_input_range(x.min(), x.max())
    simulated = layer(x)
    layer.use_int8_graph(reduce_range=False)
    # the same integers; quantize_per_tensor rounds x * (1 / scale), the simulation x / scale: rare ties differ
    step = layer.input_scale * layer.weight.abs().sum((1, 2, 3)).max()
    assert (layer(x) - simulated).abs().max() <= step
    assert (layer(x) - simulated).abs().mean() <= step / 100
    layer.use_int8_graph(reduce_range=True)  # 7 bits over the same range: about twice the input error
    seven = (layer(x) - conv(x)).pow(2).mean()
    layer.use_int8_graph(False)
    eight = (layer(x) - conv(x)).pow(2).mean()
    assert 2 < seven / eight < 8
    with pytest.raises(ValueError, match="8-bit inputs"):
        QuantizedLayer.from_float(conv, 8, 4).use_int8_graph()


@pytest.mark.slow
def test_int8_kernels_match_the_int8_graph_and_are_used():
    """Compiles (about a minute): inductor must lower the quantised layers to oneDNN int8 kernels."""
    from torch._dynamo.utils import counters

    pipe = quantize_pipeline(tiny_pipeline(), "w8a8", "uniform", n=32, num_inference_steps=4)
    x, t, labels = torch.randn(4, 3, 8, 8), torch.tensor([900.0, 600, 300, 20]), torch.tensor([0, 1, 2, 4])
    model = pipe.unet
    with torch.no_grad():
        reference = tiny_pipeline().unet(x, t, class_labels=labels).sample  # the same seed: the float model
        for m in model.modules():
            if isinstance(m, QuantizedLayer):
                m.use_int8_graph(reduce_range=True)
        eager = model(x, t, class_labels=labels).sample
        counters.clear()
        compiled = model.use_int8_kernels(reduce_range=True)(x, t, class_labels=labels).sample
    lowered = sum(v for k, v in counters["inductor"].items() if k.startswith(("qconv", "qlinear")) and k.endswith("lower_count"))
    quantized = len([m for m in model.modules() if isinstance(m, QuantizedLayer) and m.act_bits])
    assert lowered >= 0.9 * quantized  # (all 101 on the default model; a few of this tiny one's 8-wide layers stay float)
    # int8 kernels round (and requantise fused outputs) in their own way, so they are not bit-equal to the
    # quantize/dequantize graph, but they must be as close to float as it is (saturating kernels are not)
    error = lambda out: ((out - reference).norm() / reference.norm()).item()  # noqa: E731
    assert error(compiled) < 1.5 * error(eager) + 1e-3
    assert ((compiled - eager).norm() / eager.norm()) < 0.1
