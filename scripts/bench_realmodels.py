"""diffkit against diffusers on the models people have: Stable Diffusion 1.x, SDXL, SD3 and Flux.

For each family the diffusers pipeline and ``GuidedPipeline.from_pipe(it)`` make the same call (prompt embeddings,
the family's default guidance, its usual scheduler, equal steps, the same initial noise): the table gives
max |diffkit - diffusers| over the decoded images in [0, 1] and the time of a whole call, diffkit / diffusers
(median of interleaved repeats after a warm-up; the goal is <= 1.05). Flux runs guidance-distilled (embedded
guidance 3.5, no true CFG), as FLUX.1-dev is used.

- default / ``--quick``: tiny random components built in code (``tests/helpers.py``) on the CPU, 16x24 images, one
  thread; the calls encode real prompts with the tiny text encoders.
- ``--gpu``: SD-sized random components at 512x512 on CUDA, prompt embeddings of the real shapes (no text encoders):
  the SD 1.5 and SDXL UNets and VAEs with their published configs in float16, the SD3-medium MMDiT and the FLUX.1-dev
  transformer (full size, 12B parameters) with 16-channel VAEs in bfloat16. Adds the peak GPU memory of one gradient
  through the SD 1.5 sampler (AdjointDPM's adjoint vs checkpointed backprop, 10 and 20 steps, latents out). Refused
  with a clear message where CUDA is unavailable.

    python scripts/bench_realmodels.py            # CPU, tiny components, 20 steps, 5 repeats
    python scripts/bench_realmodels.py --quick    # 4 steps, 2 repeats
    python scripts/bench_realmodels.py --gpu      # a CUDA machine; writes bench_realmodels_gpu.md / .png
"""

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny component builders

from diffkit.bench import markdown_table, write_results  # noqa: E402
from diffkit.pipelines import AdjointDPMPipeline, GuidedPipeline  # noqa: E402


FAMILIES = ("sd", "sdxl", "sd3", "flux")
SCHEDULERS = {  # what each family's checkpoints ship or users pick
    "sd": ("DPMSolverMultistepScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
    "sdxl": ("EulerDiscreteScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            timestep_spacing="leading", steps_offset=1)),
    "sd3": ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
    "flux": ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                     base_image_seq_len=256, max_image_seq_len=4096)),
}


def _scheduler(family):
    import diffusers

    name, config = SCHEDULERS[family]
    return getattr(diffusers, name)(**config)


TEXT_COMPONENTS = {"sd": ("text_encoder", "tokenizer"),
                   "sdxl": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
                   "sd3": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"),
                   "flux": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}


def diffusers_pipeline(family: str, components: dict):
    import diffusers

    components = {**{name: None for name in TEXT_COMPONENTS[family]}, **components}  # absent encoders: embeddings

    if family == "sd":
        return diffusers.StableDiffusionPipeline(**components, scheduler=_scheduler(family), safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
    if family == "sdxl":
        return diffusers.StableDiffusionXLPipeline(**components, scheduler=_scheduler(family), add_watermarker=False)
    cls = diffusers.StableDiffusion3Pipeline if family == "sd3" else diffusers.FluxPipeline
    return cls(**components, scheduler=_scheduler(family))


# -- components ------------------------------------------------------------------------------------------------


def tiny_components(family: str) -> dict:
    from helpers import tiny_flux_components, tiny_sd3_components, tiny_sdxl_components, tiny_text_components

    return {"sd": tiny_text_components, "sdxl": tiny_sdxl_components, "sd3": tiny_sd3_components,
            "flux": lambda: tiny_flux_components(guidance_embeds=True)}[family]()


def sd_sized_components(family: str) -> dict:
    """Random components with the published configs (built on the current default device and dtype); no text
    encoders: the calls pass prompt embeddings."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    four = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
    if family == "sd":  # runwayml/stable-diffusion-v1-5
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        return {"unet": unet, "vae": AutoencoderKL(**four, latent_channels=4, scaling_factor=0.18215)}
    if family == "sdxl":  # stabilityai/stable-diffusion-xl-base-1.0
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        return {"unet": unet, "vae": AutoencoderKL(**four, latent_channels=4, scaling_factor=0.13025, force_upcast=True)}
    sixteen = dict(four, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    if family == "sd3":  # stabilityai/stable-diffusion-3-medium-diffusers
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            pos_embed_max_size=192)
        return {"transformer": transformer, "vae": AutoencoderKL(**sixteen, scaling_factor=1.5305, shift_factor=0.0609)}
    transformer = FluxTransformer2DModel(guidance_embeds=True)  # black-forest-labs/FLUX.1-dev (the class defaults)
    return {"transformer": transformer, "vae": AutoencoderKL(**sixteen, scaling_factor=0.3611, shift_factor=0.1159)}


EMBEDDINGS = {  # (prompt embeddings (tokens, width), pooled width) of the real text encoders
    "sd": ((77, 768), None), "sdxl": ((77, 2048), 1280), "sd3": ((333, 4096), 2048), "flux": ((512, 4096), 768)}


def random_embeddings(family: str, device, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    (tokens, width), pooled = EMBEDDINGS[family]
    out = {"prompt_embeds": torch.randn(1, tokens, width, generator=g),
           "negative_prompt_embeds": torch.randn(1, tokens, width, generator=g)}
    if pooled:
        out.update(pooled_prompt_embeds=torch.randn(1, pooled, generator=g),
                   negative_pooled_prompt_embeds=torch.randn(1, pooled, generator=g))
    if family == "flux":  # guidance-distilled: no negative branch
        out = {k: v for k, v in out.items() if not k.startswith("negative")}
    return {k: v.to(device, dtype) for k, v in out.items()}


# -- the calls -------------------------------------------------------------------------------------------------


def calls(family: str, steps: int, size: tuple[int, int], text: dict) -> tuple[dict, dict]:
    """(diffusers kwargs, diffkit kwargs) for the same call; the family's default guidance in both."""
    height, width = size
    common = dict(height=height, width=width, num_inference_steps=steps, output_type="np", **text)
    if family in ("sd3", "flux") and "prompt" in text:
        common["max_sequence_length"] = 16
    if family == "flux":  # FluxPipeline's guidance_scale is the embedded guidance; diffkit's CFG stays off (1.0)
        return dict(common, guidance_scale=3.5), dict(common, embedded_guidance_scale=3.5)
    scale = {"sd": 7.5, "sdxl": 5.0, "sd3": 7.0}[family]
    return dict(common, guidance_scale=scale), dict(common, guidance_scale=scale)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare(family: str, components: dict, steps: int, size, repeats: int, text: dict, device) -> dict:
    ref = diffusers_pipeline(family, components)
    ours = GuidedPipeline.from_pipe(ref)
    for pipe in (ref, ours):
        pipe.set_progress_bar_config(disable=True)
    theirs_kw, ours_kw = calls(family, steps, size, text)
    times = {"diffusers": [], "diffkit": []}
    images = {}
    for r in range(repeats + 1):  # the first round warms up both
        for name, pipe, kw in (("diffusers", ref, theirs_kw), ("diffkit", ours, ours_kw)):
            generator = torch.Generator(device).manual_seed(0)
            _sync(device)
            start = time.perf_counter()
            images[name] = pipe(**kw, generator=generator).images
            _sync(device)
            if r:
                times[name].append(time.perf_counter() - start)
    diff = float(np.abs(images["diffkit"].astype(np.float64) - images["diffusers"]).max())
    t_theirs, t_ours = statistics.median(times["diffusers"]), statistics.median(times["diffkit"])
    return {"family": family, "max_abs": diff, "diffusers_s": t_theirs, "diffkit_s": t_ours, "ratio": t_ours / t_theirs,
            "finite": bool(np.isfinite(images["diffusers"]).all())}


def adjoint_memory(components: dict, device, dtype) -> list[dict]:
    """Peak GPU memory above the loaded model of one gradient through the SD 1.5 sampler (latents out, so the VAE is
    not in it), per backend and step count."""
    pipe = AdjointDPMPipeline.from_pipe(diffusers_pipeline("sd", components))
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet.requires_grad_(False)
    params = list(unet.conv_out.parameters())
    text = random_embeddings("sd", device, dtype)
    rows = []
    for backend in ("adjoint", "checkpoint"):
        for steps in (10, 20):
            for p in params:
                p.requires_grad_(True)
                p.grad = None
            x_T = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0)).to(device, dtype).requires_grad_(True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            latents = pipe(latents=x_T, num_inference_steps=steps, guidance_scale=7.5, params=params,
                           gradient_backend=backend, output_type="latent", height=512, width=512, **text).images
            latents.float().square().mean().backward()
            torch.cuda.synchronize()
            rows.append({"backend": backend, "steps": steps, "peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20,
                         "seconds": time.perf_counter() - start})
    for p in params:
        p.requires_grad_(False)
    return rows


# -- report ----------------------------------------------------------------------------------------------------


def plot(rows, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ok = [r for r in rows if "ratio" in r]
    ax.bar([r["family"] for r in ok], [r["ratio"] for r in ok], color="tab:blue")
    ax.axhline(1.05, color="tab:red", ls="--", label="goal 1.05")
    ax.axhline(1.0, color="gray", lw=0.8)
    for i, r in enumerate(ok):
        ax.text(i, r["ratio"], f"{r['ratio']:.2f}\nmax|d| {r['max_abs']:.1e}", ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="time diffkit / diffusers", title=title, ylim=(0, max([1.3] + [r["ratio"] * 1.25 for r in ok])))
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 steps, 2 repeats")
    parser.add_argument("--gpu", action="store_true", help="SD-sized components at 512x512 on CUDA")
    parser.add_argument("--out", default="assets")
    parser.add_argument("--steps", type=int, default=None, help="override the steps (default 20, quick 4)")
    parser.add_argument("--repeats", type=int, default=None, help="override the timed repeats (default 5, quick 2)")
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        parser.exit(2, "error: --gpu needs a CUDA device (torch.cuda.is_available() is False here); run without --gpu "
                       "for the CPU benchmark on tiny components\n")
    steps, repeats = (4, 2) if args.quick else (20, 5)
    steps, repeats = args.steps or steps, args.repeats or repeats
    rows = []
    if args.gpu:
        device = torch.device("cuda")
        dtypes = {"sd": torch.float16, "sdxl": torch.float16, "sd3": torch.bfloat16, "flux": torch.bfloat16}
        size, memory = (512, 512), []
        for family in FAMILIES:
            dtype = dtypes[family]
            try:
                with torch.device(device):
                    torch.set_default_dtype(dtype)
                    try:
                        components = sd_sized_components(family)
                    finally:
                        torch.set_default_dtype(torch.float32)
                # every parameter and buffer in the run's dtype, as from_pretrained(dtype=...) leaves them
                components = {k: v.to(device, dtype) for k, v in components.items()}
                row = compare(family, components, steps, size, repeats, random_embeddings(family, device, dtype), device)
                row["dtype"] = str(dtype).replace("torch.", "")
                if family == "sd":
                    memory = adjoint_memory(components, device, dtype)
            except Exception as err:  # one family failing must not lose the others' numbers
                traceback.print_exc()
                row = {"family": family, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"}
            rows.append(row)
            print(row, flush=True)
            components = None
            torch.cuda.empty_cache()
        name, setting = "bench_realmodels_gpu", f"{torch.cuda.get_device_name()}, SD-sized random components, 512x512"
    else:
        torch.set_num_threads(1)
        device, size, memory = torch.device("cpu"), (16, 24), []
        text = {"prompt": "a red fox", "negative_prompt": "blurry"}
        for family in FAMILIES:
            flux_text = {"prompt": "a red fox"}  # guidance-distilled: no negative branch
            rows.append(compare(family, tiny_components(family), steps, size, repeats,
                                flux_text if family == "flux" else text, device))
        name, setting = "bench_realmodels", "CPU (1 thread), tiny random components, 16x24"

    table_rows = []
    for r in rows:
        if "error" in r:
            table_rows.append([r["family"], r.get("dtype", ""), "", "", "", r["error"]])
            continue
        table_rows.append([r["family"], r.get("dtype", "float32"), f"{r['max_abs']:.2e}", f"{r['diffusers_s']:.3f}",
                           f"{r['diffkit_s']:.3f}", f"{r['ratio']:.3f}"])
    note = (f"{setting}; {steps} steps, median of {repeats} interleaved calls after a warm-up; SD: DPM-Solver++ 2M, "
            "CFG 7.5; SDXL: Euler (leading), CFG 5; SD3: FlowMatch Euler shift 3, CFG 7; Flux: FlowMatch Euler with "
            "dynamic shifting, embedded guidance 3.5. max|d|: decoded images in [0, 1].")
    table = markdown_table(["family", "dtype", "max abs diff", "diffusers s", "diffkit s", "diffkit / diffusers"],
                           table_rows, note)
    if memory:
        table += "\n" + markdown_table(
            ["backend", "steps", "peak MB above the model", "seconds"],
            [[m["backend"], m["steps"], f"{m['peak_mb']:.0f}", f"{m['seconds']:.2f}"] for m in memory],
            "One gradient through the SD 1.5 sampler (DPM-Solver++(2M) in rho, CFG 7.5, latents out, 512x512, "
            "float16): AdjointDPM's adjoint vs checkpointed backprop.")
    write_results(args.out, name, args.quick, table, plot(rows, setting))


if __name__ == "__main__":
    main()
