"""Splitting work across the processes of ``accelerate launch`` and gathering the results, for jobs whose size
does not fit in one list: each process computes its contiguous share from the count alone."""

import os

import torch


def process_state():
    """accelerate's ``PartialState`` for this process. On a machine without a GPU, accelerate joins the processes of
    ``accelerate launch`` only when told it runs on the CPU (``PartialState(cpu=True)``, as ``Accelerator(cpu=True)``
    does); a bare ``PartialState()`` leaves each process alone, so every one would do all the work."""
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or (
        launched and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def process_share(n: int, state) -> range:
    """This process's contiguous share of n items, cut as accelerate's ``split_between_processes`` cuts a list
    (the first n mod P processes take one more), as a range: nothing of size n is built."""
    per, extra = divmod(n, state.num_processes)
    start = state.process_index * per + min(state.process_index, extra)
    return range(start, start + per + (state.process_index < extra))


def gather_rows(local: torch.Tensor, state) -> torch.Tensor:
    """Every process's rows, in process order, on the CPU (each process may hold a different number of rows)."""
    if state.num_processes == 1:
        return local
    from accelerate.utils import gather

    device = state.device
    counts = gather(torch.tensor([len(local)], device=device)).tolist()
    padded = torch.zeros(max(counts), *local.shape[1:], dtype=local.dtype, device=device)
    padded[: len(local)] = local.to(device)
    rows = gather(padded).cpu().split(max(counts))
    return torch.cat([r[:c] for r, c in zip(rows, counts)])
