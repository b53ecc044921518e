"""ForwardModelPipeline: it is the DFM sampler with covering target views, round-trips through save/load with
identical samples (custom SignalMLP component included), and refuses bad input with the shapes named."""

import pytest
import torch
from diffusers import DDIMScheduler

import diffkit
from diffkit import NoiseSchedule, make_timesteps
from diffkit.dfm import SignalMLP, WindowView, image_generator, sample_signal
from diffkit.pipelines import ForwardModelPipeline


def tiny_pipeline(kind="window"):
    torch.manual_seed(0)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                              clip_sample=False)
    # eval(), as from_pretrained leaves a loaded model: the UNet's attention differs by ~1e-7 in train mode
    if kind == "window":
        return ForwardModelPipeline(SignalMLP(1, 20, 32, 2).eval(), scheduler, "window", 20, 8, 1)
    return ForwardModelPipeline(image_generator(8, 3, (16, 16)).eval(), scheduler, "crop", 8, 5, 3)


def test_pipeline_is_the_sampler_over_covering_views():
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    fm = WindowView(20, 8)
    view = torch.tensor([0, 6, 12])
    obs = fm(torch.randn(3, 1, 20), view)
    out = pipe(obs, view, num_inference_steps=5, generator=torch.Generator().manual_seed(1))
    assert [v[0].item() for v in fm.covering_views(1)] == [0, 6, 12]  # 3 windows of 8 cover 20
    schedule = NoiseSchedule.from_config(pipe.scheduler.config)
    timesteps = make_timesteps(schedule, "ddim", 5, pipe.scheduler.config)
    expected, _ = sample_signal(pipe.signal_model, fm, schedule, [(obs, view)], fm.covering_views(3), timesteps,
                                generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.signals, expected)
    assert len(out.observations) == 3


@pytest.mark.parametrize("kind", ["window", "crop"])
def test_save_and_load_round_trip(kind, tmp_path):
    pipe = tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    fm = pipe.forward_model
    view = fm.random_views(2, torch.Generator().manual_seed(0))
    obs = fm(torch.randn(2, *fm.signal_shape), view)
    before = pipe(obs, view, num_inference_steps=3, generator=torch.Generator().manual_seed(2)).signals
    pipe.save_pretrained(tmp_path / "dfm")
    loaded = diffkit.load_pipeline(tmp_path / "dfm")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, ForwardModelPipeline) and loaded.config.forward_kind == kind
    after = loaded(obs, view, num_inference_steps=3, generator=torch.Generator().manual_seed(2)).signals
    assert torch.equal(before, after)
    assert not list((tmp_path / "dfm").rglob("*.bin"))  # safetensors only


def test_bad_input_is_refused():
    pipe = tiny_pipeline()
    view = torch.tensor([0, 3])
    with pytest.raises(ValueError, match=r"observation has shape \(2, 1, 7\)"):
        pipe(torch.zeros(2, 1, 7), view)
    with pytest.raises(ValueError, match="NaN"):
        pipe(torch.full((2, 1, 8), float("nan")), view)
    with pytest.raises(ValueError, match="start indices"):
        pipe(torch.zeros(2, 1, 8), torch.tensor([0, 13]))
    with pytest.raises(ValueError, match="forward_kind"):
        ForwardModelPipeline(pipe.signal_model, pipe.scheduler, "fourier")
    with pytest.raises(ValueError, match="pil"):
        pipe(torch.zeros(2, 1, 8), view, output_type="pil")
