"""Calibration sets: the network inputs (x_t, t, conditioning) that post-training quantisation measures ranges on.

The full-precision pipeline is run in batches of ``batch_size`` images, and a hook on its denoising network
(``pipe.unet`` or ``pipe.transformer``: any model) keeps, of every call, only the rows a policy selects, with
each argument as executed (classifier-free guidance adds rows: conditional and unconditional rows are both
kept, as Q-Diffusion does for SD). The conditioning (class labels, prompt embeddings, pooled embeddings, guidance
values...) is the same at every step of a trajectory row, so it is stored once per row, not once per step: the
memory held is n samples plus one conditioning per trajectory row, independent of the number of steps
(``CalibrationSet.peak_bytes``); the pipeline's own memory scales with ``batch_size``.

Policies pick n rows:

- "ndtc": PTQ4DM's normally distributed time-step calibration. Step index k ~ int(N(mu, sigma) * S), clamped
  to [0, S - 1], over the S sampler steps counted from the data end, so k / S is the fraction of the way from
  data to noise; mu = sigma = 0.4 as in the released DNTC script. Sample i is trajectory row i at its own step,
  x and t from the same executed call (the paper's intent).
- "ndtc_as_coded": the same draw, paired as the released code pairs it (``backward_t_calib_data_generator`` in
  42Shawn/PTQ4DM ``quant_image_sample.py``): k counts sampler loop iterations from the noise end, x is the
  sample that iteration k produces (the input of the next call; the final sample for k = S - 1), and the network
  is fed the timestep value k itself (SpacedDiffusion's ``_scale_timesteps`` passes it through unmapped), so x
  from near the noise end meets t near 0 and the other way round.
- "uniform": Q-Diffusion's time-step-aware calibration (``get_train_samples``): ``steps_used`` evenly spaced steps,
  the same n / ``steps_used`` trajectory rows at each.
- "naive": x ~ N(0, I) at timesteps uniform over the range the run executed, with recorded conditioning rows.
"""

import inspect
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm


POLICIES = ("ndtc", "ndtc_as_coded", "uniform", "naive")
SAMPLE_NAMES = ("sample", "hidden_states")  # the noisy input of diffusers' UNets and transformers


def denoising_network(pipe):
    """The pipeline's denoising network: ``pipe.unet`` or ``pipe.transformer``."""
    for name in ("unet", "transformer"):
        model = getattr(pipe, name, None)
        if model is not None:
            return name, model
    raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer to quantise")


# -- nested arguments (e.g. SDXL's added_cond_kwargs) ----------------------------------------------------------


def _map(value, fn):
    """Apply fn to every tensor in a nest of dicts, lists and tuples; other leaves pass through."""
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    return value


def _tensors(value) -> list[torch.Tensor]:
    found = []
    _map(value, lambda t: found.append(t) or t)
    return found


def _nbytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _equal(a, b) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return len(ta) == len(tb) and all(x.shape == y.shape and torch.equal(x.cpu(), y.cpu()) for x, y in zip(ta, tb))


def _cat(values: list):
    first = values[0]
    if torch.is_tensor(first):
        return torch.cat(values)
    if isinstance(first, dict):
        return {k: _cat([v[k] for v in values]) for k in first}
    return type(first)(_cat([v[i] for v in values]) for i in range(len(first)))


@dataclass
class CalibrationSet:
    """n network inputs, stored as: ``sample`` (n, ...) and ``timestep`` (n,) as executed; ``row`` (n,), each
    sample's trajectory row, whose conditioning is ``cond`` (per-row keyword arguments with one row each, stored
    once per row); ``shared``, the keyword arguments without a batch dimension (e.g. Flux's ``img_ids``), stored
    once. ``step_index`` (n,): the sampler step (of ``num_steps``, counted from the data end) whose network input
    x is; -1 where x is not one of the run's network inputs (naive's noise; the final sample, for the as-coded NDTC's
    k = S - 1). ``peak_bytes``: the most bytes the recorder held while the pipeline ran."""

    sample: torch.Tensor
    timestep: torch.Tensor
    row: torch.Tensor
    cond: dict
    step_index: torch.Tensor
    num_steps: int
    sample_name: str = "sample"
    timestep_name: str = "timestep"
    shared: dict = field(default_factory=dict)
    peak_bytes: int = 0

    def __len__(self) -> int:
        return len(self.sample)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored network inputs: samples, timesteps, conditioning (the row indices aside)."""
        return _nbytes([self.sample, self.timestep, self.cond, self.shared])

    def inputs(self, index) -> dict:
        """The keyword arguments of the network call made of samples ``index`` (a slice or index tensor)."""
        rows = self.row[index]
        return {
            self.sample_name: self.sample[index],
            self.timestep_name: self.timestep[index],
            **_map(self.cond, lambda t: t[rows]),
            **self.shared,
        }

    def batches(self, batch_size: int = 128):
        """The network's keyword arguments, ``batch_size`` samples at a time, in order."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        for start in range(0, len(self), batch_size):
            yield self.inputs(slice(start, start + batch_size))


def _bind(model, args, kwargs) -> dict:
    """The call's arguments by name (the network's forward signature)."""
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    arguments = dict(bound.arguments)
    extra = arguments.pop("kwargs", None)  # a **kwargs catch-all
    if isinstance(extra, dict):
        arguments.update(extra)
    return arguments


def _sample_name(model, arguments: dict) -> str:
    for name in SAMPLE_NAMES:
        if name in arguments:
            return name
    first = next(iter(inspect.signature(model.forward).parameters))
    if first in arguments and torch.is_tensor(arguments[first]):
        return first
    raise ValueError(f"cannot find the noisy input among {type(model).__name__}'s arguments {sorted(arguments)}")


def record_network_inputs(pipe, **call_kwargs) -> list[dict]:
    """Run ``pipe(**call_kwargs)`` and return every network call's keyword arguments as executed (tensors on the
    CPU, ``return_dict`` left out). Memory grows with steps x batch: for small evaluations; calibration sets are
    built with ``build_calibration_set``, which keeps only what it selects."""
    _, model = denoising_network(pipe)
    calls = []

    def record(module, args, kwargs):
        arguments = _bind(module, args, kwargs)
        arguments.pop("return_dict", None)
        calls.append(_map(arguments, lambda t: t.detach().cpu()))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe(**call_kwargs)
    finally:
        hook.remove()
    return calls


# -- which (row, step) pairs each policy takes -------------------------------------------------------------------


def ndtc_step_indices(n: int, num_steps: int, mu: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """PTQ4DM's draw: int(N(mu, sigma) * S) clamped to [0, S - 1]."""
    draw = mu + sigma * torch.randn(n, generator=generator, dtype=torch.float64)
    return (draw * num_steps).long().clamp(0, num_steps - 1)  # .long() truncates toward zero, as int() does


def uniform_step_indices(n: int, num_steps: int, steps_used: int) -> torch.Tensor:
    """Q-Diffusion's draw: ``steps_used`` evenly spaced steps, n / steps_used rows each (remainder to the first)."""
    if not 1 <= steps_used <= num_steps:
        raise ValueError(f"steps_used must lie in [1, {num_steps}], got {steps_used}")
    steps = torch.linspace(0, num_steps - 1, steps_used).round().long()
    counts = torch.full((steps_used,), n // steps_used)
    counts[: n % steps_used] += 1
    return steps.repeat_interleave(counts)


class _Selection:
    """One policy's n picks: sample i is trajectory row ``row[i]`` at sampler step ``step[i]`` counted from the
    noise end (-1: the final sample; -2: none, naive noise), fed timestep ``fed_t[i]`` (None: as executed)."""

    def __init__(self, policy: str, n: int, num_steps: int, mu: float, sigma: float, steps_used: int, generator):
        self.policy, self.n, S = policy, n, num_steps
        self.fed_t = None
        if policy == "ndtc":
            k = ndtc_step_indices(n, S, mu, sigma, generator)  # from the data end
            self.row, self.step, self.step_index = torch.arange(n), S - 1 - k, k
        elif policy == "ndtc_as_coded":
            k = ndtc_step_indices(n, S, mu, sigma, generator)  # loop iterations from the noise end
            self.row, self.step = torch.arange(n), torch.where(k < S - 1, k + 1, torch.full_like(k, -1))
            self.step_index = torch.where(k < S - 1, S - 2 - k, torch.full_like(k, -1))
            self.fed_t = k.float()
        elif policy == "uniform":
            k = uniform_step_indices(n, S, min(steps_used, S))
            counts = torch.bincount(k)
            self.row = torch.cat([torch.arange(int(c)) for c in counts if c])  # the same first rows at every step
            self.step, self.step_index = S - 1 - k, k
        else:  # naive
            self.row, self.step, self.step_index = torch.arange(n), torch.full((n,), -2), torch.full((n,), -1)
        self.rows_needed = int(self.row.max()) + 1
        self.sample = self.timestep = None
        self.filled = torch.zeros(n, dtype=torch.bool)

    def take(self, step: int, rows: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor) -> None:
        """Keep the picks at this step among the given global rows (rows[j] is row j of ``sample``)."""
        if self.sample is None:
            self.sample = torch.zeros(self.n, *sample.shape[1:], dtype=sample.dtype)
            self.timestep = torch.zeros(self.n, dtype=timestep.dtype)
        first, last = int(rows[0]), int(rows[-1])
        picks = ((self.step == step) & (self.row >= first) & (self.row <= last)).nonzero().flatten()
        if len(picks):
            local = self.row[picks] - first
            self.sample[picks] = sample[local].to(self.sample.dtype)
            self.timestep[picks] = timestep[local].to(self.timestep.dtype)
            self.filled[picks] = True


class _Recorder:
    """The forward pre-hook that feeds every selection and keeps the conditioning once per trajectory row."""

    def __init__(self, selections: list[_Selection], num_steps: int):
        self.selections, self.num_steps = selections, num_steps
        self.rows_needed = max(s.rows_needed for s in selections)
        self.rows_seen = 0
        self.cond_chunks, self.shared, self.names = [], None, None
        self.timesteps_seen = []
        self.peak_bytes = 0

    def start_chunk(self):
        self.calls_in_step, self.step, self.previous_t, self.chunk_base = 0, -1, None, self.rows_seen
        self.branch_rows, self.branch_cond = {}, {}  # per call within a step: its global rows, its conditioning

    def _split(self, arguments: dict, batch: int):
        """(per-row arguments, shared arguments) of one call."""
        per_row, shared = {}, {}
        for name, value in arguments.items():
            if name in self.names or name == "return_dict":
                continue
            tensors = _tensors(value)
            if tensors and all(t.ndim > 0 and len(t) == batch for t in tensors):
                per_row[name] = _map(value, lambda t: t.detach().cpu())
            else:
                shared[name] = _map(value, lambda t: t.detach().cpu())
        return per_row, shared

    def __call__(self, module, args, kwargs):
        arguments = _bind(module, args, kwargs)
        if self.names is None:
            self.names = (_sample_name(module, arguments), "timestep")
            if "timestep" not in arguments:
                raise ValueError(f"{type(module).__name__} was called without a timestep argument")
        sample = arguments[self.names[0]].detach()
        batch = len(sample)
        timestep = torch.as_tensor(arguments["timestep"]).detach().flatten().float().cpu().expand(batch).clone()
        # a new sampler step starts where the timestep changes; calls within a step (e.g. Flux's true CFG) are
        # further trajectory rows
        t_value = timestep[0].item()
        if t_value != self.previous_t:
            self.step, self.calls_in_step, self.previous_t = self.step + 1, 0, t_value
            self.timesteps_seen.append(t_value)
        branch = self.calls_in_step
        self.calls_in_step += 1
        per_row, shared = self._split(arguments, batch)
        if self.step == 0:  # a new trajectory row block: keep its conditioning once
            first = self.chunk_base + sum(len(r) for r in self.branch_rows.values())
            self.branch_rows[branch], self.branch_cond[branch] = torch.arange(first, first + batch), per_row
            self.rows_seen = first + batch
            if first < self.rows_needed:
                keep = min(batch, self.rows_needed - first)
                self.cond_chunks.append(_map(per_row, lambda t: t[:keep]))
            if self.shared is None:
                self.shared = shared
            elif not _equal(shared, self.shared):
                raise ValueError("the network's batch-free arguments changed between calibration batches")
        elif branch not in self.branch_rows or len(self.branch_rows[branch]) != batch:
            raise ValueError("the network's calls per step or their batch changed between steps (a guidance interval?); "
                             "calibrate with guidance on at every step")
        else:
            changed = [name for name in per_row if not _equal(per_row[name], self.branch_cond[branch].get(name))]
            if changed or per_row.keys() != self.branch_cond[branch].keys():
                raise ValueError(f"the network's per-row arguments {changed} change between steps; calibration stores "
                                 "conditioning once per trajectory row and supports none that varies by step")
        rows = self.branch_rows[branch]
        for selection in self.selections:
            selection.take(self.step, rows, sample.cpu(), timestep)
        self.peak_bytes = max(self.peak_bytes, self.stored_bytes())

    def finish_chunk(self, final: torch.Tensor | None):
        steps = self.step + 1
        if steps != self.num_steps:
            raise ValueError(
                f"the pipeline ran {steps} distinct timesteps for num_inference_steps={self.num_steps}; calibration "
                "needs one timestep per sampler step (a first-order solver such as DDIM, Euler or DPM-Solver)"
            )
        images = None if final is None else len(final)
        for selection in self.selections:
            final_picks = selection.step == -1
            if not final_picks.any():
                continue
            if final is None or final.shape[1:] != selection.sample.shape[1:]:
                raise ValueError("the as-coded NDTC needs the pipeline's final sample in the network's input format")
            for rows in self.branch_rows.values():
                first, last = int(rows[0]), int(rows[-1])
                picks = (final_picks & (selection.row >= first) & (selection.row <= last)).nonzero().flatten()
                image = (selection.row[picks] - first) % images  # guidance repeats the batch of images
                selection.sample[picks] = final[image].detach().cpu().to(selection.sample.dtype)
                selection.filled[picks] = True

    def stored_bytes(self) -> int:
        held = _nbytes(self.cond_chunks) + _nbytes(self.shared)
        return held + sum(_nbytes([s.sample, s.timestep]) for s in self.selections)


def _per_image(values, start: int, count: int):
    """values[start + i mod len(values)] for i < count: a list for lists, an index-selected tensor for tensors."""
    index = [(start + i) % len(values) for i in range(count)]
    if torch.is_tensor(values):
        return values[torch.tensor(index)]
    return [values[i] for i in index]


def build_calibration_sets(
    pipe,
    n: int = 1024,
    policies=("ndtc",),
    *,
    num_inference_steps: int = 50,
    batch_size: int = 32,
    prompts: list[str] | None = None,
    prompt_embeds: torch.Tensor | dict | None = None,
    mu: float = 0.4,
    sigma: float = 0.4,
    steps_used: int = 25,
    generator: torch.Generator | None = None,
    **pipe_kwargs,
) -> dict[str, CalibrationSet]:
    """One calibration set per policy, all from one run of the full-precision pipeline, ``batch_size`` images at
    a time.

    The images' conditioning cycles through ``prompts`` (passed as ``prompt``), or through ``prompt_embeds``: a
    tensor (P, ...) passed as ``prompt_embeds``, or a dict of such tensors passed under their names (e.g.
    ``prompt_embeds``, ``pooled_prompt_embeds``, ``negative_prompt_embeds``), so text encoders may be absent;
    a class-conditional pipeline without either gets random class labels. ``pipe_kwargs`` go to every call
    (e.g. ``guidance_scale``, ``height``); a diffkit pipeline samples with deterministic DDIM unless ``solver``
    says otherwise. The run needs one network timestep per step (one or more calls: guidance may batch or
    repeat them). ``mu``, ``sigma``: NDTC's normal draw (the DNTC script's 0.4, 0.4); ``steps_used``: Q-Diffusion's
    number of evenly spaced steps (capped at ``num_inference_steps``).
    """
    policies = (policies,) if isinstance(policies, str) else tuple(policies)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise ValueError(f"calibration policy must be one of {POLICIES}, got {list(policies)}")
    for name, value in (("calibration size n", n), ("num_inference_steps", num_inference_steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if prompts is not None and prompt_embeds is not None:
        raise ValueError("pass prompts or prompt_embeds, not both")
    if prompts is not None and (isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts)):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if torch.is_tensor(prompt_embeds):
        prompt_embeds = {"prompt_embeds": prompt_embeds}
    if prompt_embeds is not None:
        if not isinstance(prompt_embeds, dict) or not prompt_embeds or not all(torch.is_tensor(v) for v in prompt_embeds.values()):
            raise ValueError("prompt_embeds must be a tensor or a dict of tensors, e.g. {'prompt_embeds': ..., 'pooled_prompt_embeds': ...}")
        if len({len(v) for v in prompt_embeds.values()}) != 1:
            raise ValueError(f"the prompt_embeds tensors must have the same length, got { {k: len(v) for k, v in prompt_embeds.items()} }")
    generator = generator or torch.Generator().manual_seed(0)
    _, model = denoising_network(pipe)
    call_parameters = inspect.signature(pipe.__call__).parameters
    per_image = {"prompt": prompts} if prompts is not None else dict(prompt_embeds or {})
    if not per_image and not any(k in pipe_kwargs for k in ("class_labels", "prompt", "prompt_embeds")):
        num_classes = getattr(pipe, "num_classes", None)
        if num_classes is None:
            raise ValueError("pass prompts or prompt_embeds (or the pipeline's own conditioning) for a model without class labels")
        per_image["class_labels"] = torch.randint(num_classes, (max(n, 1),), generator=generator).tolist()
    if "solver" in call_parameters:
        pipe_kwargs.setdefault("solver", "ddim")
    pipe_kwargs["output_type"] = "latent"

    selections = [_Selection(p, n, num_inference_steps, mu, sigma, steps_used, generator) for p in policies]
    recorder = _Recorder(selections, num_inference_steps)
    hook = model.register_forward_pre_hook(recorder, with_kwargs=True)
    images_done, rows_per_image = 0, None
    try:
        with tqdm(total=recorder.rows_needed, desc="calibration rows", disable=not _progress_enabled(pipe)) as bar:
            while recorder.rows_seen < recorder.rows_needed:
                remaining = recorder.rows_needed - recorder.rows_seen
                count = min(batch_size, math.ceil(remaining / (rows_per_image or 1)))
                kwargs = {name: _per_image(values, images_done, count) for name, values in per_image.items()}
                recorder.start_chunk()
                before = recorder.rows_seen
                final = pipe(**kwargs, num_inference_steps=num_inference_steps, generator=generator, **pipe_kwargs)
                final = final[0] if isinstance(final, tuple) else final.images
                recorder.finish_chunk(final if torch.is_tensor(final) else None)
                rows_per_image = (recorder.rows_seen - before) // count
                images_done += count
                bar.update(min(recorder.rows_seen, recorder.rows_needed) - before)
    finally:
        hook.remove()

    cond = _cat(recorder.cond_chunks)
    out = {}
    for selection in selections:
        if selection.policy == "naive":
            low, high = min(recorder.timesteps_seen), max(recorder.timesteps_seen)
            selection.sample = torch.randn(selection.sample.shape, generator=generator).to(selection.sample.dtype)
            selection.timestep = low + (high - low) * torch.rand(n, generator=generator)
            selection.filled[:] = True
        if selection.fed_t is not None:
            selection.timestep = selection.fed_t.to(selection.timestep.dtype)
        assert selection.filled.all(), "every pick is filled by the run"
        out[selection.policy] = CalibrationSet(
            selection.sample, selection.timestep, selection.row, cond, selection.step_index, num_inference_steps,
            recorder.names[0], recorder.names[1], recorder.shared, recorder.peak_bytes,
        )
    return out


def _progress_enabled(pipe) -> bool:
    return not getattr(pipe, "_progress_bar_config", {}).get("disable", False)


def build_calibration_set(pipe, n: int = 1024, policy: str = "ndtc", **kwargs) -> CalibrationSet:
    """The calibration set of one policy (see ``build_calibration_sets`` for the arguments)."""
    if policy not in POLICIES:
        raise ValueError(f"calibration policy must be one of {POLICIES}, got {policy!r}")
    return build_calibration_sets(pipe, n, (policy,), **kwargs)[policy]
