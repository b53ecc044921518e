"""Calibration sets: the network inputs (x_t, t, conditioning) that post-training quantisation measures ranges on.

The full-precision pipeline is run once and every network call is recorded as executed (classifier-free
guidance doubles the batch: conditional and unconditional rows are both kept, as Q-Diffusion does for SD).
A policy then picks N rows:

- "ndtc": PTQ4DM's normally distributed time-step calibration. Step index k ~ int(N(mu, sigma) * S), clamped
  to [0, S - 1], over the S sampler steps counted from the data end, so k / S is the fraction of the way from
  data to noise; mu = sigma = 0.4 as in the released DNTC script. (The official code feeds the network
  t = k but takes x from the mirrored step S - 1 - k; here x and t always come from the same executed call.)
- "uniform": Q-Diffusion's time-step-aware calibration, evenly spaced steps with N / num_steps rows each.
- "naive": Gaussian noise at a uniformly random training timestep, with recorded conditioning rows.
"""

import math
from dataclasses import dataclass

import torch


POLICIES = ("ndtc", "uniform", "naive")


@dataclass
class CalibrationSet:
    """N network inputs: ``sample`` (N, C, H, W), ``timestep`` (N,), ``cond`` (keyword tensors with N rows) and
    ``step_index`` (N,): the sampler step counted from the data end (-1 for the naive policy's noise rows)."""

    sample: torch.Tensor
    timestep: torch.Tensor
    cond: dict
    step_index: torch.Tensor
    num_steps: int

    def __len__(self) -> int:
        return len(self.sample)

    def batches(self, batch_size: int = 128):
        """(sample, timestep, cond) in batches, in order."""
        for start in range(0, len(self), batch_size):
            rows = slice(start, start + batch_size)
            yield self.sample[rows], self.timestep[rows], {k: v[rows] for k, v in self.cond.items()}


def record_network_inputs(pipe, **call_kwargs) -> list[dict]:
    """Run ``pipe(**call_kwargs)`` and return, per network call, the executed inputs (on CPU).

    Each entry holds "sample" (B, ...), "timestep" (B,) and "cond": the keyword tensors with B rows.
    """
    calls = []

    def record(module, args, kwargs):
        names = ("sample", "timestep")
        values = dict(zip(names, args)) | {k: kwargs[k] for k in names if k in kwargs}
        x = values["sample"].detach()
        t = torch.as_tensor(values["timestep"]).detach().float().flatten().expand(len(x)).clone()
        cond = {k: v.detach().cpu() for k, v in kwargs.items() if torch.is_tensor(v) and k not in names and len(v) == len(x)}
        calls.append({"sample": x.cpu(), "timestep": t.cpu(), "cond": cond})

    hook = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe(**call_kwargs)
    finally:
        hook.remove()
    return calls


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


def calibration_run(pipe, n: int = 1024, *, num_inference_steps: int = 50, generator: torch.Generator | None = None,
                    **pipe_kwargs) -> list[dict]:
    """Run the full-precision pipeline (DDIM, deterministic) on enough images for n rows per step and return its
    network inputs per call, ordered from the data end (index k = k-th step from the data end).

    ``pipe_kwargs`` go to the pipeline (e.g. ``prompt=[...]``, ``guidance_scale``); for a class-conditional
    pipeline without them, random class labels are drawn.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"calibration size n must be a positive integer, got {n!r}")
    generator = generator or torch.Generator().manual_seed(0)
    rows_per_image = 2 if pipe_kwargs.get("guidance_scale", 3.0) != 1 and pipe_kwargs.get("guidance", "cfg") else 1
    if not any(k in pipe_kwargs for k in ("class_labels", "prompt", "prompt_embeds")):
        if getattr(pipe, "num_classes", None) is None:
            raise ValueError("pass the pipeline's conditioning (e.g. prompt=[...]) for a model without class labels")
        images = math.ceil(n / rows_per_image)
        pipe_kwargs["class_labels"] = torch.randint(pipe.num_classes, (images,), generator=generator).tolist()
    pipe_kwargs = {"solver": "ddim", "output_type": "latent", **pipe_kwargs}
    return record_network_inputs(pipe, num_inference_steps=num_inference_steps, generator=generator, **pipe_kwargs)[::-1]


def build_calibration_set(
    pipe,
    n: int = 1024,
    policy: str = "ndtc",
    *,
    num_inference_steps: int = 50,
    mu: float = 0.4,
    sigma: float = 0.4,
    steps_used: int = 25,
    recorded: list[dict] | None = None,
    generator: torch.Generator | None = None,
    **pipe_kwargs,
) -> CalibrationSet:
    """Select n network inputs by ``policy`` from a ``calibration_run`` of the pipeline (made here unless
    ``recorded`` passes one, e.g. to compare policies on the same trajectories)."""
    if policy not in POLICIES:
        raise ValueError(f"calibration policy must be one of {POLICIES}, got {policy!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"calibration size n must be a positive integer, got {n!r}")
    generator = generator or torch.Generator().manual_seed(0)
    calls = recorded or calibration_run(pipe, n, num_inference_steps=num_inference_steps, generator=generator, **pipe_kwargs)
    steps, rows = len(calls), len(calls[0]["sample"])

    if policy == "naive":
        shape = calls[0]["sample"].shape[1:]
        sample = torch.randn(n, *shape, generator=generator)
        timestep = torch.randint(pipe.scheduler.config.num_train_timesteps, (n,), generator=generator).float()
        pick = torch.randint(rows, (n,), generator=generator)
        cond = {k: v[pick] for k, v in calls[0]["cond"].items()}
        return CalibrationSet(sample, timestep, cond, torch.full((n,), -1), steps)

    if policy == "ndtc":
        step_index = ndtc_step_indices(n, steps, mu, sigma, generator)
        row = torch.arange(n) % rows  # sample i follows trajectory row i, as PTQ4DM takes image i at its own step
    else:
        step_index = uniform_step_indices(n, steps, min(steps_used, steps))
        row = torch.cat([torch.randperm(rows, generator=generator)[: int(c)] for c in torch.bincount(step_index) if c])
        if len(row) < n:
            raise ValueError(f"uniform calibration needs at least {n // steps_used + 1} rows per step; run more images")
    pairs = list(zip(step_index.tolist(), row.tolist()))  # (step from the data end, row of that call)
    sample = torch.stack([calls[k]["sample"][r] for k, r in pairs])
    timestep = torch.stack([calls[k]["timestep"][r] for k, r in pairs])
    cond = {name: torch.stack([calls[k]["cond"][name][r] for k, r in pairs]) for name in calls[0]["cond"]}
    return CalibrationSet(sample, timestep, cond, step_index, steps)
