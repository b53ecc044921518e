"""What every diffkit pipeline shares: its components, input checks, conditioning, initial latents and decoding.

One setup path, written once: ``check_*`` refuse bad input by name before any work (the CLI calls them too),
``encode_condition`` builds the (cond, uncond) pair for class labels (with the null class) or prompts,
``prepare_latents`` draws or checks the initial noise, ``decode`` turns the result into the output type through
diffusers' ``VaeImageProcessor`` and refuses a non-finite result. The pipelines differ only in their method.
"""

import math
import numbers
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, SchedulerMixin, UNet2DConditionModel, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from diffkit.guidance import Guidance, Rescaled
from diffkit.solvers import get_solver, make_timesteps


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class GuidedPipelineOutput(BaseOutput):
    """``images``: a list of PIL images, an (N, H, W, C) array, an (N, C, H, W) tensor or the latents."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(name: str, value) -> int:
    if not (_is_int(value) and value >= 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_finite(name: str, value) -> float:
    """A real, finite number (not a bool, not NaN or inf)."""
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_finite_tensor(name: str, value: torch.Tensor) -> None:
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or inf")


def check_output_type(output_type) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def check_generator(generator, batch: int) -> None:
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(f"generator is a list of {len(generator)} generators for a batch of {batch} images; give one "
                         "per image or a single generator")


def check_solver_options(solver: str, num_inference_steps, eta, schedule=None, scheduler_config=None) -> None:
    """The solver exists, takes these steps (its grid must not repeat a timestep) and ``eta`` only for DDIM."""
    get_solver(solver)
    check_positive_int("num_inference_steps", num_inference_steps)
    check_finite("eta", eta)
    if eta != 0 and solver != "ddim":
        raise ValueError(f"eta is DDIM's stochasticity; solver {solver!r} has none (got eta={eta})")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if schedule is not None:
        try:
            timesteps = make_timesteps(schedule, solver, num_inference_steps, scheduler_config)
        except ValueError:
            timesteps = None
        if timesteps is None or torch.any(timesteps[1:-1] >= timesteps[:-2]):
            raise ValueError(f"num_inference_steps={num_inference_steps} is too many for solver {solver!r} on this "
                             f"scheduler ({schedule.num_train_timesteps} training timesteps): its grid would repeat "
                             "timesteps")


def set_guidance_scale(rule: Guidance | None, scale: float) -> None:
    """Change a running rule's scale, as diffusers' callbacks change ``pipe._guidance_scale``; diffusers' convention:
    a scale <= 1 turns guidance off (the conditional model alone)."""
    while rule is not None:
        rule.guidance_scale = max(float(scale), 1.0)
        rule = rule.base if isinstance(rule, Rescaled) else None


class DiffkitPipeline(DiffusionPipeline):
    """The components every diffkit pipeline takes, and the setup every one of them runs."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["text_encoder", "tokenizer", "vae"]
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(
        self,
        unet: UNet2DModel | UNet2DConditionModel,
        scheduler: SchedulerMixin,
        text_encoder: CLIPTextModel | None = None,
        tokenizer: CLIPTokenizer | None = None,
        vae: AutoencoderKL | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._guidance_scale, self._num_timesteps, self._interrupt = 1.0, 0, False

    # -- what the model is -----------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        vae = getattr(self, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    @property
    def num_classes(self) -> int | None:
        """Number of real classes of a class-conditional UNet (its last class embedding is the null class)."""
        n = getattr(self.unet.config, "num_class_embeds", None)
        return n - 1 if n else None

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: every down block of the UNet (and the VAE) halves the size."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def default_size(self) -> tuple[int, int]:
        """(height, width) of the images the model was trained on."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    # diffusers' callback conventions (SDCFGCutoffCallback and friends read and set these)
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # -- input checks ----------------------------------------------------------------------------

    def check_size(self, height, width) -> tuple[int, int]:
        """(height, width) given or the model's own; both positive multiples of ``size_multiple``."""
        default_h, default_w = self.default_size()
        height, width = default_h if height is None else height, default_w if width is None else width
        for name, side in (("height", height), ("width", width)):
            if not (_is_int(side) and side > 0 and side % self.size_multiple == 0):
                raise ValueError(f"{name} must be a positive multiple of {self.size_multiple} for this model, got {side!r}")
        return int(height), int(width)

    def check_conditioning(self, class_labels, prompt, prompt_embeds) -> None:
        if (class_labels is None) == (prompt is None and prompt_embeds is None):
            raise ValueError("pass exactly one of `class_labels` (class-conditional) or `prompt`/`prompt_embeds` (text)")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass `prompt` or `prompt_embeds`, not both")
        if class_labels is not None:
            self.class_labels(class_labels)
        if prompt_embeds is not None:
            check_finite_tensor("prompt_embeds", prompt_embeds)
        if prompt is not None and not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                                                   and all(isinstance(p, str) for p in prompt))):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")

    def check_inputs(
        self,
        class_labels=None,
        prompt=None,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        height=None,
        width=None,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        guidance=None,
        guidance_kwargs=None,
        guidance_rescale: float = 0.0,
        solver: str = "dpmpp_2m",
        eta: float = 0.0,
        generator=None,
        latents=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        output_type: str = "pil",
        callback_on_step_end_tensor_inputs=None,
        **_,
    ) -> None:
        """Every check a guided sampling call makes before it runs (the CLI calls this before writing anything)."""
        from diffkit.denoiser import Denoiser
        from diffkit.guidance import make_guidance

        self.check_conditioning(class_labels, prompt, prompt_embeds)
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        height, width = self.check_size(height, width)
        check_finite("guidance_scale", guidance_scale)
        check_finite("guidance_rescale", guidance_rescale)
        make_guidance(guidance, guidance_scale, guidance_rescale, **(guidance_kwargs or {}))
        schedule = Denoiser.from_pipeline_components(self.unet, self.scheduler).schedule
        check_solver_options(solver, num_inference_steps, eta, schedule, self.scheduler.config)
        check_output_type(output_type)
        bad = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, got {bad}")
        if latents is not None:
            check_finite_tensor("latents", latents)
        if negative_prompt_embeds is not None:
            check_finite_tensor("negative_prompt_embeds", negative_prompt_embeds)

    # -- conditioning ----------------------------------------------------------------------------

    def class_labels(self, class_labels, allow_null: bool = False) -> torch.Tensor:
        """Labels as a 1-D long tensor: integers in [0, classes - 1] (``allow_null``: the null class too); a float
        or bool label is refused, not rounded."""
        if self.num_classes is None:
            raise ValueError("this UNet has no class embeddings; pass `prompt` for a text-conditional model")
        if torch.is_tensor(class_labels):
            if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool or class_labels.is_complex():
                raise ValueError(f"class_labels must be integers, got a {class_labels.dtype} tensor")
            labels = class_labels.flatten().long()
        else:
            values = [class_labels] if not isinstance(class_labels, (list, tuple)) else list(class_labels)
            if not all(_is_int(v) for v in values):
                raise ValueError(f"class_labels must be integers, got {class_labels!r}")
            labels = torch.tensor(values, dtype=torch.long)
        top = self.num_classes if allow_null else self.num_classes - 1
        if labels.numel() == 0 or labels.min() < 0 or labels.max() > top:
            null = f" ({self.num_classes} is the null class)" if allow_null else ""
            raise ValueError(f"class_labels must lie in [0, {top}]{null}, got {labels.tolist()}")
        return labels

    def encode_prompt(self, prompt: str | list[str], device) -> torch.Tensor:
        ids = self.tokenizer(
            prompt, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_encoder(ids.to(device))[0]

    def prompt_embeddings(self, prompt, prompt_embeds, device) -> torch.Tensor:
        """The text encoder's embeddings of ``prompt``, or the given ``prompt_embeds``, on the model's device / dtype."""
        if prompt_embeds is None:
            if self.text_encoder is None or self.tokenizer is None:
                raise ValueError("a prompt needs a text_encoder and a tokenizer in the pipeline (or pass its embeddings)")
            prompt_embeds = self.encode_prompt([prompt] if isinstance(prompt, str) else list(prompt), device)
        check_finite_tensor("prompt_embeds", prompt_embeds)
        return prompt_embeds.to(device, self.unet.dtype)

    def encode_condition(self, class_labels=None, prompt=None, negative_prompt=None, prompt_embeds=None,
                         negative_prompt_embeds=None, num_images_per_prompt: int = 1, device=None,
                         null_class_labels=False) -> tuple[dict, dict, int]:
        """(cond, uncond, batch): the network's keyword arguments for the conditional and unconditional passes.

        Class-conditional: ``class_labels`` and the null class (``null_class_labels``: the labels may name the
        null class itself, an unconditional prior). Text: prompts or their embeddings, and the negative prompt ("" by
        default).
        """
        device = device or self._execution_device
        if self.num_classes is not None and prompt is None and prompt_embeds is None:
            labels = self.class_labels(class_labels, allow_null=null_class_labels).to(device)
            labels = labels.repeat_interleave(num_images_per_prompt)
            return {"class_labels": labels}, {"class_labels": torch.full_like(labels, self.num_classes)}, len(labels)
        prompt_embeds = self.prompt_embeddings(prompt, prompt_embeds, device)
        if negative_prompt_embeds is None:
            negative_prompt = negative_prompt if negative_prompt is not None else ""
            negative_prompt = [negative_prompt] * len(prompt_embeds) if isinstance(negative_prompt, str) else negative_prompt
            if len(negative_prompt) != len(prompt_embeds):
                raise ValueError(
                    f"negative_prompt has {len(negative_prompt)} entries for {len(prompt_embeds)} prompts; give one per prompt"
                )
        negative_prompt_embeds = self.prompt_embeddings(negative_prompt, negative_prompt_embeds, device)
        if negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(f"negative_prompt_embeds must have the shape of prompt_embeds {tuple(prompt_embeds.shape)}, "
                             f"got {tuple(negative_prompt_embeds.shape)}")
        cond = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        uncond = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}, len(cond)

    # -- latents ---------------------------------------------------------------------------------

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        return (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def prepare_latents(self, batch: int, height: int, width: int, generator=None, latents=None, device=None):
        """The initial noise: drawn from ``generator`` (one per image for batch-independent seeds) or the given
        ``latents``, checked for shape and finiteness."""
        device = device or self._execution_device
        shape = self.latent_shape(batch, height, width)
        check_generator(generator, batch)
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        if not torch.is_tensor(latents) or tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(getattr(latents, 'shape', ()))}")
        check_finite_tensor("latents", latents)
        return latents.to(device)

    # -- output ----------------------------------------------------------------------------------

    def decode(self, latents: torch.Tensor, output_type: str):
        """Latents to images of ``output_type`` (VAE decode for latent models, then diffusers' post-processing).
        "pt" and "latent" keep autograd; a non-finite result is an error, never a black image."""
        if not torch.isfinite(latents).all():
            raise ValueError("the sampler's output contains NaN or inf (are the inputs or the guidance scale "
                                     "far outside the model's range?); nothing was written")
        if output_type == "latent":
            return latents
        images = latents if self.vae is None else self.vae_decode(latents)
        if output_type in ("np", "pil"):
            images = images.detach()
        return self.image_processor.postprocess(images.float(), output_type=output_type)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's image of ``latents`` in [-1, 1], upcast to float32 where the VAE asks for it (``force_upcast``)."""
        vae, config = self.vae, self.vae.config
        upcast = vae.dtype == torch.float16 and getattr(config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
            return vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)

    # -- the loop's callback ---------------------------------------------------------------------

    def step_callback(self, bar, callback_on_step_end, rule: Guidance | None, cond: dict, uncond: dict | None,
                      tensor_inputs=("latents",)):
        """A solver callback that advances the progress bar and runs diffusers' ``callback_on_step_end``.

        The callback sees ``latents`` and ``prompt_embeds`` (negative and positive, concatenated as diffusers
        does) and may return new ones; it may set ``pipe._guidance_scale`` (a scale <= 1 turns guidance off, as in
        diffusers), so diffusers' own callbacks such as ``SDCFGCutoffCallback`` work.
        """

        def on_step(info):
            bar.update()
            if callback_on_step_end is None:
                return None
            kwargs = {"latents": info["x"]}
            if "prompt_embeds" in tensor_inputs and "encoder_hidden_states" in cond:
                kwargs["prompt_embeds"] = (cond["encoder_hidden_states"] if uncond is None else
                                           torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]]))
            scale = self._guidance_scale
            out = callback_on_step_end(self, info["step"], info["t"], kwargs) or {}
            if self._guidance_scale != scale:
                set_guidance_scale(rule, self._guidance_scale)
            embeds = out.get("prompt_embeds")
            if embeds is not None and embeds is not kwargs.get("prompt_embeds"):
                batch = len(cond["encoder_hidden_states"])
                cond["encoder_hidden_states"] = embeds[-batch:]  # diffusers keeps the positive half last
                if uncond is not None and len(embeds) == 2 * batch:
                    uncond["encoder_hidden_states"] = embeds[:batch]
            return {"x": out["latents"]} if "latents" in out else None

        return on_step
