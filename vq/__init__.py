"""VQ image tokenizer: images <-> grids of discrete codes (see vq/model.py; CLI: python -m vq --help)."""

from vq.model import VQConfig, VQTokenizer, images_to_tensor, tensor_to_images

__all__ = ["VQConfig", "VQTokenizer", "images_to_tensor", "tensor_to_images"]
