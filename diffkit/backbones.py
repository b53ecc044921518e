"""Every diffusers backbone behind one call: ``backbone(x, t, **cond, return_dict=False) -> (out,)``, out shaped like x.

diffkit's solvers, guidance rules (which batch ``cond`` dicts), the adjoint and the inverse methods call the
network only through ``Denoiser``, which calls it this way with spatial latents x of shape (B, C, H, W) and one
model timestep t, and ``cond`` is one flat dict of tensors (so guidance batches it, the adjoint differentiates each
entry and callbacks find them by name). diffusers' ``UNet2DModel`` and SD 1.x / 2.x's ``UNet2DConditionModel`` follow
it already; the others get a thin adapter:

- SDXL's ``UNet2DConditionModel`` takes its pooled text embeddings and size conditioning nested in
  ``added_cond_kwargs``: ``SDXLBackbone`` takes them flat, as ``text_embeds`` and ``time_ids``;

- ``SD3Transformer2DModel`` (SD3's MMDiT) names its inputs ``hidden_states`` / ``timestep`` and wants one
  timestep per sample: ``SD3Backbone`` passes them as the SD3 pipeline does (t is diffusers' FlowMatch timestep,
  sigma * 1000);
- ``FluxTransformer2DModel`` works on packed 2x2 latent patches with positional ids, takes t / 1000 and, when it
  is guidance-distilled, a guidance embedding: ``FluxBackbone`` packs x, builds the image and text ids and unpacks
  the output with diffusers' own ``FluxPipeline`` helpers, exactly as ``FluxPipeline`` calls the transformer.

Every adapter runs the network in its own dtype and answers in the caller's (float32 in diffkit's pipelines), so a
float16 / bfloat16 model's solver arithmetic stays in float32, as diffusers' schedulers upcast theirs.
``family_of(model)`` names what a network is; ``as_backbone(model)`` gives the callable the Denoiser drives.
"""

import torch


FAMILIES = ("unet", "sd", "sdxl", "sd3", "flux")


def _config(model) -> dict:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"the network must be a diffusers model with a config, got {type(model).__name__}")
    return dict(config)


def family_of(model) -> str:
    """"unet" (``UNet2DModel``: pixel or class-conditional), "sd" (``UNet2DConditionModel``, SD 1.x / 2.x), "sdxl"
    (a ``UNet2DConditionModel`` with SDXL's "text_time" added conditioning), "sd3" (``SD3Transformer2DModel``) or
    "flux" (``FluxTransformer2DModel``), read from the network's config (so wrappers that keep it, such as a
    quantised model, are recognised too)."""
    config = _config(model)
    if "axes_dims_rope" in config and "guidance_embeds" in config:
        return "flux"
    if "caption_projection_dim" in config and "pooled_projection_dim" in config:
        return "sd3"
    if config.get("cross_attention_dim") is not None and "down_block_types" in config:
        if config.get("addition_embed_type") == "text_time":
            return "sdxl"
        if config.get("addition_embed_type") is not None:
            raise ValueError(f"UNet2DConditionModel with addition_embed_type={config['addition_embed_type']!r} is not "
                             "supported (SD 1.x / 2.x have none, SDXL has 'text_time')")
        return "sd"
    if "down_block_types" in config and "in_channels" in config:
        return "unet"
    raise ValueError(f"{type(model).__name__} is not a backbone diffkit drives; supported: UNet2DModel, "
                     "UNet2DConditionModel (SD 1.x / 2.x, SDXL), SD3Transformer2DModel, FluxTransformer2DModel")


def _per_sample(t: torch.Tensor, batch: int) -> torch.Tensor:
    """One timestep per sample, as the transformers' timestep embeddings want (a shared t is expanded)."""
    t = torch.as_tensor(t).reshape(-1)
    if len(t) == 1:
        return t.expand(batch)
    if len(t) != batch:
        raise ValueError(f"t must be one timestep or one per sample ({batch}), got {len(t)}")
    return t


class _Backbone(torch.nn.Module):
    """A network behind the common call. It runs in its own dtype (float16 / bfloat16 weights take their latents in
    that dtype) and answers in the caller's, so the solvers keep their arithmetic in float32, as diffusers' schedulers
    upcast theirs. Anything else (parameters, dtype, config, blocks for feature hooks) is the wrapped network's, so
    code that reads or hooks the model sees the diffusers model itself."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.model_dtype = next((p.dtype for p in model.parameters()), torch.float32)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def forward(self, x, t, return_dict: bool = False, **cond):
        out = self.model(x.to(self.model_dtype), t, **cond, return_dict=False)[0]
        return (out.to(x.dtype),)


class SDXLBackbone(_Backbone):
    """SDXL's ``UNet2DConditionModel`` as ``model(x, t, encoder_hidden_states, text_embeds, time_ids)``: the pooled
    embeddings and size conditioning go to its ``added_cond_kwargs``, as ``StableDiffusionXLPipeline`` passes them."""

    def forward(self, x, t, encoder_hidden_states=None, text_embeds=None, time_ids=None, return_dict: bool = False,
                **kwargs):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        out = self.model(x.to(self.model_dtype), t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                         return_dict=False, **kwargs)[0]
        return (out.to(x.dtype),)


class SD3Backbone(_Backbone):
    """``SD3Transformer2DModel`` as ``model(x, t, encoder_hidden_states, pooled_projections)``: the latents are its
    ``hidden_states``, t (diffusers' FlowMatch timestep, sigma * num_train_timesteps) is expanded to the batch, as
    ``StableDiffusion3Pipeline`` passes it."""

    def forward(self, x, t, encoder_hidden_states=None, pooled_projections=None, return_dict: bool = False, **kwargs):
        out = self.model(
            hidden_states=x.to(self.model_dtype), timestep=_per_sample(t, x.shape[0]).to(x.device),
            encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections, return_dict=False, **kwargs,
        )[0]
        return (out.to(x.dtype),)


class FluxBackbone(_Backbone):
    """``FluxTransformer2DModel`` as ``model(x, t, encoder_hidden_states, pooled_projections, guidance=None)`` on
    spatial latents (B, C, H, W), H and W even: packed into 2x2 patches, with image ids over the (H/2, W/2) patch
    grid and zero text ids (as ``FluxPipeline.encode_prompt`` makes them), t cast to the latents' dtype and divided by
    1000, as ``FluxPipeline`` calls it; the output is unpacked back to (B, C, H, W). ``guidance`` (one value per
    sample) is the guidance embedding of a guidance-distilled model and must be given exactly for those."""

    def forward(self, x, t, encoder_hidden_states=None, pooled_projections=None, guidance=None, return_dict: bool = False,
                **kwargs):
        from diffusers import FluxPipeline

        b, c, h, w = x.shape
        caller_dtype, x = x.dtype, x.to(self.model_dtype)
        if h % 2 or w % 2:
            raise ValueError(f"Flux packs 2x2 latent patches: the latent height and width must be even, got {h}x{w}")
        if self.model.config.guidance_embeds != (guidance is not None):
            raise ValueError("a guidance-distilled Flux transformer (guidance_embeds=True) needs `guidance` (one value "
                             "per sample); one without guidance embeddings takes none")
        packed = FluxPipeline._pack_latents(x, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=x.device, dtype=x.dtype)
        timestep = _per_sample(t, b).to(device=x.device, dtype=x.dtype) / 1000
        out = self.model(
            hidden_states=packed, timestep=timestep, guidance=guidance, pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states, txt_ids=txt_ids, img_ids=img_ids, return_dict=False, **kwargs,
        )[0]
        return (FluxPipeline._unpack_latents(out, h, w, 1).to(caller_dtype),)


def as_backbone(model):
    """The callable ``Denoiser`` drives for ``model``: its family's adapter (a UNet's only casts dtypes)."""
    family = family_of(model)
    return {"sdxl": SDXLBackbone, "sd3": SD3Backbone, "flux": FluxBackbone}.get(family, _Backbone)(model)
