"""diffkit.training (the loop, the objectives, checkpoints) and diffkit.recipe (recipes, data, train, sample)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffkit.images import save_png_atomic, to_pil
from diffkit.recipe import load_recipe, sample, train, validate_recipe
from diffkit.training import diffusion_loss, fit, latest_checkpoint, step_seeds


pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
TINY_UNET = {"class": "UNet2DModel", "sample_size": 16, "in_channels": 3, "out_channels": 3, "block_out_channels": [8, 16],
             "layers_per_block": 1, "down_block_types": ["DownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "num_class_embeds": 11}


def tiny_recipe(**sections) -> dict:
    recipe = {
        "name": "tiny",
        "model": dict(TINY_UNET),
        "scheduler": {"class": "DPMSolverMultistepScheduler", "prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2"},
        "data": {"source": "digits"},
        "conditioning": {"type": "class", "p_uncond": 0.2},
        "optimizer": {"lr": 0.002},
        "lr_schedule": {"name": "cosine", "warmup_steps": 2},
        "training": {"steps": 6, "batch_size": 6, "checkpoint_every": 2, "gradient_accumulation_steps": 2, "log_every": 2},
    }
    for name, value in sections.items():
        recipe[name] = {**recipe.get(name, {}), **value} if isinstance(value, dict) else value
    return recipe


def _weights(run: Path, component: str = "unet") -> dict:
    return load_file(str(run / "model" / component / "diffusion_pytorch_model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the loop ------------------------------------------------------------------------------------------------------


def test_a_stopped_and_resumed_run_reaches_the_uninterrupted_weights_bit_for_bit(tmp_path):
    """A run stopped after step 3 (checkpoint at 3), or killed after step 3 (its last checkpoint at step 2), and
    resumed, ends with the weights, EMA and optimizer moments of a run that was never interrupted."""
    recipe = tiny_recipe(sampling={"every": 3, "num_images": 10, "num_inference_steps": 2})
    whole = train(recipe, tmp_path / "whole", progress=False)
    assert whole.step == 6 and whole.resumed_from is None and [r["step"] for r in whole.log] == [2, 4, 6]
    stopped = train(recipe, tmp_path / "stopped", stop_after=3, progress=False)
    assert stopped.step == 3 and not (tmp_path / "stopped" / "model").exists()
    assert latest_checkpoint(tmp_path / "stopped" / "checkpoints").name == "step-0000003"
    resumed = train(recipe, tmp_path / "stopped", progress=False)
    assert resumed.resumed_from == 3
    # a kill between checkpoints: the work after step 2 is lost and redone
    train(recipe, tmp_path / "killed", stop_after=3, progress=False)
    shutil.rmtree(tmp_path / "killed" / "checkpoints" / "step-0000003")
    again = train(recipe, tmp_path / "killed", progress=False)
    assert again.resumed_from == 2
    for run in ("stopped", "killed"):
        assert _same(_weights(tmp_path / "whole"), _weights(tmp_path / run)), run
        for name in ("model", "ema", "optimizer"):
            a = load_file(str(tmp_path / "whole" / "checkpoints" / "step-0000006" / f"{name}.safetensors"))
            b = load_file(str(tmp_path / run / "checkpoints" / "step-0000006" / f"{name}.safetensors"))
            assert _same(a, b), (run, name)
    # the EMA is what was saved, and it differs from the raw weights
    raw = load_file(str(tmp_path / "whole" / "checkpoints" / "step-0000006" / "model.safetensors"))
    assert not _same(raw, _weights(tmp_path / "whole"))
    assert sorted(p.name for p in (tmp_path / "whole" / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    assert len(list((tmp_path / "whole" / "checkpoints").iterdir())) == 2  # keep_checkpoints


@pytest.mark.slow
def test_a_run_killed_by_the_os_resumes_to_the_same_weights(tmp_path):
    """SIGKILL in the middle of a real run (a process, not a simulated stop), then resume: the same weights."""
    recipe = tiny_recipe(training={"steps": 40, "checkpoint_every": 4, "keep_checkpoints": 100})
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    script = f"from diffkit.recipe import train; train({str(tmp_path / 'recipe.json')!r}, {str(tmp_path / 'killed')!r}, progress=False)"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (checkpoints.is_dir() and len(list(checkpoints.glob("step-*"))) >= 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = latest_checkpoint(checkpoints)
    assert done is not None and int(done.name[5:]) < 40, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "model").exists()
    resumed = train(tmp_path / "recipe.json", tmp_path / "killed", progress=False)
    assert resumed.resumed_from == int(done.name[5:])
    train(tmp_path / "recipe.json", tmp_path / "whole", progress=False)
    assert _same(_weights(tmp_path / "whole"), _weights(tmp_path / "killed"))


def test_accumulated_micro_batches_average_into_one_step():
    """With plain SGD on w and loss (w - g)^2 where g is the micro-batch's draw from its generator, one step moves
    w by -lr * mean over micro-batches of 2 (w - g): every micro-batch counts, each once, divided by their number."""
    w = torch.nn.Parameter(torch.zeros(()))
    model = torch.nn.Module()
    model.w = w
    draws = []

    def loss_fn(net, step, generator):
        g = torch.rand((), generator=generator)
        draws.append((step, g.item()))
        return (net.w - g) ** 2

    result = fit(model, loss_fn, optimizer=torch.optim.SGD([w], lr=0.1), steps=2, gradient_accumulation_steps=3,
                 seed=7, progress=False)
    assert [s for s, _ in draws] == [0, 0, 0, 1, 1, 1]
    expected = torch.zeros((), dtype=torch.float64)
    for step in range(2):
        gs = [torch.rand((), generator=torch.Generator().manual_seed(step_seeds(7, step, m, 0)[0])).item() for m in range(3)]
        assert [g for s, g in draws if s == step] == gs
        expected = expected - 0.1 * sum(2 * (expected - g) for g in gs) / 3
    assert result.model.w.item() == pytest.approx(expected.item(), abs=1e-6)


def test_fit_refuses_bad_settings_and_a_non_finite_loss(tmp_path):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ok = dict(optimizer=optimizer, steps=2, progress=False)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        fit(model, lambda *a: torch.zeros(()), **{**ok, "steps": 0})
    with pytest.raises(ValueError, match="ema_decay"):
        fit(model, lambda *a: torch.zeros(()), **ok, ema_decay=1.5)
    with pytest.raises(ValueError, match="need a checkpoint_dir"):
        fit(model, lambda *a: torch.zeros(()), **ok, checkpoint_every=1)
    with pytest.raises(ValueError, match="finite scalar"):
        fit(model, lambda net, step, g: net(torch.ones(1, 2)).sum() * float("nan"), **ok)


def test_a_checkpoint_of_another_recipe_is_not_resumed(tmp_path):
    recipe = tiny_recipe(training={"steps": 2})
    train(recipe, tmp_path / "run", stop_after=1, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        train(tiny_recipe(training={"steps": 2}, optimizer={"lr": 0.01}), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="resume it, or pass overwrite"):
        train(recipe, tmp_path / "run", resume=False, progress=False)
    # bookkeeping keys may change between a run and its resume
    train(tiny_recipe(training={"steps": 2, "log_every": 1}), tmp_path / "run", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="no diffkit training run"):
        train(recipe, tmp_path / "other", progress=False)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


# -- objectives ----------------------------------------------------------------------------------------------------


class _FlowOracle(torch.nn.Module):
    """For data x0 = 0: x_t = sigma eps, so the velocity eps - x0 is x_t / sigma with sigma = t / N."""

    def forward(self, x, t, return_dict=True):
        return (x / (t.view(-1, 1, 1, 1) / 1000),)


def test_flow_matching_targets_the_velocity_and_shifts_sigma():
    """On the flow path (x_t = (1 - sigma) x0 + sigma eps, t = 1000 sigma) the target is the velocity eps - x0."""
    from diffkit.schedule import NoiseSchedule

    flow = NoiseSchedule.flow_matching(1000)
    x0 = torch.zeros(4096, 1, 2, 2)
    for sampling in ("uniform", "logit_normal"):
        loss = diffusion_loss(_FlowOracle(), flow, "flow", x0, generator=torch.Generator().manual_seed(0),
                              timestep_sampling=sampling)
        assert loss < 1e-8
    # an x0-predicting oracle (output 0) is wrong for the velocity target: loss E[eps^2] = 1
    zero = lambda x, t, return_dict=True: (torch.zeros_like(x),)
    assert diffusion_loss(zero, flow, "flow", x0, generator=torch.Generator().manual_seed(0)).item() == pytest.approx(1.0, abs=0.05)
    seen = []
    spy = lambda x, t, return_dict=True: seen.append(t) or (torch.zeros_like(x),)
    diffusion_loss(spy, flow, "flow", x0, generator=torch.Generator().manual_seed(0), shift=3.0)
    u = torch.rand(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(seen[0].double(), 1000 * 3 * u / (1 + 2 * u), atol=1e-3)  # diffusers' shift of sigma
    with pytest.raises(ValueError, match="timestep_sampling"):
        diffusion_loss(zero, flow, "flow", x0, timestep_sampling="cosine")
    vp = NoiseSchedule.from_config({"beta_schedule": "squaredcos_cap_v2"})
    with pytest.raises(ValueError, match="flow-matching options"):
        diffusion_loss(zero, vp, "epsilon", x0, shift=3.0)


# -- recipes -------------------------------------------------------------------------------------------------------


def test_recipes_load_from_toml_like_json_and_fill_defaults(tmp_path):
    (tmp_path / "r.toml").write_text(
        'name = "tiny"\n[model]\nclass = "UNet2DModel"\nsample_size = 16\nin_channels = 3\nout_channels = 3\n'
        'block_out_channels = [8, 16]\nlayers_per_block = 1\ndown_block_types = ["DownBlock2D", "DownBlock2D"]\n'
        'up_block_types = ["UpBlock2D", "UpBlock2D"]\nnorm_num_groups = 4\nnum_class_embeds = 11\n'
        '[scheduler]\nclass = "DPMSolverMultistepScheduler"\nprediction_type = "v_prediction"\n'
        'beta_schedule = "squaredcos_cap_v2"\n[data]\nsource = "digits"\n[conditioning]\ntype = "class"\np_uncond = 0.2\n'
        '[optimizer]\nlr = 0.002\n[lr_schedule]\nname = "cosine"\nwarmup_steps = 2\n'
        '[training]\nsteps = 6\nbatch_size = 6\ncheckpoint_every = 2\ngradient_accumulation_steps = 2\nlog_every = 2\n'
    )
    (tmp_path / "r.json").write_text(json.dumps(tiny_recipe()))
    assert load_recipe(tmp_path / "r.toml") == load_recipe(tmp_path / "r.json")
    filled = load_recipe(tmp_path / "r.json")
    assert filled["training"]["ema_decay"] == 0.999 and filled["optimizer"]["betas"] == [0.9, 0.999]
    assert filled["data"] == {"source": "digits", "split": "train", "set": "mnist", "colors": "random", "color_seed": 0}


@pytest.mark.parametrize("change, needle", [
    ({"trainer": {}}, "unknown section 'trainer'"),
    ({"model": {**TINY_UNET, "class": "UNet3DModel"}}, "model.class must be one of UNet2DModel, DiTTransformer2DModel"),
    ({"model": {**TINY_UNET, "channels": 4}}, "UNet2DModel has no argument 'channels'"),
    ({"scheduler": {"class": "NoSuchScheduler"}}, "scheduler.class must be a diffusers SchedulerMixin"),
    ({"scheduler": {"class": "DDPMScheduler", "prediction_type": "x0"}}, "prediction_type must be one of"),
    ({"data": {"source": "imagenet"}}, "data.source must be one of digits, folder"),
    ({"data": {"source": "digits", "split": "test"}}, "the test split is held out"),
    ({"data": {"source": "folder", "resolution": 16}}, "data.path must name an image folder"),
    ({"conditioning": {"type": "class", "p_uncond": 1.5}}, r"conditioning.p_uncond must be a number >= 0 and <= 1"),
    ({"conditioning": {"type": "none"}}, "unconditional recipe needs model.num_class_embeds absent"),
    ({"model": {**TINY_UNET, "num_class_embeds": None}}, "num_class_embeds = classes \\+ 1"),
    ({"optimizer": {"lr": float("nan")}}, "optimizer.lr must be a number > 0"),
    ({"optimizer": {"momentum": 0.9}}, "optimizer has unknown key 'momentum'"),
    ({"lr_schedule": {"name": "step"}}, "lr_schedule.name must be one of constant, cosine"),
    ({"training": {"steps": 0, "batch_size": 4}}, "training.steps must be an int >= 1"),
    ({"training": {"steps": 4, "batch_size": 4, "mixed_precision": "fp8"}}, "mixed_precision must be one of"),
    ({"training": {"steps": 4, "batch_size": 4, "ema_decay": 1.0}}, "ema_decay must be below 1"),
    ({"training": {"steps": 4, "batch_size": 4, "timestep_sampling": "logit_normal"}}, "is for flow matching"),
    ({"model": {**TINY_UNET, "sample_size": 32}}, "bundled digits are 16x16"),
    ({"scheduler": {"class": "DDPMScheduler"}, "sampling": {"every": 10}}, "sampling.solver names one of"),
])
def test_a_bad_recipe_is_refused_with_the_key_named(change, needle):
    recipe = tiny_recipe()
    recipe.update(change)
    with pytest.raises(ValueError, match=needle):
        validate_recipe(recipe)


def test_a_scheduler_diffkit_does_not_reproduce_samples_with_a_named_solver():
    recipe = tiny_recipe(scheduler={"class": "DDPMScheduler", "prediction_type": "v_prediction"},
                         sampling={"every": 10, "solver": "ddim"})
    recipe["scheduler"] = {"class": "DDPMScheduler", "prediction_type": "v_prediction"}
    assert validate_recipe(recipe)["sampling"]["solver"] == "ddim"


def test_default_recipe_reproduces_the_shipped_training_settings():
    """The recipe is what scripts/train_default.py ran to make assets/default (its training_log.json args)."""
    import diffkit

    args = json.loads((diffkit.DEFAULT_MODEL / "training_log.json").read_text())["args"]
    recipe = load_recipe("default")
    training = recipe["training"]
    assert (training["steps"], training["batch_size"], training["ema_decay"], training["seed"]) == (
        args["steps"], args["batch_size"], args["ema"], args["seed"])
    assert recipe["optimizer"]["lr"] == args["lr"] and recipe["lr_schedule"] == {"name": "cosine", "warmup_steps": args["warmup"]}
    assert recipe["conditioning"]["p_uncond"] == args["p_uncond"] and training["max_grad_norm"] == 1.0
    from diffkit.recipe import lr_lambda

    factor = lr_lambda(recipe)  # the old script's lambda: min(1, (s + 1) / warmup) (1 + cos(pi s / steps)) / 2
    for s in (0, 50, 99, 100, 2000, 3999):
        assert factor(s) == pytest.approx(min(1.0, (s + 1) / 100) * 0.5 * (1 + torch.cos(torch.tensor(s / 4000 * torch.pi)).item()), abs=1e-7)


# -- backbones, objectives, data -----------------------------------------------------------------------------------


TINY_DIT = {"class": "DiTTransformer2DModel", "sample_size": 16, "in_channels": 3, "num_layers": 1, "num_attention_heads": 2,
            "attention_head_dim": 8, "patch_size": 4, "num_embeds_ada_norm": 10}


@pytest.mark.parametrize("model, scheduler", [
    (TINY_DIT, {"class": "FlowMatchEulerDiscreteScheduler", "shift": 1.0}),
    (TINY_DIT, {"class": "DDIMScheduler", "prediction_type": "epsilon"}),
    (TINY_UNET, {"class": "FlowMatchEulerDiscreteScheduler", "shift": 2.0}),
])
def test_transformer_and_flow_recipes_train_save_and_sample(tmp_path, model, scheduler):
    recipe = tiny_recipe(model=model, scheduler=scheduler, training={"steps": 2, "batch_size": 4, "gradient_accumulation_steps": 1},
                         sampling={"every": 2, "num_images": 10, "num_inference_steps": 3})
    recipe["model"], recipe["scheduler"] = model, scheduler
    result = train(recipe, tmp_path / "run", progress=False)
    assert result.log[-1]["loss"] > 0 and (tmp_path / "run" / "samples" / "step-0000002.png").is_file()
    import diffusers

    folder = tmp_path / "run" / "model"
    if model["class"] == "UNet2DModel":  # a flow UNet is a GuidedPipeline: it samples as recipe.sample does
        import diffkit

        pipe = diffkit.load_pipeline(folder)
        pipe.set_progress_bar_config(disable=True)
        noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        ours = sample(pipe.unet, pipe.scheduler, labels=torch.tensor([1, 2]), null_label=10, num_inference_steps=3,
                      generator=torch.Generator().manual_seed(0))
        theirs = pipe(class_labels=[1, 2], latents=noise, num_inference_steps=3, guidance_scale=3.0, output_type="pt").images
        assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        assert torch.allclose(ours, theirs * 2 - 1, atol=1e-5)
    if model["class"] == "DiTTransformer2DModel":
        loaded = diffusers.DiTTransformer2DModel.from_pretrained(folder / "transformer")
        loaded_scheduler = getattr(diffusers, scheduler["class"]).from_pretrained(folder / "scheduler")
        images = sample(loaded, loaded_scheduler, labels=torch.tensor([1, 2]), null_label=10, num_inference_steps=2,
                        generator=torch.Generator().manual_seed(0))
        assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
        # diffusers' per-block label dropout is off in what the recipe builds: two forwards in train mode agree
        from diffkit.recipe import build_model

        rebuilt = build_model(load_recipe(tmp_path / "run" / "recipe.json")).train()
        x, t, y = torch.randn(64, 3, 16, 16), torch.full((64,), 500), torch.arange(64) % 10
        assert torch.equal(rebuilt(x, t, y).sample, rebuilt(x, t, y).sample)
        # diffusers' own drops 10% of the labels in each block (the chance that none of 64 drops: 1e-3)
        assert not torch.equal(loaded.train()(x, t, y).sample, loaded(x, t, y).sample)


def test_unconditional_latent_training_on_an_image_folder(tmp_path):
    """An unlabelled folder of 32x32 images, a tiny VAE (factor 2): the UNet learns 16x16 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=32)
    vae.save_pretrained(tmp_path / "vae")
    (tmp_path / "images").mkdir()
    for i, image in enumerate(to_pil(torch.rand(6, 3, 40, 48) * 2 - 1)):  # not square: resized and centre-cropped
        save_png_atomic(image, tmp_path / "images" / f"{i}.png")
    recipe = tiny_recipe(data={"source": "folder", "path": str(tmp_path / "images"), "resolution": 32, "random_flip": True},
                         conditioning={"type": "none"}, vae=str(tmp_path / "vae"),
                         training={"steps": 2, "batch_size": 3, "gradient_accumulation_steps": 1},
                         sampling={"every": 2, "num_images": 4, "num_inference_steps": 2})
    recipe["conditioning"] = {"type": "none"}
    recipe["model"] = {**TINY_UNET, "in_channels": 4, "out_channels": 4, "num_class_embeds": None}
    del recipe["model"]["num_class_embeds"]
    train(recipe, tmp_path / "run", progress=False)
    import PIL.Image

    assert PIL.Image.open(tmp_path / "run" / "samples" / "step-0000002.png").size == (2 * 64, 2 * 64)  # 4 decoded 32x32 tiles
    assert (tmp_path / "run" / "model" / "vae" / "config.json").is_file()
    wrong = dict(recipe, model={**recipe["model"], "sample_size": 32})
    with pytest.raises(ValueError, match="model.sample_size must be 16"):
        train(wrong, tmp_path / "run2", progress=False)


def test_class_sub_folders_are_the_labels_and_the_model_must_fit_them(tmp_path):
    for label in ("cat", "dog", "owl"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i, image in enumerate(to_pil(torch.rand(2, 3, 16, 16) * 2 - 1)):
            save_png_atomic(image, tmp_path / "images" / label / f"{i}.png")
    data = {"source": "folder", "path": str(tmp_path / "images"), "resolution": 16}
    with pytest.raises(ValueError, match="num_class_embeds must be 4 for the 3 classes"):
        train(tiny_recipe(data=data), tmp_path / "run", progress=False)
    recipe = tiny_recipe(data=data, training={"steps": 1, "batch_size": 4, "gradient_accumulation_steps": 1})
    recipe["data"], recipe["model"] = data, {**TINY_UNET, "num_class_embeds": 4}
    assert train(recipe, tmp_path / "run", progress=False).step == 1


def test_bf16_mixed_precision_trains_on_cpu(tmp_path):
    """The recipe's mixed precision reaches the forward passes: the same run in bf16 and in float32 differ."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    try:
        recipe = tiny_recipe(training={"steps": 2, "mixed_precision": "bf16"})
        result = train(recipe, tmp_path / "bf16", accelerator=Accelerator(mixed_precision="bf16", cpu=True), progress=False)
        assert result.step == 2 and all(p.dtype == torch.float32 for p in result.model.parameters())
        AcceleratorState._reset_state(True)
        recipe["training"]["mixed_precision"] = "no"
        train(recipe, tmp_path / "fp32", accelerator=Accelerator(mixed_precision="no", cpu=True), progress=False)
        assert not _same(_weights(tmp_path / "bf16"), _weights(tmp_path / "fp32"))
    finally:
        AcceleratorState._reset_state(True)


def test_the_readme_recipe_is_valid(tmp_path):
    """The TOML recipe in the README's Training section loads and builds (documentation that cannot drift)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Training"):]
    block = section[section.index("```toml\n") + 8:]
    (tmp_path / "readme.toml").write_text(block[: block.index("```")])
    recipe = load_recipe(tmp_path / "readme.toml")
    from diffkit.recipe import build_model

    assert type(build_model(recipe)).__name__ == "DiTTransformer2DModel" and recipe["training"]["mixed_precision"] == "bf16"


def test_a_checkpoint_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """A failure while a checkpoint is written (disk full, a kill) leaves no step folder and no staging folder."""
    import diffkit.training as training

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    real = training.save_file

    def failing(tensors, path):
        if str(path).endswith("optimizer.safetensors"):
            raise OSError("No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(training, "save_file", failing)
    with pytest.raises(OSError, match="No space"):
        training.save_training_state(tmp_path / "step-0000001", model=model, optimizer=optimizer, lr_scheduler=None,
                                     ema=None, scaler=None, step=1, log=[], fingerprint=None)
    assert list(tmp_path.iterdir()) == [] and latest_checkpoint(tmp_path) is None
