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
