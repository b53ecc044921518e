"""InverseProblemPipeline: restore images from measurements y = A(x) + noise with the pipeline's model as prior.

``method`` picks the solver in ``diffkit.inverse``: RED-Diff (Mardani et al., ICLR 2024, the default), DPS
(Chung et al., ICLR 2023) or PiGDM (Song et al., ICLR 2023). The prior is the pipeline's model: for a
class-conditional model the unconditional (null-class) model unless ``class_labels`` are given; for a text model
the model conditioned on ``prompt`` (the empty prompt by default). For a latent model the forward model is A
after the VAE's decoder (``diffkit.inverse.VaeDecoder``), so every method runs on latents unchanged: SD 1.x / 2.x,
SDXL, SD3 and Flux (their scaling and shift factors undone), with prompts, at any size the model takes.
``RedDiffPipeline`` is the old name of this class.
"""

import inspect

import torch

from diffkit.inverse import Compose, VaeDecoder, check_measurement, dps, pigdm, red_diff

from .base import GuidedPipelineOutput, check_generator, check_output_type, check_positive_int
from .guided import GuidedPipeline


METHODS = {"red_diff": red_diff, "dps": dps, "pigdm": pigdm}
STEPS_KEYWORD = {"red_diff": "num_steps", "dps": "num_inference_steps", "pigdm": "num_inference_steps"}
# each method's own default, read from its signature so the two never disagree (RED-Diff: 1,000, the official
# benchmark run's, sample_batch.sh; see diffkit.inverse.red_diff)
DEFAULT_STEPS = {name: inspect.signature(fn).parameters[STEPS_KEYWORD[name]].default for name, fn in METHODS.items()}


class InverseProblemPipeline(GuidedPipeline):
    r"""Restore images from measurements with a diffusion prior (RED-Diff, DPS or PiGDM).

    Example:
        >>> from diffkit.inverse import make_operator
        >>> pipe = InverseProblemPipeline.from_pipe(diffkit.load_pipeline())
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
        prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        method_kwargs: dict | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        **text_options,
    ) -> GuidedPipelineOutput | tuple:
        r"""Restore the images behind ``measurement``.

        Args:
            measurement (`torch.Tensor`): y, shape (B, ...) as ``operator`` produces from images in [-1, 1].
            operator: a forward model (``diffkit.inverse.make_operator(...)`` or any object with ``forward``).
            method (`str`, defaults to "red_diff"): "red_diff", "dps" or "pigdm".
            class_labels (`int` or `list[int]`, *optional*): condition a class-conditional prior on these classes
                (one per measurement); by default the null class, i.e. the unconditional prior.
            prompt / prompt_embeds (*optional*): condition a text model's prior (default: the empty prompt); one per
                measurement or one for all. SDXL / SD3 / Flux embeddings come with ``pooled_prompt_embeds``.
            height, width (`int`, *optional*): the image size (default: the model's own); non-square works.
            num_inference_steps (`int`, *optional*): RED-Diff's optimisation steps or the sampler's steps
                (defaults: the method's own: red_diff 1000, the official benchmark run's with its lr 0.1 and lam 1.0;
                dps 1000; pigdm 100).
            method_kwargs (`dict`, *optional*): the method's own options, e.g. RED-Diff's `lr`, `lam`,
                `weighting`; DPS's `zeta`; PiGDM's `guidance_scale`, `eta`.
            generator (`torch.Generator`, *optional*): seeds the noise.
            output_type (`str`, defaults to "pil"): "pil", "np", "pt" or "latent".
            text_options: the text model's other conditioning arguments, as in `GuidedPipeline` (``prompt_2``,
                ``pooled_prompt_embeds``, ``max_sequence_length``, ``embedded_guidance_scale``, ...).

        The samplers (DPS, PiGDM) walk the DDIM spacing of ``num_inference_steps`` on a VP model and the scheduler's
        own flow grid on SD3 / Flux (whose schedules have no DDIM spacing).
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
        if not torch.is_tensor(measurement) or measurement.ndim < 2:
            raise ValueError(f"measurement must be a batched tensor, got {type(measurement).__name__}")
        if not hasattr(operator, "forward"):
            raise TypeError(f"operator must have a forward(x) method, got {type(operator).__name__}")
        if method == "red_diff" and self.denoiser().schedule.path == "flow":
            raise ValueError("RED-Diff visits the VP schedule's timesteps (range(0, N, N // steps), as its official code); "
                             "this flow-matching model (SD3 / Flux) has no such table: use method='dps' or 'pigdm', which "
                             "walk its scheduler's flow grid")
        fn, kwargs = METHODS[method], dict(method_kwargs or {})
        allowed = set(inspect.signature(fn).parameters) - {"denoiser", "y", "operator", "cond", "generator", "decoder",
                                                          "timesteps", STEPS_KEYWORD[method]}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise ValueError(f"method_kwargs {unknown} are not options of {method}; allowed: {sorted(allowed)}")
        steps = DEFAULT_STEPS[method] if num_inference_steps is None else num_inference_steps
        check_positive_int("num_inference_steps", steps)
        check_output_type(output_type)
        batch = len(measurement)
        check_generator(generator, batch)
        height, width = self.check_size(height, width)

        device = self._execution_device
        y = measurement.to(device=device, dtype=torch.float32)
        cond = self._prior_condition(class_labels, prompt, prompt_embeds, batch, device, height, width, text_options)
        if self.vae is not None:
            operator = Compose(VaeDecoder(self.vae), operator)
        check_measurement(operator, y, self.latent_shape(batch, height, width))
        if method != "red_diff" and "x_T" not in kwargs:  # the samplers start from noise of the latent shape
            kwargs["x_T"] = self.prepare_latents(batch, height, width, generator, None, device)
        kwargs[STEPS_KEYWORD[method]] = steps
        denoiser = self.denoiser()
        if method != "red_diff" and denoiser.schedule.path == "flow":
            kwargs["timesteps"] = self.solver_setup("ddim", steps, height, width).grid

        with self.progress_bar(total=steps) as bar:
            user_callback = kwargs.pop("callback", None)

            def on_step(info):
                bar.update()
                return user_callback(info) if user_callback is not None else None

            latents = fn(denoiser, y, operator, cond=cond, generator=generator, callback=on_step, **kwargs)

        with torch.no_grad():  # the restoration is a result, not part of a graph
            images = self.decode(latents.detach(), output_type)
        self.maybe_free_model_hooks()
        return GuidedPipelineOutput(images=images) if return_dict else (images,)

    def _prior_condition(self, class_labels, prompt, prompt_embeds, batch, device, height, width, text_options) -> dict:
        """The prior's conditioning: classes (default the null class), or a prompt (default the empty one)."""
        if self.num_classes is not None:
            if prompt is not None or prompt_embeds is not None or text_options:
                raise ValueError("this model is class-conditional: pass class_labels, not a prompt")
            labels = self.num_classes if class_labels is None else class_labels
            cond, _, n = self.encode_condition(class_labels=labels, device=device, null_class_labels=True)
            if n == 1 and batch > 1:
                cond = {"class_labels": cond["class_labels"].expand(batch)}
            elif n != batch:
                raise ValueError(f"class_labels must give one label per measurement ({batch}), got {class_labels}")
            return cond
        if class_labels is not None:
            raise ValueError("this model has no class embeddings; pass a prompt")
        if self.family == "unet":
            return None  # an unconditional model
        if prompt is None and prompt_embeds is None:
            prompt = ""
        if isinstance(prompt, str):
            prompt = [prompt] * batch
        cond, _, n = self.encode_condition(prompt=prompt, prompt_embeds=prompt_embeds, device=device, do_guidance=False,
                                           height=height, width=width, **text_options)
        if n == 1 and batch > 1:
            cond = {k: v.expand(batch, *v.shape[1:]) for k, v in cond.items()}
        elif n != batch:
            raise ValueError(f"give one prompt (or prompt embedding) per measurement ({batch}), got {n}")
        return cond


RedDiffPipeline = InverseProblemPipeline  # the old name, kept so saved folders and code that use it still load
