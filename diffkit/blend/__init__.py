"""Modality blending (MaGIC, Yu et al., ICLR 2024): image completion guided by any set of modalities."""

from .adapters import DEFAULT_ADAPTERS, adapter_features, adapter_for, load_adapters
from .cmb import (MODES, STEP_RULES, Completion, LineSearch, Modality, OfficialStep, blend_loss, blend_update, complete,
                  step_rule_for)
from .controlnets import ControlNetModality, controlled, controlnet_for
from .features import encoder_features, injected
from .modalities import MODALITIES, edges, extract, ink_mask, low_resolution


__all__ = ["DEFAULT_ADAPTERS", "MODALITIES", "MODES", "STEP_RULES", "Completion", "ControlNetModality", "LineSearch",
           "Modality", "OfficialStep", "adapter_features", "adapter_for", "blend_loss", "blend_update", "complete",
           "controlled", "controlnet_for", "edges", "encoder_features", "extract", "injected", "ink_mask",
           "load_adapters", "low_resolution", "step_rule_for"]
