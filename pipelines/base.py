"""What every diffkit pipeline shares: its components, input checks, conditioning, initial latents and decoding.

One setup path, written once: ``check_*`` refuse bad input by name before any work (the CLI calls them too),
``encode_condition`` builds the (cond, uncond) pair for class labels (with the null class) or prompts,
``prepare_latents`` draws or checks the initial noise, ``solver_setup`` reads the scheduler's walk,
``decode`` turns the result into the output type through diffusers' ``VaeImageProcessor`` and refuses a non-finite
result. The pipelines differ only in their method.

The components are diffusers' own, by diffusers' names, so ``from_pipe`` / ``from_pretrained`` map them from any
Stable Diffusion 1.x / 2.x, SDXL, SD3 or Flux pipeline or folder: a ``unet`` (``UNet2DModel``: pixel space,
class-conditional; ``UNet2DConditionModel``: SD 1.x / 2.x, SDXL) or a ``transformer`` (``SD3Transformer2DModel``,
``FluxTransformer2DModel``), the ``scheduler``, an optional ``vae``, and the family's text encoders and tokenizers
(``text_encoder``/``tokenizer``, ``_2``, ``_3``), which may be left out where embeddings are passed. The family is
read from the backbone (``diffkit.backbones.family_of``); what differs between families lives in
``diffkit.backbones`` (the network call) and ``pipelines/text.py`` (the text conditioning).
"""

import math
import numbers
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FluxTransformer2DModel,
    SchedulerMixin,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from diffkit.backbones import as_backbone, family_of
from diffkit.denoiser import Denoiser
from diffkit.guidance import Guidance, Rescaled, make_guidance
from diffkit.schedule import calculate_shift
from diffkit.solvers import SolverSetup, get_solver, solver_for

from . import text


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


def check_solver_options(solver: str | None, num_inference_steps, eta) -> None:
    """The solver exists (None: the scheduler's own), the steps are a positive integer, ``eta`` a number >= 0 (that
    only DDIM takes is checked against the solver the scheduler resolves to, ``check_eta``)."""
    if solver is not None:
        get_solver(solver)
    check_positive_int("num_inference_steps", num_inference_steps)
    check_finite("eta", eta)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta != 0 and solver is not None and solver != "ddim":
        raise ValueError(f"eta is DDIM's stochasticity; solver {solver!r} has none (got eta={eta})")


def check_eta(setup: SolverSetup, eta) -> None:
    if eta != 0 and setup.solver != "ddim":
        raise ValueError(f"eta is DDIM's stochasticity; solver {setup.solver!r} (this scheduler's) has none (got "
                         f"eta={eta}): pass solver='ddim'")


def make_rule(guidance, guidance_scale: float, guidance_rescale: float = 0.0, guidance_kwargs: dict | None = None):
    """The pipelines' guidance rule: ``diffkit.guidance.make_guidance`` with CFG-rescale applied where diffusers applies
    ``guidance_rescale``, to the network's own prediction (eps for SD 1.x / SDXL, v for v-prediction models, the flow
    velocity for SD3 / Flux; eps would be undefined at a flow model's first step, where alpha = 0)."""
    rule = make_guidance(guidance, guidance_scale, **(guidance_kwargs or {}))
    if rule is not None and guidance_rescale:
        rule = Rescaled(rule, guidance_rescale, space="model")
    return rule


def set_guidance_scale(rule: Guidance | None, scale: float) -> None:
    """Change a running rule's scale, as diffusers' callbacks change ``pipe._guidance_scale``; diffusers' convention:
    a scale <= 1 turns guidance off (the conditional model alone)."""
    while rule is not None:
        rule.guidance_scale = max(float(scale), 1.0)
        rule = rule.base if isinstance(rule, Rescaled) else None


# where a diffusers callback's tensor lives in diffkit's conditioning (SD's and Flux's prompt_embeds, SD3's pooled
# embeddings, SDXL's add_text_embeds / add_time_ids; diffusers concatenates negative and positive halves)
CALLBACK_TENSORS = {"prompt_embeds": "encoder_hidden_states", "pooled_prompt_embeds": "pooled_projections",
                    "add_text_embeds": "text_embeds", "add_time_ids": "time_ids"}
# the default guidance scale of each family's diffusers pipeline (Flux: true_cfg_scale, off by default)
DEFAULT_GUIDANCE_SCALE = {"unet": 3.0, "sd": 7.5, "sdxl": 5.0, "sd3": 7.0, "flux": 1.0}
TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


class DiffkitPipeline(DiffusionPipeline):
    """The components every diffkit pipeline takes, and the setup every one of them runs."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->unet->transformer->vae"
    _optional_components = ["unet", "transformer", "scheduler", "vae", *TEXT_COMPONENTS]
    _callback_tensor_inputs = ["latents", *CALLBACK_TENSORS]

    def __init__(
        self,
        unet: UNet2DModel | UNet2DConditionModel | None = None,
        scheduler: SchedulerMixin | None = None,
        text_encoder=None,
        tokenizer=None,
        vae: AutoencoderKL | None = None,
        transformer: SD3Transformer2DModel | FluxTransformer2DModel | None = None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("a diffkit pipeline needs exactly one backbone: a `unet` (UNet2DModel, UNet2DConditionModel) "
                             "or a `transformer` (SD3Transformer2DModel, FluxTransformer2DModel)")
        if scheduler is None:
            raise ValueError("a diffkit pipeline needs the model's `scheduler` (its noise schedule and sampler settings)")
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
                              transformer=transformer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                              text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        # SDXL's convention for an absent negative prompt (zero embeddings), carried over by from_pipe / from_pretrained
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        family_of(self.network)  # refuse a backbone diffkit does not drive now, not at the first call
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._guidance_scale, self._num_timesteps, self._interrupt = 1.0, 0, False

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' ``from_pipe`` (the components are shared, mapped by name), leaving every shared module in the
        dtype it has. diffusers casts them all to float32 unless ``dtype=`` is given, which would also turn the source
        pipeline's float16 / bfloat16 modules to float32 under its feet; an explicit ``dtype=`` still casts."""
        if "dtype" in kwargs or "torch_dtype" in kwargs:
            return super().from_pipe(pipeline, **kwargs)
        modules = {name: m for name, m in pipeline.components.items() if isinstance(m, torch.nn.Module)}
        dtypes = {name: next((p.dtype for p in m.parameters()), None) for name, m in modules.items()}
        network = next((dtypes[n] for n in ("unet", "transformer") if dtypes.get(n) is not None), torch.float32)
        new = super().from_pipe(pipeline, dtype=network, **kwargs)
        for name, module in modules.items():
            if dtypes[name] is not None and next(module.parameters()).dtype != dtypes[name]:
                module.to(dtypes[name])
        return new

    # -- what the model is -----------------------------------------------------------------------

    @property
    def network(self) -> torch.nn.Module:
        """The backbone: the ``unet`` or the ``transformer``."""
        return self.unet if self.unet is not None else self.transformer

    @property
    def family(self) -> str:
        """"unet" (pixel or class-conditional UNet2DModel), "sd", "sdxl", "sd3" or "flux" (``diffkit.backbones``)."""
        return family_of(self.network)

    def denoiser(self) -> Denoiser:
        """The backbone (behind diffkit's one call contract), its schedule and prediction type."""
        return Denoiser.from_pipeline_components(as_backbone(self.network), self.scheduler)

    @property
    def vae_scale_factor(self) -> int:
        vae = getattr(self, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    @property
    def num_classes(self) -> int | None:
        """Number of real classes of a class-conditional UNet (its last class embedding is the null class)."""
        n = getattr(self.network.config, "num_class_embeds", None)
        return n - 1 if n else None

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: every down block of a UNet halves the size, SD3 patches the latents,
        Flux packs 2x2 latent patches (and the VAE downsamples)."""
        config = self.network.config
        if self.family == "sd3":
            return self.vae_scale_factor * config.patch_size
        if self.family == "flux":
            return self.vae_scale_factor * 2
        return self.vae_scale_factor * 2 ** (len(config.block_out_channels) - 1)

    def default_size(self) -> tuple[int, int]:
        """(height, width) of the images the model was trained on (Flux: 1024 x 1024 as FluxPipeline's default,
        128 latent rows for a VAE of factor 8)."""
        size = 128 if self.family == "flux" else self.network.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        channels = self.network.config.in_channels
        return channels // 4 if self.family == "flux" else channels  # Flux's input is 2x2 patches of the latents

    @property
    def default_guidance_scale(self) -> float:
        """The family's diffusers default: 7.5 SD, 5.0 SDXL, 7.0 SD3, 1.0 Flux (true CFG off); 3.0 pixel models."""
        return DEFAULT_GUIDANCE_SCALE[self.family]

    # diffusers' callback conventions (SDCFGCutoffCallback and friends read and set these)
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in a callback to stop the run after the current step, as in diffusers: the
        sample reached so far is decoded and returned."""
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
        elif self.family not in text.TEXT_FAMILIES:
            raise ValueError("this model is not text-conditional (a UNet2DModel): pass class_labels, not a prompt")
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
        guidance_scale: float | None = None,
        guidance=None,
        guidance_kwargs=None,
        guidance_rescale: float = 0.0,
        solver: str | None = None,
        eta: float = 0.0,
        generator=None,
        latents=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        output_type: str = "pil",
        callback_on_step_end_tensor_inputs=None,
        sigmas=None,
        **text_options,
    ) -> SolverSetup:
        """Every check a guided sampling call makes before it runs (the CLI calls this before writing anything);
        returns the walk the call takes (``solver_setup``)."""
        self.check_conditioning(class_labels, prompt, prompt_embeds)
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        height, width = self.check_size(height, width)
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        check_finite("guidance_scale", guidance_scale)
        check_finite("guidance_rescale", guidance_rescale)
        rule = make_rule(guidance, guidance_scale, guidance_rescale, guidance_kwargs)
        check_solver_options(solver, num_inference_steps, eta)
        setup = self.solver_setup(solver, num_inference_steps, height, width, sigmas)
        check_eta(setup, eta)
        check_output_type(output_type)
        bad = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, got {bad}")
        if latents is not None:
            check_finite_tensor("latents", latents)
        if class_labels is not None:
            unknown = sorted(k for k, v in text_options.items() if v is not None)
            if unknown or negative_prompt_embeds is not None or negative_prompt is not None:
                raise ValueError(f"{unknown or ['negative_prompt']} apply to text models; this call is class-conditional")
        else:
            text.check_text(self, self.family, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                            self.uses_guidance(rule, guidance_scale), **text_options)
        return setup

    @staticmethod
    def uses_guidance(rule: Guidance | None, guidance_scale: float) -> bool:
        """Whether the run needs the unconditional branch at all (diffusers: no negative prompt at scale 1)."""
        return rule is not None and guidance_scale != 1.0

    # -- conditioning ----------------------------------------------------------------------------

    def class_labels(self, class_labels, allow_null: bool = False) -> torch.Tensor:
        """Labels as a 1-D long tensor: integers in [0, classes - 1] (``allow_null``: the null class too); a float
        or bool label is refused, not rounded."""
        if self.num_classes is None:
            raise ValueError("this model has no class embeddings; pass `prompt` for a text-conditional model")
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

    def encode_condition(self, class_labels=None, prompt=None, negative_prompt=None, prompt_embeds=None,
                         negative_prompt_embeds=None, num_images_per_prompt: int = 1, device=None,
                         null_class_labels=False, *, do_guidance: bool = True, height: int | None = None,
                         width: int | None = None, **text_options) -> tuple[dict, dict | None, int]:
        """(cond, uncond, batch): the backbone's keyword arguments for the conditional and unconditional passes.

        Class-conditional: ``class_labels`` and the null class (``null_class_labels``: the labels may name the
        null class itself, an unconditional prior). Text: prompts or their embeddings (with their pooled embeddings
        for SDXL / SD3 / Flux) and, with ``do_guidance``, the negative prompt ("" by default), encoded as the family's
        diffusers pipeline encodes them (``pipelines/text.py``; ``text_options`` such as ``prompt_2``, ``clip_skip``,
        ``max_sequence_length``, SDXL's ``original_size``, Flux's ``embedded_guidance_scale``). ``height`` / ``width``
        (SDXL's size conditioning) default to the model's size. Floating tensors come on the backbone's dtype.
        """
        device = device or self._execution_device
        if self.num_classes is not None and prompt is None and prompt_embeds is None:
            labels = self.class_labels(class_labels, allow_null=null_class_labels).to(device)
            labels = labels.repeat_interleave(num_images_per_prompt)
            uncond = {"class_labels": torch.full_like(labels, self.num_classes)}
            return {"class_labels": labels}, (uncond if do_guidance else None), len(labels)
        if self.family not in text.TEXT_FAMILIES:
            raise ValueError("this model is not text-conditional (a UNet2DModel): pass class_labels, not a prompt")
        height, width = self.check_size(height, width)
        cond, uncond, batch = text.encode_text(
            self, self.family, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
            device, do_guidance, height, width, **text_options)
        dtype = self.network.dtype
        cast = lambda branch: {k: v if k == "guidance" else v.to(device, dtype) for k, v in branch.items()}  # noqa: E731
        return cast(cond), (cast(uncond) if uncond is not None else None), batch

    # -- latents and the walk ----------------------------------------------------------------------

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        return (batch, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def prepare_latents(self, batch: int, height: int, width: int, generator=None, latents=None, device=None):
        """The initial noise: drawn from ``generator`` (one per image for batch-independent seeds) or the given
        ``latents``, checked for shape and finiteness. Latents are spatial, (B, C, H / f, W / f); for Flux the packed
        latents ``FluxPipeline.prepare_latents`` makes, (B, H W / 4f^2, 4C), are accepted and unpacked. They come back
        in float32 (the solvers' arithmetic; the backbone runs in its own dtype), keeping autograd."""
        device = device or self._execution_device
        shape = self.latent_shape(batch, height, width)
        check_generator(generator, batch)
        if latents is None:  # drawn in the network's dtype, as diffusers draws them, then held in float32
            return randn_tensor(shape, generator=generator, device=device, dtype=self.network.dtype).float()
        if not torch.is_tensor(latents):
            raise ValueError(f"latents must be a tensor of shape {shape}, got {type(latents).__name__}")
        packed = (batch, shape[2] * shape[3] // 4, shape[1] * 4)
        if self.family == "flux" and tuple(latents.shape) == packed:
            from diffusers import FluxPipeline

            latents = FluxPipeline._unpack_latents(latents, shape[2], shape[3], 1)
        if tuple(latents.shape) != shape:
            also = f" (or packed, {packed})" if self.family == "flux" else ""
            raise ValueError(f"latents must have shape {shape}{also}, got {tuple(latents.shape)}")
        check_finite_tensor("latents", latents)
        return latents.to(device, torch.float32)

    def dynamic_shift_mu(self, height: int, width: int) -> float | None:
        """SD3 / Flux with a dynamically shifting scheduler: the exponent mu their pipelines compute from the number of
        image tokens (``calculate_shift`` over the scheduler's base / max sequence lengths and shifts); else None."""
        config = self.scheduler.config
        if self.family not in ("sd3", "flux") or not config.get("use_dynamic_shifting"):
            return None
        patch = self.network.config.patch_size if self.family == "sd3" else 2
        tokens = (height // self.vae_scale_factor // patch) * (width // self.vae_scale_factor // patch)
        return calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                               config.get("base_shift", 0.5), config.get("max_shift", 1.16 if self.family == "sd3" else 1.15))

    def flow_shift(self, height: int, width: int) -> float:
        """The timestep shift of a flow-matching model's scheduler at this size: e^mu with dynamic shifting, else its
        ``shift`` (``flow_shift`` for DPM-Solver's flow sigmas); 1 for VP models."""
        config = self.scheduler.config
        mu = self.dynamic_shift_mu(height, width)
        if mu is not None:
            return math.exp(mu)
        if config.get("use_flow_sigmas"):
            return float(config.get("flow_shift", 1.0))
        return float(config.get("shift", 1.0)) if self.denoiser().schedule.path == "flow" else 1.0

    def solver_setup(self, solver: str | None, num_inference_steps: int, height: int, width: int,
                     sigmas=None) -> SolverSetup:
        """The walk the pipeline's scheduler takes for these steps (``solver=None``: its own solver; a name: that
        diffkit solver on the scheduler's schedule), through ``diffkit.solvers.solver_for``, which refuses scheduler
        options diffkit does not reproduce. SD3 and Flux pass the scheduler what their pipelines pass: Flux its
        sigmas linspace(1, 1 / n, n), both the resolution-dependent shift mu where the scheduler shifts dynamically."""
        config = self.scheduler.config
        mu = self.dynamic_shift_mu(height, width)
        if self.family == "flux" and sigmas is None and not config.get("use_flow_sigmas", False):
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if sigmas is not None and self.family not in ("sd3", "flux"):
            raise ValueError("sigmas= applies to flow-matching models (SD3, Flux), as in their diffusers pipelines")
        try:
            return solver_for(self.scheduler, num_inference_steps, solver=solver, mu=mu, sigmas=sigmas)
        except ValueError as err:
            if num_inference_steps > 1 and "decrease along the grid" in str(err):
                raise ValueError(f"num_inference_steps={num_inference_steps} is too many for this scheduler "
                                 f"({config.get('num_train_timesteps', 1000)} training timesteps): its grid would "
                                 "repeat timesteps") from None
            raise

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
        """The VAE's image of ``latents`` in [-1, 1]: the model's latent scaling undone (``scaling_factor``, SD3 / Flux's
        ``shift_factor``, or an SDXL VAE's ``latents_mean`` / ``latents_std``), upcast to float32 where a float16 VAE
        asks for it (``force_upcast``, as the SDXL pipeline does)."""
        vae, config = self.vae, self.vae.config
        upcast = vae.dtype == torch.float16 and getattr(config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
            if mean is not None and std is not None:
                view = (1, -1) + (1,) * (latents.ndim - 2)
                mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(view)
                std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(view)
                latents = latents * std / config.scaling_factor + mean
            else:
                latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
            return vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)

    # -- the loop's callback ---------------------------------------------------------------------

    def step_callback(self, bar, callback_on_step_end, rule: Guidance | None, cond: dict, uncond: dict | None,
                      tensor_inputs=("latents",)):
        """A solver callback that advances the progress bar, runs diffusers' ``callback_on_step_end`` and stops the
        run when ``pipe._interrupt`` is set.

        The callback sees ``latents`` (spatial, also for Flux) and the conditioning diffusers names
        ``prompt_embeds``, ``pooled_prompt_embeds`` (SD3), ``add_text_embeds`` / ``add_time_ids`` (SDXL), with the
        negative half first as diffusers concatenates them, and may return new ones; it may set
        ``pipe._guidance_scale`` (a scale <= 1 turns guidance off, as in diffusers), so diffusers' own callbacks
        such as ``SDCFGCutoffCallback`` / ``SDXLCFGCutoffCallback`` work.
        """
        requested = [name for name in tensor_inputs if name != "latents"]
        missing = [name for name in requested if CALLBACK_TENSORS[name] not in cond]
        if missing:
            raise ValueError(f"callback_on_step_end_tensor_inputs {missing} do not exist for this {self.family} model")

        def on_step(info):
            bar.update()
            if callback_on_step_end is not None:
                kwargs = {"latents": info["x"]}
                for name in requested:
                    key = CALLBACK_TENSORS[name]
                    kwargs[name] = cond[key] if uncond is None else torch.cat([uncond[key], cond[key]])
                scale = self._guidance_scale
                out = callback_on_step_end(self, info["step"], info["t"], kwargs) or {}
                if self._guidance_scale != scale:
                    set_guidance_scale(rule, self._guidance_scale)
                for name in requested:
                    value = out.get(name)
                    if value is None or value is kwargs[name]:
                        continue
                    key, batch = CALLBACK_TENSORS[name], len(cond[CALLBACK_TENSORS[name]])
                    cond[key] = value[-batch:]  # diffusers keeps the positive half last
                    if uncond is not None and len(value) == 2 * batch:
                        uncond[key] = value[:batch]
                x = out.get("latents", info["x"])
            else:
                x = info["x"]
            return {"x": x, "stop": self._interrupt}

        return on_step
