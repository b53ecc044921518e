"""Text conditioning of every text family (SD 1.x / 2.x, SDXL, SD3, Flux), encoded as its own diffusers pipeline does.

diffkit does not re-implement prompt encoding: ``encode_text`` builds the family's diffusers pipeline
(``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``) over the
diffkit pipeline's own text encoders and tokenizers (no scheduler and no VAE, so building it touches nothing) and
calls its ``encode_prompt``: prompt and embedding handling, CLIP skip, SDXL's zeroed empty negative prompt, SD3's
padding and T5 fallback, LoRA scales and textual inversion all behave exactly as in diffusers. The result is laid out
as the backbone's keyword arguments (``diffkit.backbones``), one flat dict per branch:

- SD 1.x / 2.x: ``encoder_hidden_states``;
- SDXL: ``encoder_hidden_states``, ``text_embeds`` (pooled) and ``time_ids`` (original size, crop, target size);
- SD3: ``encoder_hidden_states``, ``pooled_projections``;
- Flux: ``encoder_hidden_states``, ``pooled_projections`` and, for a guidance-distilled model, ``guidance`` (the
  embedded guidance scale, one per sample, in both branches as ``FluxPipeline`` passes it).
"""

import torch


TEXT_FAMILIES = ("sd", "sdxl", "sd3", "flux")
PIPELINE_CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                    "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
# the encoders a prompt needs (SDXL's first encoder is optional: its refiner has only the second; SD3 pads T5 with zeros)
ENCODERS = {"sd": ("text_encoder", "tokenizer"), "sdxl": ("text_encoder_2", "tokenizer_2"),
            "sd3": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
            "flux": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
COMPONENTS = {"sd": ("text_encoder", "tokenizer", "unet"),
              "sdxl": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "unet"),
              "sd3": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3",
                      "transformer"),
              "flux": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")}
# options of each family's __call__ that shape its conditioning (beyond prompt / negative_prompt / *_embeds)
OPTIONS = {"sd": ("clip_skip",),
           "sdxl": ("prompt_2", "negative_prompt_2", "clip_skip", "original_size", "crops_coords_top_left", "target_size"),
           "sd3": ("prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3", "clip_skip", "max_sequence_length"),
           "flux": ("prompt_2", "negative_prompt_2", "max_sequence_length", "embedded_guidance_scale")}
POOLED = ("sdxl", "sd3", "flux")  # families whose embeddings come with pooled embeddings
MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}  # the pipelines' defaults for T5
FLUX_EMBEDDED_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, which a guidance-distilled Flux embeds


def diffusers_view(pipe, family: str):
    """The family's diffusers pipeline over ``pipe``'s text components and backbone (no scheduler, no VAE); kept
    while those components stay the same objects (building StableDiffusionPipeline costs ~10 ms of checks)."""
    import diffusers

    components = {name: getattr(pipe, name, None) for name in COMPONENTS[family]}
    key = (family, pipe.config.force_zeros_for_empty_prompt, *(id(c) for c in components.values()))
    cached = pipe.__dict__.get("_diffusers_view")
    if cached is not None and cached[0] == key:
        return cached[1]
    cls = getattr(diffusers, PIPELINE_CLASSES[family])
    if family == "sd":
        view = cls(vae=None, scheduler=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                   **components)
    elif family == "sdxl":
        view = cls(vae=None, scheduler=None, add_watermarker=False,
                   force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt, **components)
    else:
        view = cls(vae=None, scheduler=None, **components)
    pipe.__dict__["_diffusers_view"] = (key, view)
    return view


def _as_list(name: str, value, batch: int) -> list[str] | None:
    """A prompt-like argument as one string per prompt (a single string is repeated)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value] * batch
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        if len(value) != batch:
            raise ValueError(f"{name} has {len(value)} entries for {batch} prompts; give one per prompt or one string")
        return value
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}")


def _check_embeds(name: str, value, batch: int | None = None, ndim: int = 3) -> None:
    if value is None:
        return
    if not torch.is_tensor(value) or value.ndim != ndim:
        raise ValueError(f"{name} must be a tensor with {ndim} dimensions, got {getattr(value, 'shape', type(value).__name__)}")
    if batch is not None and len(value) != batch:
        raise ValueError(f"{name} has {len(value)} rows for {batch} prompts")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or inf")


def check_text(pipe, family: str, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, do_guidance: bool,
               pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, **options) -> int:
    """Refuse what the family cannot encode, by name, before any work; returns the number of prompts."""
    unknown = sorted(k for k, v in options.items() if v is not None and k not in OPTIONS[family])
    if unknown:
        raise ValueError(f"{unknown} do not apply to a {family.upper()} model; its options are {list(OPTIONS[family])}")
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("pass `prompt` or `prompt_embeds` (exactly one)")
    if prompt is not None:
        batch = len(prompt) if isinstance(prompt, list) else 1
        _as_list("prompt", prompt, batch)
    else:
        _check_embeds("prompt_embeds", prompt_embeds)
        batch = len(prompt_embeds)
    for name in ("prompt_2", "prompt_3"):
        _as_list(name, options.get(name), batch)
    if family not in POOLED:
        if pooled_prompt_embeds is not None or negative_pooled_prompt_embeds is not None:
            raise ValueError("pooled embeddings belong to SDXL, SD3 and Flux; this SD model takes none")
    elif prompt_embeds is not None and pooled_prompt_embeds is None:
        raise ValueError(f"a {family.upper()} model needs `pooled_prompt_embeds` with `prompt_embeds`")
    _check_embeds("pooled_prompt_embeds", pooled_prompt_embeds, batch, ndim=2)
    missing = [name for name in ENCODERS[family] if getattr(pipe, name, None) is None]
    if prompt is not None and missing:
        raise ValueError(f"a prompt needs the pipeline's {', '.join(missing)} (or pass prompt_embeds"
                         f"{' and pooled_prompt_embeds' if family in POOLED else ''})")
    if not do_guidance:
        return batch
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass `negative_prompt` or `negative_prompt_embeds`, not both")
    _as_list("negative_prompt", negative_prompt, batch)
    for name in ("negative_prompt_2", "negative_prompt_3"):
        _as_list(name, options.get(name), batch)
    if negative_prompt_embeds is not None:
        _check_embeds("negative_prompt_embeds", negative_prompt_embeds, batch)
        if prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(f"negative_prompt_embeds must have the shape of prompt_embeds {tuple(prompt_embeds.shape)}, "
                             f"got {tuple(negative_prompt_embeds.shape)}")
        if family in POOLED and negative_pooled_prompt_embeds is None:
            raise ValueError(f"a {family.upper()} model needs `negative_pooled_prompt_embeds` with `negative_prompt_embeds`")
        _check_embeds("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds, batch, ndim=2)
    elif negative_pooled_prompt_embeds is not None:
        raise ValueError("negative_pooled_prompt_embeds need negative_prompt_embeds")
    else:
        zeros = family == "sdxl" and negative_prompt is None and pipe.config.force_zeros_for_empty_prompt
        if missing and not zeros:
            raise ValueError(f"guidance needs the negative prompt's embeddings: pass negative_prompt_embeds"
                             f"{' and negative_pooled_prompt_embeds' if family in POOLED else ''}, or give the pipeline "
                             f"its {', '.join(missing)} to encode the negative prompt (\"\" by default)")
    return batch


def encode_text(pipe, family: str, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                num_images_per_prompt: int, device, do_guidance: bool, height: int, width: int,
                pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, **options) -> tuple[dict, dict | None, int]:
    """(cond, uncond, batch): the backbone's keyword arguments for the conditional and (with ``do_guidance``) the
    unconditional branch, ``num_images_per_prompt`` rows per prompt. The negative prompt is "" by default (SDXL:
    zeros where its config says ``force_zeros_for_empty_prompt``, as diffusers does)."""
    batch = check_text(pipe, family, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, do_guidance,
                       pooled_prompt_embeds, negative_pooled_prompt_embeds, **options)
    view = diffusers_view(pipe, family)
    # encoded once per prompt and repeated below: the encoders are deterministic, so this is what diffusers'
    # num_images_per_prompt gives, also where SD3 / Flux do not repeat embeddings passed in
    prompt = _as_list("prompt", prompt, batch)
    if do_guidance and negative_prompt is None and negative_prompt_embeds is None and not (
            family == "sdxl" and pipe.config.force_zeros_for_empty_prompt):
        negative_prompt = ""
    negative_prompt = _as_list("negative_prompt", negative_prompt, batch)
    common = dict(prompt_embeds=prompt_embeds, num_images_per_prompt=1, device=device)
    if family == "sd":
        embeds, negative = view.encode_prompt(prompt, device, 1, do_guidance, negative_prompt, prompt_embeds=prompt_embeds,
                                              negative_prompt_embeds=negative_prompt_embeds, clip_skip=options.get("clip_skip"))
        cond, uncond = {"encoder_hidden_states": embeds}, {"encoder_hidden_states": negative}
    elif family == "sdxl":
        embeds, negative, pooled, negative_pooled = view.encode_prompt(
            prompt, options.get("prompt_2"), do_classifier_free_guidance=do_guidance, negative_prompt=negative_prompt,
            negative_prompt_2=options.get("negative_prompt_2"), negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            clip_skip=options.get("clip_skip"), **common)
        time_ids = _sdxl_time_ids(pipe, view, pooled, height, width, options).to(device).expand(len(embeds), -1)
        cond = {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}
        uncond = {"encoder_hidden_states": negative, "text_embeds": negative_pooled, "time_ids": time_ids}
    elif family == "sd3":
        embeds, negative, pooled, negative_pooled = view.encode_prompt(
            prompt, options.get("prompt_2"), options.get("prompt_3"), do_classifier_free_guidance=do_guidance,
            negative_prompt=negative_prompt, negative_prompt_2=options.get("negative_prompt_2"),
            negative_prompt_3=options.get("negative_prompt_3"), negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            clip_skip=options.get("clip_skip"), max_sequence_length=_max_length(family, options), **common)
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        uncond = {"encoder_hidden_states": negative, "pooled_projections": negative_pooled}
    else:  # flux: the negative branch is a second encoding, as FluxPipeline's true CFG does
        length = _max_length(family, options)
        embeds, pooled, _ = view.encode_prompt(prompt, options.get("prompt_2"), pooled_prompt_embeds=pooled_prompt_embeds,
                                               max_sequence_length=length, **common)
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        uncond = None
        if do_guidance:
            negative, negative_pooled, _ = view.encode_prompt(
                negative_prompt, options.get("negative_prompt_2"), prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=negative_pooled_prompt_embeds, num_images_per_prompt=1, device=device,
                max_sequence_length=length)
            uncond = {"encoder_hidden_states": negative, "pooled_projections": negative_pooled}
            if negative.shape != embeds.shape:
                raise ValueError(f"the negative prompt's embeddings {tuple(negative.shape)} differ in shape from the "
                                 f"prompt's {tuple(embeds.shape)}")
        guidance = options.get("embedded_guidance_scale")
        if pipe.transformer.config.guidance_embeds:
            guidance = FLUX_EMBEDDED_GUIDANCE if guidance is None else guidance
            embedded = torch.full((len(embeds),), float(guidance), device=device, dtype=torch.float32)
            cond["guidance"] = embedded
            if uncond is not None:
                uncond["guidance"] = embedded
        elif guidance is not None:
            raise ValueError("embedded_guidance_scale is the guidance embedding of a guidance-distilled Flux; this "
                             "transformer has none (guidance_embeds=False): use guidance_scale for CFG")
    repeat = lambda branch: {k: v.repeat_interleave(num_images_per_prompt, dim=0) for k, v in branch.items()}  # noqa: E731
    cond = repeat(cond)
    uncond = repeat(uncond) if do_guidance else None
    return cond, uncond, len(cond["encoder_hidden_states"])


def _max_length(family: str, options: dict) -> int:
    length = options.get("max_sequence_length")
    return MAX_SEQUENCE_LENGTH[family] if length is None else length


def _sdxl_time_ids(pipe, view, pooled, height: int, width: int, options: dict) -> torch.Tensor:
    """SDXL's micro-conditioning: original size, crop top-left, target size (default (height, width), (0, 0),
    (height, width)), checked against the UNet's added embedding by diffusers' own ``_get_add_time_ids``."""
    original = tuple(options.get("original_size") or (height, width))
    crop = tuple(options.get("crops_coords_top_left") or (0, 0))
    target = tuple(options.get("target_size") or (height, width))
    for name, value in (("original_size", original), ("crops_coords_top_left", crop), ("target_size", target)):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise ValueError(f"{name} must be a pair of non-negative integers, got {value!r}")
    encoder_2 = getattr(pipe, "text_encoder_2", None)
    projection = int(pooled.shape[-1]) if encoder_2 is None else encoder_2.config.projection_dim
    return view._get_add_time_ids(original, crop, target, dtype=pooled.dtype, text_encoder_projection_dim=projection)
