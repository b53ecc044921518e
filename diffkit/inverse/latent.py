"""A latent diffusion model's decoder as the first stage of a forward model.

For a model that samples latents z, an inverse problem y = A(image) + noise is y = A(decode(z)) + noise:
``Compose(VaeDecoder(vae), A)`` (or ``VaeDecoder(vae).then(A)``) is that forward model on latents, so RED-Diff and
DPS run on latent models unchanged. Its ``pinv`` encodes A's pseudo-inverse (the encoder's posterior mean), the
latent counterpart of starting from pinv(y).
"""

import torch

from .operators import Operator, _image_shape


class VaeDecoder(Operator):
    """z -> the VAE's image of z in [-1, 1] (diffusers' latent scaling and shift undone); nonlinear."""

    def __init__(self, vae):
        super().__init__(0.0)
        if not hasattr(vae, "decode") or not hasattr(vae, "encode"):
            raise TypeError(f"vae must be a diffusers autoencoder with encode and decode, got {type(vae).__name__}")
        self.vae = vae
        config = vae.config
        self.scale, self.shift = config.scaling_factor, getattr(config, "shift_factor", None) or 0.0
        self.factor = 2 ** (len(config.block_out_channels) - 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode((z / self.scale + self.shift).to(self.vae.dtype), return_dict=False)[0]

    @torch.no_grad()
    def pinv(self, image: torch.Tensor) -> torch.Tensor:
        """The latent of ``image``: the encoder's posterior mean, scaled and shifted as the model's latents are."""
        mean = self.vae.encode(image.to(self.vae.dtype)).latent_dist.mean
        return (mean - self.shift) * self.scale

    def output_shape(self, input_shape) -> tuple[int, ...]:
        b, _, h, w = _image_shape(input_shape)
        return b, self.vae.config.out_channels, h * self.factor, w * self.factor

    def input_shape(self, output_shape) -> tuple[int, ...]:
        b, _, h, w = _image_shape(output_shape)
        if h % self.factor or w % self.factor:
            raise ValueError(f"image size {h}x{w} is not divisible by the VAE's factor {self.factor}")
        return b, self.vae.config.latent_channels, h // self.factor, w // self.factor
