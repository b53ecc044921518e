"""RedDiffPipeline: solving an inverse problem y = A(x) + noise with the pipeline's diffusion model as prior.

``method`` picks the solver in ``diffkit.inverse``: RED-Diff (Mardani et al., ICLR 2024, the default), DPS
(Chung et al., ICLR 2023) or PiGDM (Song et al., ICLR 2023). The same components as GuidedPipeline; for a
class-conditional model the prior is the unconditional (null-class) model unless ``class_labels`` are given.
For a latent model (with a VAE) the operator acts on the decoded image: RED-Diff fits the latent through the
decoder, DPS differentiates through it; PiGDM needs a pixel model.
"""

import inspect

import torch

from diffkit.denoiser import Denoiser
from diffkit.inverse import check_measurement, dps, initial_estimate, pigdm, red_diff

from .guided import OUTPUT_TYPES, GuidedPipeline, GuidedPipelineOutput


METHODS = {"red_diff": red_diff, "dps": dps, "pigdm": pigdm}
DEFAULT_STEPS = {"red_diff": 100, "dps": 1000, "pigdm": 100}


class RedDiffPipeline(GuidedPipeline):
    r"""Restore images from measurements with a diffusion prior.

    Example:
        >>> from diffkit.inverse import make_operator
        >>> pipe = RedDiffPipeline.from_pipe(diffkit.load_pipeline())
        >>> op = make_operator("sr:2", sigma_y=0.05)
        >>> y = op.measure(clean_images)          # (B, 3, 8, 8) from (B, 3, 16, 16) in [-1, 1]
        >>> restored = pipe(y, op, generator=torch.manual_seed(0)).images
    """

    def __call__(
        self,
        measurement: torch.Tensor,
        operator,
        method: str = "red_diff",
        class_labels: int | list[int] | None = None,
        num_inference_steps: int | None = None,
        method_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> GuidedPipelineOutput | tuple:
        r"""Restore the images behind ``measurement``.

        Args:
            measurement (`torch.Tensor`): y, shape (B, ...) as ``operator`` produces from images in [-1, 1].
            operator: a forward model (``diffkit.inverse.make_operator(...)`` or any object with ``forward``).
            method (`str`, defaults to "red_diff"): "red_diff", "dps" or "pigdm".
            class_labels (`int` or `list[int]`, *optional*): condition a class-conditional prior on these classes
                (one per measurement); by default the null class, i.e. the unconditional prior.
            num_inference_steps (`int`, *optional*): RED-Diff's optimisation steps (default 100) or the
                sampler's steps (DPS 1000, PiGDM 100).
            method_kwargs (`dict`, *optional*): the method's own options, e.g. RED-Diff's `lr`, `lam`,
                `weighting`; DPS's `zeta`; PiGDM's `guidance_scale`, `eta`.
            generator (`torch.Generator`, *optional*): seeds the noise.
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" or "latent".
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
        if not torch.is_tensor(measurement) or measurement.ndim < 2:
            raise ValueError(f"measurement must be a batched tensor, got {type(measurement).__name__}")
        if not hasattr(operator, "forward"):
            raise TypeError(f"operator must have a forward(x) method, got {type(operator).__name__}")
        fn, kwargs = METHODS[method], dict(method_kwargs or {})
        allowed = set(inspect.signature(fn).parameters) - {"denoiser", "y", "operator", "cond", "generator", "decoder"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ValueError(f"method_kwargs {unknown} are not options of {method}; allowed: {sorted(allowed)}")
        steps = num_inference_steps if num_inference_steps is not None else DEFAULT_STEPS[method]
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {steps!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")

        device, batch = self._execution_device, len(measurement)
        y = measurement.to(device=device, dtype=self.unet.dtype)
        cond = None
        if self.num_classes is not None:
            if class_labels is None:  # the null class: the unconditional prior
                cond = {"class_labels": torch.full((batch,), self.num_classes, device=device)}
            else:
                cond, _ = self._class_conditioning(class_labels, 1, device)
                if len(cond["class_labels"]) != batch:
                    raise ValueError(f"class_labels must give one label per measurement ({batch}), got {class_labels}")
        elif self.text_encoder is not None:
            cond = {"encoder_hidden_states": self.encode_prompt([""] * batch, device)}

        size = self.unet.config.sample_size * self.vae_scale_factor
        channels = self.unet.config.out_channels if self.vae is None else self.vae.config.out_channels
        check_measurement(operator, y, (batch, channels, size, size))

        denoiser = Denoiser.from_pipeline_components(self.unet, self.scheduler)
        step_key = "num_steps" if method == "red_diff" else "num_inference_steps"
        kwargs[step_key] = steps
        if self.vae is None:
            latents = self._solve(fn, denoiser, y, operator, cond, generator, kwargs)
        elif method == "pigdm":
            raise ValueError("pigdm needs a pixel model: a pseudo-inverse through the VAE decoder is not defined")
        else:
            decode = lambda z: self.vae.decode(z / self.vae.config.scaling_factor, return_dict=False)[0]  # noqa: E731
            if method == "red_diff":
                # start from the encoded pseudo-inverse, as the pixel version starts from it; keep mu, the latent
                with torch.no_grad():
                    init = self.vae.encode(initial_estimate(operator, y)).latent_dist.mean * self.vae.config.scaling_factor
                fitted = {}
                kwargs = {"init": init, **kwargs, "decoder": decode, "callback": lambda info: fitted.update(mu=info["mu"])}
                self._solve(fn, denoiser, y, operator, cond, generator, kwargs)
                latents = fitted["mu"]
            else:
                shape = (batch, self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
                kwargs.setdefault("x_T", torch.randn(shape, generator=generator).to(device, self.unet.dtype))
                latents = self._solve(fn, denoiser, y, _Decoded(operator, decode), cond, generator, kwargs)

        images = self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        return GuidedPipelineOutput(images=images) if return_dict else (images,)

    def _solve(self, fn, denoiser, y, operator, cond, generator, kwargs):
        with self.progress_bar(total=kwargs.get("num_steps", kwargs.get("num_inference_steps"))) as bar:
            user_callback = kwargs.pop("callback", None)

            def on_step(info):
                bar.update()
                return user_callback(info) if user_callback is not None else None

            return fn(denoiser, y, operator, cond=cond, generator=generator, callback=on_step, **kwargs)


class _Decoded:
    """operator(decode(z)): the forward model of a latent, for DPS on a latent diffusion model."""

    def __init__(self, operator, decode):
        self.operator, self.decode = operator, decode

    def forward(self, z):
        return self.operator.forward(self.decode(z))
