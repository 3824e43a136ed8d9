"""MARS: a frozen Qwen + SemVIE visual experts for autoregressive text-to-image generation.

    from mars import MarsPipeline
    image = MarsPipeline.from_pretrained("checkpoints/mars-shapes")("a red circle").images[0]

The public names below are imported on first use, so the light command-line tools
(`python -m mars.shapes`, `python -m mars.eval`) start without loading torch and transformers.
"""

from importlib import import_module

_EXPORTS = {
    "mars.config": ["MODEL_PRESETS", "MarsConfig"],
    "mars.model": [
        "MarsModel",
        "MarsOutput",
        "apply_trainable_filter",
        "build_batch",
        "build_qwen",
        "encode_texts",
        "is_trainable",
        "parameter_report",
        "trainable_parameters",
        "trainable_state_dict",
    ],
    "mars.pipeline": ["MarsPipeline", "MarsPipelineOutput"],
    "mars.sampling": ["caption_images", "caption_nll", "generate", "generate_images", "generate_text", "sample_logits"],
    "mars.semvie": ["KVCache", "ModalityRouter", "SemVIELayer", "SemVIEModel"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'mars' has no attribute {name!r}")
    value = getattr(import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
