"""Tiny models built in code for tests (no weights on disk, no network)."""

import torch
from diffusers import UNet2DModel

from diffkit.denoiser import convert


def tiny_unet(num_class_embeds: int | None = None, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=num_class_embeds,
    ).eval()


class _Output:
    def __init__(self, sample):
        self.sample = sample


class NearlyTrainedModel(torch.nn.Module):
    """The exact prediction for data ~ N(0, c^2 I) plus a small random-UNet term.

    A random UNet alone drives samplers far off the data scale (eps-prediction divides by alpha_t ~ 5e-5 at the
    first step of a cosine schedule), where float32 rounding, not the solver, decides the output. This model
    keeps trajectories at data scale while its UNet term still makes every step depend on the network.
    """

    def __init__(self, schedule, prediction_type, c=0.5, weight=0.05, num_class_embeds=None):
        super().__init__()
        self.unet = tiny_unet(num_class_embeds)
        self.schedule, self.prediction_type, self.c, self.weight = schedule, prediction_type, c, weight

    def forward(self, x, t, return_dict=True, **kwargs):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)[0].cpu()
        alpha, sigma = self.schedule.alpha(t).float().item(), self.schedule.sigma(t).float().item()
        x0 = alpha * self.c**2 / (alpha**2 * self.c**2 + sigma**2) * x  # posterior mean E[x0 | x_t]
        out = convert(x0, "sample", self.prediction_type, x, alpha, sigma) + self.weight * self.unet(x, t, **kwargs).sample
        return _Output(out) if return_dict else (out,)


def tiny_text_components(seed: int = 0) -> dict:
    """Tiny random Stable Diffusion components built offline: a CLIP tokenizer from an in-code vocabulary,
    a 2-layer CLIP text encoder, a UNet2DConditionModel and a VAE."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # no merges: words are spelled out letter by letter, the last letter marked with </w>
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = 16
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    ).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4, sample_size=16,
    ).eval()
    return {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "vae": vae}


# -- tiny components of every latent text family (SD 1.x / SDXL / SD3 / Flux), built offline ------------------


def tiny_tokenizer(max_length: int = 16):
    """A CLIP tokenizer over an in-code vocabulary (no merges: words are spelled letter by letter); it also serves
    where a T5 tokenizer goes (diffusers only asks it for input ids)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = max_length
    return tokenizer


def _clip(seed: int, hidden: int = 32, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=54, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                            projection_dim=projection or hidden)
    return (CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)).eval()


def _t5(seed: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=54, d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=1, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def _vae(seed: int, latent_channels: int = 4, **kwargs):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=16, **kwargs,
    ).eval()


def tiny_sdxl_components(seed: int = 0) -> dict:
    """StableDiffusionXLPipeline's components: two CLIP encoders (the second with a projection, its pooled output),
    a UNet with SDXL's "text_time" added conditioning (6 time ids x 8 + pooled 32 = 80 inputs), a VAE."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=4,
    ).eval()
    return {"unet": unet, "vae": _vae(seed, force_upcast=True), "text_encoder": _clip(seed + 1),
            "text_encoder_2": _clip(seed + 2, projection=32), "tokenizer": tiny_tokenizer(), "tokenizer_2": tiny_tokenizer()}


def tiny_sd3_components(seed: int = 0, text_encoders: bool = True) -> dict:
    """StableDiffusion3Pipeline's components: an MMDiT (patch size 2), two CLIP encoders with projections (pooled
    32 + 32), a T5 encoder (64 = the joint attention width), a VAE with SD3's scaling and shift factors."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64,
        pos_embed_max_size=16,
    ).eval()
    components = {"transformer": transformer,
                  "vae": _vae(seed, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)}
    if text_encoders:
        components.update(text_encoder=_clip(seed + 1, projection=32), text_encoder_2=_clip(seed + 2, projection=32),
                          text_encoder_3=_t5(seed + 3, d_model=64), tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(),
                          tokenizer_3=tiny_tokenizer())
    return components


def tiny_flux_components(seed: int = 0, guidance_embeds: bool = False, text_encoders: bool = True) -> dict:
    """FluxPipeline's components: a Flux transformer over packed 2x2 latent patches (16 = 4 latent channels x 4),
    rotary axes 4 + 4 + 8 = the head width, optionally guidance-distilled (``guidance_embeds``); a CLIP encoder
    (pooled 32), a T5 encoder (32 = the joint attention width); a VAE with Flux's scaling and shift factors."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=guidance_embeds,
    ).eval()
    components = {"transformer": transformer,
                  "vae": _vae(seed, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)}
    if text_encoders:
        components.update(text_encoder=_clip(seed + 1), text_encoder_2=_t5(seed + 2), tokenizer=tiny_tokenizer(),
                          tokenizer_2=tiny_tokenizer())
    return components
