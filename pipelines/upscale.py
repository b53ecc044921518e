"""UpscalePipeline: diffusion super-resolution by residual shifting, ResShift with UPSR's uncertainty-guided noise
(Zhang et al., CVPR 2025). See ``diffkit.resshift``.

Components: ``unet``, the x0-predictor (it sees [x_t / std_t, g(y0), y]); ``sr_net``, the frozen MSE SR network g;
``scheduler``, a ``ResShiftScheduler`` holding the schedule (steps, kappa, eta range) and UPSR's a and b.
"""

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from diffkit.resshift import ResShiftDenoiser, ResShiftScheduler, SRNet, sample_resshift, uncertainty_weight, upsr_inputs

from .base import check_finite_tensor, check_generator, check_output_type


@dataclass
class UpscalePipelineOutput(BaseOutput):
    """``images``: the high-resolution images in the requested output type; ``uncertainty``: UPSR's w_u per pixel,
    an (N, C, H, W) tensor (all ones with ``noise_weighting=False``)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    uncertainty: torch.Tensor


class UpscalePipeline(DiffusionPipeline):
    r"""Super-resolve images by ``sr_net.config.factor``.

    Example:
        >>> pipe = diffkit.load_pipeline(diffkit.assets.UPSR_MODEL)   # x2 for coloured 8x8 digits
        >>> high = pipe(low_resolution, generator=torch.manual_seed(0)).images
    """

    model_cpu_offload_seq = "sr_net->unet"

    def __init__(self, unet: UNet2DModel, sr_net: SRNet, scheduler: ResShiftScheduler):
        super().__init__()
        self.register_modules(unet=unet, sr_net=sr_net, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)

    @property
    def factor(self) -> int:
        return self.sr_net.config.factor

    def check_image(self, image) -> torch.Tensor:
        """Low-resolution images as a (B, C, h, w) tensor in [-1, 1] (from a tensor or PIL images), refusing sizes the
        UNet cannot take after upsampling."""
        if isinstance(image, PIL.Image.Image) or (isinstance(image, list) and image
                                                  and all(isinstance(i, PIL.Image.Image) for i in image)):
            images = [image] if isinstance(image, PIL.Image.Image) else image
            if len({im.size for im in images}) != 1:
                raise ValueError(f"image: all images must have one size, got {sorted({im.size for im in images})}")
            arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1 for im in images])
            image = torch.from_numpy(arrays).permute(0, 3, 1, 2)
        if not torch.is_tensor(image):
            raise TypeError(f"image must be a tensor or PIL image(s), got {type(image).__name__}")
        if image.ndim == 3:
            image = image.unsqueeze(0)
        channels = self.sr_net.config.channels
        if image.ndim != 4 or image.shape[1] != channels or image.numel() == 0:
            raise ValueError(f"image must have shape (B, {channels}, h, w), got {tuple(image.shape)}")
        check_finite_tensor("image", image)
        multiple = 2 ** (len(self.unet.config.block_out_channels) - 1)
        for name, side in (("height", image.shape[-2]), ("width", image.shape[-1])):
            if (side * self.factor) % multiple:
                raise ValueError(f"image {name} x {self.factor} must be a multiple of {multiple} for this UNet, got {side}")
        return image.float()

    @torch.no_grad()
    def __call__(
        self,
        image: torch.Tensor | PIL.Image.Image | list[PIL.Image.Image],
        noise_weighting: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
    ) -> UpscalePipelineOutput | tuple:
        r"""Upscale ``image``.

        Args:
            image (`torch.Tensor` or PIL images): low-resolution images, (B, C, h, w) in [-1, 1] for a tensor.
            noise_weighting (`bool`, defaults to True): UPSR's uncertainty-weighted noise w_u; False: w_u = 1, the
                ResShift process (for the model it was trained for).
            generator (`torch.Generator`, *optional*): seeds the starting noise.
            latents (`torch.Tensor`, *optional*): the starting noise eps, (B, C, H, W) at the output size.
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" or "latent" (the raw, unclamped result).
            return_dict (`bool`, defaults to True): an `UpscalePipelineOutput` or a tuple `(images, uncertainty)`.
            callback_on_step_end (`Callable`, *optional*): `f(pipe, step, timestep, callback_kwargs) -> dict` after
                every step; a returned "latents" replaces the current sample.
        """
        check_output_type(output_type)
        device = self._execution_device
        y0 = self.check_image(image).to(device, self.unet.dtype)
        shape = (len(y0), y0.shape[1], y0.shape[2] * self.factor, y0.shape[3] * self.factor)
        check_generator(generator, len(y0))
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif not torch.is_tensor(latents) or tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(getattr(latents, 'shape', ()))}")
        check_finite_tensor("latents", latents)

        schedule, config = self.scheduler.schedule, self.scheduler.config
        y, g_y = upsr_inputs(self.sr_net, y0, self.factor)
        weight = uncertainty_weight(g_y, y, config.a, config.b) if noise_weighting else torch.ones_like(y)
        x = schedule.prior_sample(y, latents.to(device), weight)
        denoiser = ResShiftDenoiser(self.unet, schedule)

        with self.progress_bar(total=schedule.num_steps) as bar:

            def on_step(info):
                bar.update()
                if callback_on_step_end is None:
                    return None
                out = callback_on_step_end(self, info["step"], info["t"], {"latents": info["x"]}) or {}
                return {"x": out["latents"]} if "latents" in out else None

            x = sample_resshift(denoiser, x, y, cond=[g_y, y], callback=on_step)

        if not torch.isfinite(x).all():
            raise ValueError("the sampler's output contains NaN or inf")
        images = x if output_type == "latent" else self.image_processor.postprocess(x.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        return UpscalePipelineOutput(images=images, uncertainty=weight) if return_dict else (images, weight)
