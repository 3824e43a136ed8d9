"""MARS: a frozen Qwen + SemVIE visual experts for autoregressive text-to-image generation."""

from mars.config import PRESETS, MarsConfig
from mars.model import (
    MarsModel,
    MarsOutput,
    apply_trainable_filter,
    build_batch,
    build_qwen,
    encode_texts,
    is_trainable,
    parameter_report,
    trainable_parameters,
    trainable_state_dict,
)
from mars.sampling import caption_images, generate, generate_images, generate_text, sample_logits
from mars.semvie import KVCache, ModalityRouter, SemVIELayer, SemVIEModel

__all__ = [
    "PRESETS",
    "KVCache",
    "MarsConfig",
    "MarsModel",
    "MarsOutput",
    "ModalityRouter",
    "SemVIELayer",
    "SemVIEModel",
    "apply_trainable_filter",
    "build_batch",
    "build_qwen",
    "caption_images",
    "encode_texts",
    "generate",
    "generate_images",
    "generate_text",
    "is_trainable",
    "parameter_report",
    "sample_logits",
    "trainable_parameters",
    "trainable_state_dict",
]
