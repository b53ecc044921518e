"""Harness tasks: what a card's ``task`` names. Each task is one ``Task`` entry in its own module here, holding the
metrics a card of it may list, the check of one method's resolved setting and the runner of one method for one
seed; ``TASKS`` lists them. A new task is a new module with its ``TASK`` and its line below."""

from . import benign_oscillation, boost, classify, coherence, condense, denoise, function_1d, graph, grow, inr, noise_mask, xor_grokking
from .base import Task, build, build_data, component_spec


TASKS: dict[str, Task] = {task.name: task for task in (
    classify.TASK, function_1d.TASK, inr.TASK, denoise.TASK, grow.TASK, condense.TASK, xor_grokking.TASK,
    coherence.TASK, benign_oscillation.TASK, boost.TASK, graph.TASK, noise_mask.TASK,
)}

__all__ = ["TASKS", "Task", "build", "build_data", "component_spec"]
