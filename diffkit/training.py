"""Training: the diffusion objectives and one training loop on accelerate, used by ``diffkit train`` and the scripts
that train the shipped networks (the default model, the digits classifier, the modality adapters).

``fit(model, loss_fn, ...)`` runs optimizer steps of ``loss_fn(model, step, generator)`` with mixed precision and
gradient accumulation from accelerate, gradient clipping, an exponential moving average of the weights
(diffusers' ``EMAModel``), a progress bar, sample grids every N steps and checkpoints written atomically.

Exact resume: every random draw of a step comes from a generator (and a global torch seed) derived from
(seed, step, micro-batch, process), never from state carried over from earlier steps, so a checkpoint needs only the
weights, the optimizer, the learning-rate schedule, the EMA and the step. A run killed and resumed from its last
checkpoint reaches the same weights as a run that was never interrupted (bit for bit on CPU).
"""

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .denoiser import convert
from .schedule import NoiseSchedule


# -- objectives ----------------------------------------------------------------------------------------------------


FLOW_TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def flow_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator | None = None,
                   sampling: str = "uniform", shift: float = 1.0) -> torch.Tensor:
    """n flow-matching training timesteps t = N sigma (float64): sigma uniform in [0, 1), or logit-normal (the sigmoid
    of a standard normal, SD3's default weighting, Esser et al. 2024), then shifted as diffusers' FlowMatch schedulers
    shift their sigmas: sigma' = shift sigma / (1 + (shift - 1) sigma)."""
    if sampling not in FLOW_TIMESTEP_SAMPLING:
        raise ValueError(f"timestep_sampling must be one of {FLOW_TIMESTEP_SAMPLING}, got {sampling!r}")
    if not (isinstance(shift, (int, float)) and shift > 0):
        raise ValueError(f"shift must be a positive number, got {shift!r}")
    if sampling == "uniform":
        u = torch.rand(n, generator=generator, dtype=torch.float64)
    else:
        u = torch.sigmoid(torch.randn(n, generator=generator, dtype=torch.float64))
    return num_train_timesteps * shift * u / (1 + (shift - 1) * u)


def diffusion_loss(
    model,
    schedule: NoiseSchedule,
    prediction_type: str,
    x0: torch.Tensor,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    timestep_sampling: str = "uniform",
    shift: float = 1.0,
) -> torch.Tensor:
    """The denoising loss: noise x0 to x_t = alpha_t x0 + sigma_t eps and regress the network on its target (eps, x0,
    v or the flow velocity eps - x0) with mean squared error.

    VP schedule: t uniform over the integer timesteps (Ho et al. 2020's simple loss). Flow-matching schedule (Lipman
    et al. 2023; rectified flow): t = N sigma with sigma from ``flow_timesteps`` (``timestep_sampling``, ``shift``), the
    timestep diffusers' FlowMatch schedulers and SD3 hand the model.
    """
    b = x0.shape[0]
    if schedule.path == "flow":
        t = flow_timesteps(b, schedule.num_train_timesteps, generator, timestep_sampling, shift)
    else:
        if (timestep_sampling, shift) != ("uniform", 1.0):
            raise ValueError("timestep_sampling and shift are flow-matching options; a VP schedule draws integer "
                             "timesteps uniformly")
        t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    alpha, sigma = schedule.coefficients(t, x0)
    x_t = schedule.add_noise(x0, eps, t)
    target = convert(eps, "epsilon", prediction_type, x_t, alpha, sigma)
    pred = model(x_t, t.to(x0.device, torch.float32 if schedule.path == "flow" else torch.long), **(cond or {}),
                 return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), target.float())


# -- the training loop ---------------------------------------------------------------------------------------------


def step_seeds(seed: int, step: int, micro: int, process: int) -> tuple[int, int]:
    """Two independent 63-bit seeds (the step's generator, the global torch seed) for one micro-batch of one
    process at one optimizer step: a function of these four numbers alone (NumPy's SeedSequence hashing)."""
    a, b = np.random.SeedSequence([seed, step, micro, process]).generate_state(2, np.uint64)
    return int(a) >> 1, int(b) >> 1


@dataclass
class FitResult:
    """``model``: the trained network (unwrapped from DDP); ``ema``: its EMAModel or None; ``log``: one record per
    ``log_every`` steps; ``step``: the steps done; ``resumed_from``: the checkpoint's step, or None."""

    model: torch.nn.Module
    ema: object | None
    log: list[dict] = field(default_factory=list)
    step: int = 0
    resumed_from: int | None = None

    def averaged_model(self) -> torch.nn.Module:
        """The network with the EMA weights (a copy; the network itself when there is no EMA)."""
        if self.ema is None:
            return self.model
        import copy

        model = copy.deepcopy(self.model).eval()
        self.ema.copy_to(model.parameters())
        return model


CHECKPOINT = re.compile(r"^step-(\d+)$")


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``checkpoint_dir`` (a folder appears only once fully written)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return max(found)[1] if found else None


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict, current_groups: list[dict]) -> dict:
    state = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = []
    for saved, current in zip(meta["param_groups"], current_groups):  # JSON turned tuples (betas) into lists
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()})
    return {"state": state, "param_groups": groups}


def _json(value, what: str) -> str:
    try:
        return json.dumps(value, indent=1)
    except TypeError as err:
        raise TypeError(f"{what} cannot be checkpointed as JSON: {err}") from None


def save_training_state(folder: Path, *, model, optimizer, lr_scheduler, ema, scaler, step: int, log: list,
                        fingerprint) -> None:
    """One checkpoint, written into a temporary folder beside ``folder`` and renamed into place: safetensors for
    the tensors (weights, optimizer moments, EMA), JSON for the rest. No pickles."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, staging / "model.safetensors")
        optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(optimizer_tensors, staging / "optimizer.safetensors")
        state = {"step": step, "log": log, "fingerprint": fingerprint, "optimizer": optimizer_meta,
                 "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
                 "scaler": scaler.state_dict() if scaler is not None else None}
        if ema is not None:
            ema_state = ema.state_dict()
            names = [name for name, _ in model.named_parameters()]
            save_file({n: p.detach().cpu().contiguous() for n, p in zip(names, ema_state.pop("shadow_params"))},
                      staging / "ema.safetensors")
            state["ema"] = ema_state
        (staging / "state.json").write_text(_json(state, "the training state (learning-rate schedule, optimizer settings)"))
        os.chmod(staging, 0o755)
        if folder.exists():  # a checkpoint of this step already (a rerun): replace it
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_training_state(folder: Path, *, model, optimizer, lr_scheduler, ema, scaler, fingerprint) -> dict:
    """Restore what ``save_training_state`` wrote; returns the JSON state (step, log). Refuses a checkpoint written
    by a run with another ``fingerprint`` (another recipe: resuming it would silently mix two runs)."""
    folder = Path(folder)
    state = json.loads((folder / "state.json").read_text())
    if json.loads(json.dumps(fingerprint)) != state["fingerprint"]:
        raise ValueError(f"checkpoint {folder} was written by a run with other settings; resume it with those, or "
                         "start afresh in another output folder")
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), state["optimizer"],
                                                   optimizer.state_dict()["param_groups"]))
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    if ema is not None:
        shadow = load_file(str(folder / "ema.safetensors"))
        names = [name for name, _ in model.named_parameters()]
        device = next(iter(ema.shadow_params)).device if ema.shadow_params else "cpu"
        ema.load_state_dict({**state["ema"], "shadow_params": [shadow[n].to(device) for n in names]})
    return state


def _checked_int(value, name: str, minimum: int) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def fit(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, int, torch.Generator], torch.Tensor],
    *,
    optimizer: torch.optim.Optimizer,
    steps: int,
    lr_scheduler=None,
    seed: int = 0,
    accelerator=None,
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
    ema_decay: float | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 2,
    resume: bool = True,
    fingerprint=None,
    stop_after: int | None = None,
    sample_fn: Callable[[torch.nn.Module, int], None] | None = None,
    sample_every: int = 0,
    log_every: int = 50,
    progress: bool = True,
    desc: str = "train",
) -> FitResult:
    """Train ``model`` for ``steps`` optimizer steps of ``loss_fn(model, step, generator)``.

    ``loss_fn`` draws this process's micro-batch and returns its mean loss; it must take every random number from
    ``generator`` (global torch randomness, e.g. dropout, is seeded per micro-batch too). Each optimizer step
    averages ``gradient_accumulation_steps`` micro-batches (gradients are synchronised across processes on the
    last one only) and, with several processes, DDP averages over processes. ``lr_scheduler`` steps once per
    optimizer step (it is not handed to accelerate, which would step it once per process).

    ``ema_decay``: keep diffusers' ``EMAModel`` of the weights (its default warm-up, decay capped at ``ema_decay``).
    ``checkpoint_dir`` / ``checkpoint_every``: write ``step-NNNNNNN`` checkpoints (and one at the end), keeping the
    newest ``keep_checkpoints``; with ``resume`` the newest one is loaded first (``fingerprint``, any JSON value, must
    match the one it was written with). ``stop_after``: end this session after that many steps in all, with a
    checkpoint, as a time-limited job would; running again resumes there. ``sample_fn(model, step)`` runs on the
    main process every ``sample_every`` steps with the EMA weights swapped in (and in eval mode).
    """
    from accelerate import Accelerator

    _checked_int(steps, "steps", 1)
    _checked_int(gradient_accumulation_steps, "gradient_accumulation_steps", 1)
    _checked_int(checkpoint_every, "checkpoint_every", 0)
    _checked_int(keep_checkpoints, "keep_checkpoints", 1)
    _checked_int(sample_every, "sample_every", 0)
    _checked_int(log_every, "log_every", 1)
    if stop_after is not None:
        _checked_int(stop_after, "stop_after", 1)
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
    if ema_decay is not None and not (isinstance(ema_decay, float) and 0 < ema_decay < 1):
        raise ValueError(f"ema_decay must be a float in (0, 1) or None, got {ema_decay!r}")
    if (checkpoint_every or stop_after) and checkpoint_dir is None:
        raise ValueError("checkpoint_every and stop_after need a checkpoint_dir")

    accelerator = accelerator or Accelerator()
    prepared, optimizer = accelerator.prepare(model, optimizer)
    model = accelerator.unwrap_model(prepared)
    ema = None
    if ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(model.parameters(), decay=ema_decay)
        ema.to(accelerator.device)
    result = FitResult(model, ema)
    checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume and checkpoints is not None and (last := latest_checkpoint(checkpoints)) is not None:
        state = load_training_state(last, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema,
                                    scaler=accelerator.scaler, fingerprint=fingerprint)
        result.step = result.resumed_from = state["step"]
        result.log = state["log"]
        if result.step > steps:
            raise ValueError(f"checkpoint {last} is at step {result.step}, past the {steps} steps asked for")

    def checkpoint() -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_training_state(checkpoints / f"step-{result.step:07d}", model=model, optimizer=optimizer,
                                lr_scheduler=lr_scheduler, ema=ema, scaler=accelerator.scaler, step=result.step,
                                log=result.log, fingerprint=fingerprint)
            done = sorted((int(m.group(1)), p) for p in checkpoints.iterdir() if (m := CHECKPOINT.match(p.name)))
            for _, old in done[:-keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def samples() -> None:
        if accelerator.is_main_process:
            was_training = model.training
            model.eval()
            if ema is not None:
                ema.store(model.parameters())
                ema.copy_to(model.parameters())
            with torch.no_grad():
                sample_fn(model, result.step)
            if ema is not None:
                ema.restore(model.parameters())
            model.train(was_training)
        accelerator.wait_for_everyone()

    end = steps if stop_after is None else min(steps, stop_after)
    bar = tqdm(total=steps, initial=result.step, desc=desc, disable=not (progress and accelerator.is_main_process))
    prepared.train()
    running, since, start = torch.zeros((), device=accelerator.device), 0, time.time()
    params = [p for p in prepared.parameters() if p.requires_grad]
    while result.step < end:
        for micro in range(gradient_accumulation_steps):
            data_seed, torch_seed = step_seeds(seed, result.step, micro, accelerator.process_index)
            torch.manual_seed(torch_seed)  # dropout and any other global draw of this micro-batch
            generator = torch.Generator().manual_seed(data_seed)
            last = micro == gradient_accumulation_steps - 1
            with nullcontext() if last else accelerator.no_sync(prepared):  # DDP averages on the last one only
                with accelerator.autocast():  # the forward in mixed precision; the backward outside, as torch advises
                    loss = loss_fn(prepared, result.step, generator)
                if loss.ndim != 0 or not torch.isfinite(loss):
                    raise ValueError(f"loss_fn must return a finite scalar, got {loss.detach().flatten()[:4].tolist()} "
                                     f"at step {result.step}")
                accelerator.backward(loss / gradient_accumulation_steps)
            running += loss.detach() / gradient_accumulation_steps
        if max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        if lr_scheduler is not None and not optimizer.step_was_skipped:  # fp16: an overflow skips the step
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(model.parameters())
        result.step += 1
        since += 1
        bar.update()
        if result.step % log_every == 0 or result.step == end:
            loss_value = accelerator.reduce(running / since, "mean").item()
            record = {"step": result.step, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                      "seconds": round(time.time() - start, 3)}
            result.log.append(record)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            running, since = torch.zeros((), device=accelerator.device), 0
        if sample_fn is not None and sample_every and result.step % sample_every == 0:
            samples()
        if checkpoints is not None and ((checkpoint_every and result.step % checkpoint_every == 0) or result.step == end):
            checkpoint()
    bar.close()
    prepared.eval()
    return result
