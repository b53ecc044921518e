"""The harness training loop: one loop on accelerate for CPU, several processes and GPU alike.

Whole data sets live as tensors on the device; there is no DataLoader. Every process draws the same permutation
(seeded by the run seed and the epoch), cuts the same global batches, and takes its contiguous equal share of
each; under DDP the gradients are averaged across processes, which is the gradient of the global batch mean, so
one process and N processes train the same model (up to float summation order). Batches are dicts
``{"x", "y", "index", ...}``: per-sample methods (ELR) find the sample ids there.

Hooks are objects with any of ``on_train_start``, ``on_step_start``, ``after_backward``, ``on_epoch_end`` and
``on_train_end``, each called with the ``TrainState`` (ReSTE's o-annealing, gradient diagnostics, weight
freezing, batch-size schedules: a hook or an algorithm may change ``state.batch_size``, which takes effect at the
next step).
"""

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .algorithms import ERM
from .data import HarnessData


HOOK_POINTS = ("on_train_start", "on_step_start", "after_backward", "on_epoch_end", "on_train_end")


@dataclass
class TrainState:
    """What hooks and algorithms see: the prepared (possibly DDP-wrapped) model and the bare one, the optimizer,
    the criterion, counters, the per-epoch history and ``logs`` (scalars a method reports at the end)."""

    accelerator: Accelerator
    model: nn.Module
    unwrapped_model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: Callable
    epochs: int
    batch_size: int
    train_size: int = 0
    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    logs: dict = field(default_factory=dict)


def _call(hooks, point: str, state: TrainState) -> None:
    for hook in hooks:
        method = getattr(hook, point, None)
        if method is not None:
            method(state)


def shard_rows(n: int, accelerator: Accelerator) -> slice:
    """This process's contiguous share of n rows: ceil(n / P) rows each, the last ones possibly short or empty."""
    per = -(-n // accelerator.num_processes)
    start = min(n, accelerator.process_index * per)
    return slice(start, min(n, start + per))


def gather_rows(fn: Callable[..., torch.Tensor], n: int, accelerator: Accelerator, *tensors: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to this process's rows of ``tensors`` (one output row per input row), gathered from all
    processes in row order: every process gets the same (n, ...) result."""
    rows = shard_rows(n, accelerator)
    local = fn(*(t[rows] for t in tensors))
    if accelerator.num_processes == 1:
        return local
    per = -(-n // accelerator.num_processes)
    padded = torch.zeros(per, *local.shape[1:], dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    # shard r sits at rows [r * per, r * per + len) of the gathered tensor, so its first n rows are in order
    return accelerator.gather(padded)[:n]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, accelerator: Accelerator, batch: int = 2048) -> float:
    """Top-1 accuracy, each process predicting its share of the rows."""
    was_training = model.training
    model.eval()

    def correct(xs, ys):
        return torch.cat([(model(xs[i : i + batch]).argmax(1) == ys[i : i + batch]).float()
                          for i in range(0, len(xs), batch)] or [torch.zeros(0, device=xs.device)])

    result = gather_rows(correct, len(y), accelerator, x, y).mean().item()
    model.train(was_training)
    return result


def _checked_batch_size(b, n: int, processes: int) -> int:
    if not (isinstance(b, int) and 0 < b <= n and b % processes == 0):
        raise ValueError(f"batch_size must be a positive int <= {n} (the training set) and a multiple of "
                         f"the {processes} processes, got {b!r}")
    return b


def train(model: nn.Module, data: HarnessData, *, optimizer: torch.optim.Optimizer, criterion: Callable, epochs: int,
          batch_size: int, seed: int, algorithm: Callable | None = None, hooks: Sequence = (), eval_every: int = 0,
          accelerator: Accelerator | None = None, progress: bool = True) -> TrainState:
    """Train ``model`` on ``data`` for ``epochs`` epochs of ``len(train) // batch_size`` steps (the last partial
    batch of each epoch is dropped, so every step has a full global batch and every process the same share). When
    ``state.batch_size`` changes during an epoch, the epoch goes on cutting batches of the new size from its
    permutation.

    ``eval_every`` > 0 records test accuracy every that many epochs in ``state.history``.
    """
    if not (isinstance(epochs, int) and epochs > 0):
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not (isinstance(eval_every, int) and eval_every >= 0):
        raise ValueError(f"eval_every must be an int >= 0, got {eval_every!r}")
    for hook in hooks:
        if not any(hasattr(hook, point) for point in HOOK_POINTS):
            raise TypeError(f"hook {hook!r} has none of the hook methods {', '.join(HOOK_POINTS)}")
    accelerator = accelerator or Accelerator()
    algorithm = algorithm or ERM()
    device = accelerator.device
    x, y = data.x_train.to(device), data.y_train.to(device)
    extras = {k: v.to(device) for k, v in data.train_extra.items()}
    criterion = criterion.to(device) if isinstance(criterion, nn.Module) else criterion
    prepared_model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState(accelerator, prepared_model, accelerator.unwrap_model(prepared_model), optimizer, criterion,
                       epochs, batch_size, train_size=len(y))
    _call(hooks, "on_train_start", state)
    bar = tqdm(total=epochs, desc="train", disable=not (progress and accelerator.is_main_process), leave=False)
    for epoch in range(epochs):
        state.epoch = epoch
        # the same permutation on every process: seeded by the run and the epoch, drawn on the CPU
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).to(device)
        prepared_model.train()
        loss_sum = torch.zeros((), device=device)
        start = steps = 0
        # the batch size is read before every step, so a hook or algorithm may grow it from one step to the next
        # (AdAdaGrad's tests); the epoch ends when the rest of the permutation is shorter than the next batch
        while True:
            b, p = _checked_batch_size(state.batch_size, len(y), accelerator.num_processes), accelerator.num_processes
            if start + b > len(y):
                break
            index = order[start : start + b].view(p, b // p)[accelerator.process_index]
            start, steps = start + b, steps + 1
            batch = {"x": x[index], "y": y[index], "index": index, **{k: v[index] for k, v in extras.items()}}
            _call(hooks, "on_step_start", state)
            loss, _ = algorithm(state, batch)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            _call(hooks, "after_backward", state)
            optimizer.step()
            loss_sum += loss.detach()
            state.step += 1
        # each process's loss is the mean over an equal share, so the mean over processes is the global batch mean
        record = {"epoch": epoch + 1, "train_loss": accelerator.reduce(loss_sum / steps, "mean").item()}
        if eval_every and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            record["test_accuracy"] = accuracy(state.unwrapped_model, data.x_test.to(device), data.y_test.to(device),
                                               accelerator)
        state.history.append(record)
        _call(hooks, "on_epoch_end", state)
        bar.set_postfix(loss=f"{record['train_loss']:.4f}")
        bar.update()
    bar.close()
    _call(hooks, "on_train_end", state)
    return state


def save_checkpoint(path: str | Path, model: nn.Module, extra: dict[str, torch.Tensor] | None = None) -> None:
    """The model's state dict (plus ``extra`` tensors under ``extra.<name>``) as safetensors, written to a temporary
    file beside ``path`` and renamed into place: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, value in (extra or {}).items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"extra[{name!r}] must be a tensor, got {type(value).__name__}")
        tensors[f"extra.{name}"] = value.detach().cpu().contiguous()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Load weights saved by ``save_checkpoint`` into ``model`` (strictly: every key must match); returns the extras."""
    tensors = load_file(str(path))
    extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("extra.")}, strict=True)
    return extra
