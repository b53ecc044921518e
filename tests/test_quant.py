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


class Recorded:
    """The pipeline as build_calibration_sets calls it, keeping every network call and every final sample."""

    def __init__(self, pipe):
        self.pipe, self.unet, self.num_classes, self.calls, self.finals = pipe, pipe.unet, pipe.num_classes, [], []
        pipe.unet.register_forward_pre_hook(lambda module, args: self.calls.append([a.clone() for a in args[:2]]))

    def __call__(self, **kwargs):
        out = self.pipe(**kwargs)
        self.finals.append(out.images.clone())
        return out


def _executed(recorded, steps):
    """Per chunk: (first global row, [(sample, timestep, class labels) of each step from the noise end], final)."""
    chunks, base = [], 0
    for c, final in enumerate(recorded.finals):
        calls = recorded.calls[c * steps : (c + 1) * steps]
        chunks.append((base, calls, final))
        base += len(calls[0][0])
    return chunks


@pytest.mark.parametrize("policy", ["ndtc", "uniform", "ndtc_as_coded"])
def test_calibration_rows_are_the_inputs_as_executed(policy):
    """Every sample is the network input of its trajectory row at its step (with CFG's conditional and
    unconditional rows, across several pipeline batches), with that call's timestep and the row's class label;
    the as-coded NDTC pairs the sample after loop iteration k (counted from noise) with the timestep value k."""
    pipe = tiny_pipeline()
    labels_seen = []
    pipe.unet.register_forward_pre_hook(lambda m, a, kw: labels_seen.append(kw["class_labels"].clone()), with_kwargs=True)
    recorded, steps = Recorded(pipe), 10
    calib = build_calibration_set(recorded, 60, policy, num_inference_steps=steps, steps_used=5, batch_size=8,
                                  solver="ddim", generator=torch.Generator().manual_seed(4))
    chunks = _executed(recorded, steps)
    assert (len(chunks) > 1 or policy == "uniform") and all(len(calls[0][0]) <= 2 * 8 for _, calls, _ in chunks)  # <= 8 images
    timesteps = diffkit.make_timesteps(diffkit.NoiseSchedule.from_config(pipe.scheduler.config), "ddim", steps)
    assert len(calib) == 60
    for i in range(60):
        row = calib.row[i].item()
        c = max(c for c, chunk in enumerate(chunks) if chunk[0] <= row)
        base, calls, final = chunks[c]
        local, k = row - base, calib.step_index[i].item()
        label = labels_seen[c * steps][local]
        assert calib.cond["class_labels"][row] == label
        if policy == "ndtc_as_coded":
            k_drawn = int(calib.timestep[i].item())  # the network is fed the loop iteration k itself
            expected = final[local % len(final)] if k_drawn == steps - 1 else calls[k_drawn + 1][0][local]
            assert k == (-1 if k_drawn == steps - 1 else steps - 2 - k_drawn)
            assert torch.equal(calib.sample[i], expected)
        else:
            sample, t = calls[steps - 1 - k]  # k counts from the data end
            assert calib.timestep[i] == t == timesteps[steps - 1 - k]
            assert torch.equal(calib.sample[i], sample[local])
    if policy == "uniform":  # Q-Diffusion: the same first rows at each of 5 evenly spaced steps
        assert sorted(set(calib.step_index.tolist())) == [0, 2, 4, 7, 9]
        assert all(sorted(calib.row[calib.step_index == k].tolist()) == list(range(12)) for k in (0, 2, 4, 7, 9))


def test_naive_calibration_is_noise_at_uniform_timesteps():
    calib = build_calibration_set(tiny_pipeline(), 400, "naive", num_inference_steps=4, batch_size=200)
    assert abs(calib.sample.std().item() - 1) < 0.02 and (calib.step_index == -1).all()
    assert calib.timestep.min() < 20 and calib.timestep.max() > 730  # the executed range: 750, 500, 250, 0
    assert abs(calib.timestep.mean().item() - 375) < 40  # 3.7 standard errors


def test_calibration_memory_does_not_grow_with_the_steps():
    """The recorder keeps n samples and one conditioning per trajectory row, whatever the number of steps, and
    its peak is what the set holds: nothing per step is kept on the way."""
    sizes = {}
    for steps in (3, 9):
        for n in (24, 48):
            calib = build_calibration_set(tiny_pipeline(), n, "ndtc", num_inference_steps=steps, batch_size=8)
            assert calib.peak_bytes == calib.nbytes
            assert len(calib.cond["class_labels"]) == n  # one per row: not n x steps
            sizes[steps, n] = calib.nbytes
    assert sizes[3, 24] == sizes[9, 24] and sizes[3, 48] == sizes[9, 48]
    assert sizes[3, 48] == 2 * sizes[3, 24]


def test_calibration_refuses_what_it_cannot_store_once():
    """A per-row argument that changes between steps (here a conditioning that follows the step) is refused
    rather than stored from the first step only."""
    pipe = tiny_pipeline()
    step = [0]

    def shift_labels(module, args, kwargs):
        step[0] += 1
        return args, {**kwargs, "class_labels": (kwargs["class_labels"] + step[0]) % 5}

    pipe.unet.register_forward_pre_hook(shift_labels, with_kwargs=True, prepend=True)
    with pytest.raises(ValueError, match="change between steps"):
        build_calibration_set(pipe, 8, "ndtc", num_inference_steps=3)


def test_more_bits_less_error_on_the_default_model():
    pipe = diffkit.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    calib = build_calibration_set(pipe, 48, "uniform", num_inference_steps=8, steps_used=8)
    inputs = next(calib.batches(48))
    with torch.no_grad():
        ref = pipe.unet(**inputs).sample
        error = {bits: (quantize_model(pipe.unet, calib, bits)(**inputs).sample - ref).pow(2).mean().item()
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
    with pytest.raises(ValueError, match="act_calibration must be one of"):
        quantize_pipeline(pipe, act_calibration="ema")
    with pytest.raises(ValueError, match="prompts or prompt_embeds, not both"):
        build_calibration_set(pipe, 8, prompts=["a"], prompt_embeds=torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        build_calibration_set(pipe, 8, prompts="a cat")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        build_calibration_set(pipe, 8, batch_size=0)
    with pytest.raises(ValueError, match="positive integer"):
        build_calibration_set(pipe, 0)
    with pytest.raises(ValueError, match="range method"):
        weight_scales(torch.randn(4, 4), 8, "minmax")
    with pytest.raises(ValueError, match="NaN"):
        activation_range(torch.tensor([0.0, float("nan")]), 8)
    with pytest.raises(TypeError, match="only Conv2d and Linear"):
        QuantizedLayer(torch.nn.Embedding(3, 4), 8, 8)


def _sqnr(out, ref):
    return (10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum())).item()


def _every_layer_quantised(float_model, quantized):
    """Every Conv2d / Linear of the float model is a QuantizedLayer (or a split shortcut's two) in the copy."""
    names = {n for n, m in float_model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    inner = quantized.model
    assert not any(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in inner.modules())
    done = {n for n, m in inner.named_modules() if isinstance(m, QuantizedLayer)}
    assert {n.rsplit(".", 1)[0] if n.endswith((".hidden", ".skip")) else n for n in done} == names


def _round_trip(pipe, name, tmp_path, run):
    before = run(pipe)
    getattr(pipe, name).save_pretrained(tmp_path / name)
    assert not list((tmp_path / name).rglob("*.bin"))
    loaded = QuantizedModel.from_pretrained(tmp_path / name)
    pipe.register_modules(**{name: loaded})
    assert torch.equal(run(pipe), before)


def tiny_sd(with_text_encoder: bool):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from helpers import tiny_text_components

    parts = tiny_text_components()
    if not with_text_encoder:
        parts["text_encoder"] = parts["tokenizer"] = None
    pipe = StableDiffusionPipeline(**parts, scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sd_unet_calibrates_on_prompt_embeddings_and_quantises(tmp_path):
    """A Stable Diffusion 1.x pipeline without text encoders: prompt embeddings cycle over the calibration images,
    CFG's conditional and negative rows are both recorded, stored once per row; W8A8 output stays near FP32."""
    pipe = tiny_sd(with_text_encoder=False)
    g = torch.Generator().manual_seed(0)
    embeds = {"prompt_embeds": torch.randn(3, 16, 32, generator=g), "negative_prompt_embeds": torch.randn(3, 16, 32, generator=g)}
    calib = build_calibration_set(pipe, 24, "ndtc", num_inference_steps=4, batch_size=4, prompt_embeds=embeds,
                                  guidance_scale=5.0, height=16, width=16)
    states = calib.cond["encoder_hidden_states"]
    assert states.shape == (24, 16, 32) and calib.sample.shape == (24, 4, 8, 8)
    # rows in batches of 4 images: [negative; conditional] (diffusers' order), prompts cycled image by image
    for row in range(24):
        batch, local = divmod(row, 8)
        image = 4 * batch + local % 4
        source = embeds["negative_prompt_embeds" if local < 4 else "prompt_embeds"][image % 3]
        assert torch.equal(states[row], source)
    unet = pipe.unet
    quantize_pipeline(pipe, "w8a8", "ndtc", n=24, num_inference_steps=4, batch_size=4, prompt_embeds=embeds,
                      guidance_scale=5.0, height=16, width=16)
    assert isinstance(pipe.unet, QuantizedModel)
    _every_layer_quantised(unet, pipe.unet)
    inputs = calib.inputs(slice(0, 24))
    with torch.no_grad():
        assert _sqnr(pipe.unet(**inputs).sample, unet(**inputs).sample) > 25
    run = lambda p: p(prompt_embeds=embeds["prompt_embeds"][:2], negative_prompt_embeds=embeds["negative_prompt_embeds"][:2],  # noqa: E731
                      num_inference_steps=3, height=16, width=16, output_type="latent", generator=torch.Generator().manual_seed(1)).images
    _round_trip(pipe, "unet", tmp_path, run)


def test_sd_calibration_from_prompts():
    """With the text encoder present, prompts are encoded by the pipeline itself: the same rows as passing the
    embeddings it makes of them."""
    pipe = tiny_sd(with_text_encoder=True)
    prompts = ["a red cat", "two dogs"]
    by_prompt = build_calibration_set(pipe, 8, "uniform", num_inference_steps=3, steps_used=3, prompts=prompts, height=16, width=16)
    cond, neg = pipe.encode_prompt(prompts, "cpu", 1, True)
    by_embeds = build_calibration_set(pipe, 8, "uniform", num_inference_steps=3, steps_used=3, height=16, width=16,
                                      prompt_embeds={"prompt_embeds": cond, "negative_prompt_embeds": neg})
    # equal up to float rounding: the pipeline encodes the prompts in batches of another size
    torch.testing.assert_close(by_prompt.cond["encoder_hidden_states"], by_embeds.cond["encoder_hidden_states"])
    torch.testing.assert_close(by_prompt.sample, by_embeds.sample)


def _tiny_vae(latent_channels):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=16)


def tiny_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=8)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(4),
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    g = torch.Generator().manual_seed(1)
    embeds = {"prompt_embeds": torch.randn(2, 7, 16, generator=g), "pooled_prompt_embeds": torch.randn(2, 8, generator=g),
              "negative_prompt_embeds": torch.randn(2, 7, 16, generator=g),
              "negative_pooled_prompt_embeds": torch.randn(2, 8, generator=g)}
    return pipe, embeds


def tiny_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                         num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                         axes_dims_rope=[2, 2, 4])
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(4), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    g = torch.Generator().manual_seed(1)
    embeds = {"prompt_embeds": torch.randn(2, 7, 16, generator=g), "pooled_prompt_embeds": torch.randn(2, 8, generator=g),
              "negative_prompt_embeds": torch.randn(2, 7, 16, generator=g),
              "negative_pooled_prompt_embeds": torch.randn(2, 8, generator=g)}
    return pipe, embeds


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_transformers_quantise_every_layer_and_round_trip(family, tmp_path):
    """SD3 and Flux transformers, calibrated through their own diffusers pipelines on prompt embeddings (Flux with
    true CFG: two calls per step, both recorded): every Conv2d / Linear is quantised, the patch embedding that
    reads x_t keeps float inputs and 8-bit weights, W8A8 output stays near FP32, and save / load is exact."""
    pipe, embeds = tiny_sd3() if family == "sd3" else tiny_flux()
    pipe.set_progress_bar_config(disable=True)
    extra = {"true_cfg_scale": 2.0, "guidance_scale": 1.0} if family == "flux" else {"guidance_scale": 4.0}
    transformer = pipe.transformer
    calib = build_calibration_set(pipe, 16, "ndtc", num_inference_steps=4, batch_size=2, prompt_embeds=embeds,
                                  height=16, width=16, **extra)
    assert calib.sample_name == "hidden_states" and len(calib.cond["encoder_hidden_states"]) == 16
    if family == "flux":
        assert set(calib.shared) >= {"img_ids", "txt_ids"}  # no batch dimension: stored once
    quantized = quantize_model(transformer, calib, "w8a8")
    _every_layer_quantised(transformer, quantized)
    reader = "pos_embed.proj" if family == "sd3" else "x_embedder"
    assert quantized.recipe["layers"][reader] == [8, None] or quantized.recipe["layers"][reader] == (8, None)
    assert quantized.recipe["layers"]["proj_out"][0] == 8
    inputs = calib.inputs(slice(0, 16))
    with torch.no_grad():
        assert _sqnr(quantized(**inputs, return_dict=False)[0], transformer(**inputs, return_dict=False)[0]) > 25
    pipe.register_modules(transformer=quantized)
    run = lambda p: p(**{k: v[:1] for k, v in embeds.items()}, num_inference_steps=2, height=16, width=16,  # noqa: E731
                      output_type="latent", generator=torch.Generator().manual_seed(2), **extra).images
    _round_trip(pipe, "transformer", tmp_path, run)


def _qdrop_1d_search(x, bits=8, side=None):
    """QDrop's UniformAffineQuantizer.perform_1D_search (per tensor, symmetric / one-sided), transcribed; ``side``
    is its one_side_dist, set from the first batch it sees."""
    side = side or ("pos" if x.min() >= 0 else "neg" if x.max() <= 0 else "no")
    xrange = torch.max(x.min().abs(), x.max())
    thres = xrange / 100 * torch.arange(1, 101, dtype=x.dtype)
    new_min = torch.zeros_like(thres) if side == "pos" else -thres
    new_max = torch.zeros_like(thres) if side == "neg" else thres
    scale = torch.max((new_max - new_min) / (2**bits - 1), torch.tensor(1e-8))
    zero_point = torch.clamp(-torch.round(new_min / scale), 0, 2**bits - 1)[:, None]
    x_int = torch.max(torch.min(torch.round(x.view(1, -1) / scale[:, None]), 2**bits - 1 - zero_point), -zero_point)
    score = (x_int * scale[:, None] - x.view(1, -1)).abs().pow(2.4).mean(1)
    i = torch.argmin(score)
    return new_min[i], new_max[i]


@pytest.mark.parametrize("shift", [0.0, 5.0, -5.0])  # two-sided, all >= 0, all <= 0
def test_symmetric_search_is_qdrops_1d_search(shift):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(1)) * 2
    x = x.abs() if shift > 0 else -x.abs() if shift < 0 else x
    x[0] = 9.0 if shift >= 0 else -9.0  # an outlier the search clips
    from diffkit.quant.scales import one_sided, symmetric_range

    low, high = symmetric_range(x, 8, one_sided(x))
    expected = _qdrop_1d_search(x)
    torch.testing.assert_close((low, high), (expected[0].float(), expected[1].float()))
    assert (low == 0) == (shift > 0) and (high == 0) == (shift < 0)


def test_symmetric_ema_calibration_is_ptq4dms_procedure():
    """act_calibration="symmetric_ema": per batch of the calibration set, the 1-D search on the layer's input
    (one-sided for good if the first batch is), then range = 0.1 * new + 0.9 * previous (QDrop's
    update_quantize_range), as transcribed here for the first layer to run (the time embedding's, whose input no
    other quantised layer touches)."""
    pipe = tiny_pipeline()
    calib = build_calibration_set(pipe, 40, "uniform", num_inference_steps=4, steps_used=4, batch_size=20)
    q = quantize_model(pipe.unet, calib, "w8a8", act_calibration="symmetric_ema", batch_size=10, samples_per_layer=None)
    running, side = None, None
    for inputs in calib.batches(10):
        features = pipe.unet.time_proj(inputs["timestep"])  # what time_embedding.linear_1 reads
        side = side or ("pos" if features.min() >= 0 else "neg" if features.max() <= 0 else "no")
        best = torch.stack(_qdrop_1d_search(features, side=side))
        running = best if running is None else 0.1 * best + 0.9 * running
    assert side == "pos"  # the first batch is t = 0: sin 0 = 0, cos 0 = 1; later batches are two-sided
    layer = q.model.time_embedding.linear_1
    scale, zero = affine_params(running[0].float(), running[1].float(), 8)
    torch.testing.assert_close(layer.input_scale, scale)
    assert layer.input_zero_point == zero == 0  # [0, c]: one-sided, as the first batch decided
    with pytest.raises(ValueError, match="needs method='lp'"):
        quantize_model(pipe.unet, calib, act_calibration="symmetric_ema", method="absmax")


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


def test_sdxl_unet_calibrates_with_its_added_conditioning():
    """SDXL's UNet is calibrated through its own pipeline from prompts: the pooled text embeddings and size ids
    (``added_cond_kwargs``) are stored with every row beside the token embeddings, and W8A8 stays near FP32."""
    from test_real_models import diffusers_pipe

    pipe = diffusers_pipe("sdxl")
    kw = dict(num_inference_steps=3, batch_size=2, prompts=["a fox", "a cat"], height=16, width=16)
    calib = build_calibration_set(pipe, 8, "ndtc", **kw)
    added = calib.cond["added_cond_kwargs"]
    assert calib.cond["encoder_hidden_states"].shape[0] == 8
    assert added["text_embeds"].shape[0] == 8 and added["time_ids"].shape == (8, 6)
    unet = pipe.unet
    quantize_pipeline(pipe, "w8a8", "ndtc", n=8, **kw)
    assert isinstance(pipe.unet, QuantizedModel)
    _every_layer_quantised(unet, pipe.unet)
    inputs = calib.inputs(slice(0, 8))
    with torch.no_grad():
        assert _sqnr(pipe.unet(**inputs).sample, unet(**inputs).sample) > 25
