"""Shared pytest fixtures: a tiny but real MARS bundle with random weights, built in a few seconds.

    def test_something(tiny_bundle, tiny_pipe): ...   # a bundle directory, and MarsPipeline loaded from it
    def test_cli(reuse_tiny_pipe): ...  # from_pretrained(tiny_bundle) hands back tiny_pipe: no reload per call

The bundle is what `MarsPipeline.save_pretrained` writes for a trained model, only small and
untrained: the real Qwen tokenizer with a VocabMap over every shapes-world evaluation prompt
(both languages) and scene descriptions, a 2-layer Qwen2 (hidden 64) over that trimmed
vocabulary, a MarsModel predicting 8 x 8 codes of the shipped VQ tokenizer (checkpoints/mars-shapes/vq:
f = 16, 256 codes, so 128 px base images) and a SuperResModel (k = 4) up to 16 x 16 codes (256 px).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED_VQ = REPO / "checkpoints" / "mars-shapes" / "vq"
TINY_CONTEXT = 512  # max_position_embeddings: prompts up to 512 - (1 + 64 + 256) = 191 tokens with SR


def shapes_corpus() -> list[str]:
    """Every evaluation prompt of the six categories in both languages, plus scene descriptions.

    Enumerated rather than sampled: Chinese runs tokenize as one piece, so a VocabMap only covers
    a prompt whose exact wording it saw."""
    from mars.shapes import (COLORS, LANGS, NUMBERS_EN, RELATIONS_EN, SHAPES, PromptSpec, describe_scene,
                             format_prompt, random_scene)

    pairs = list(itertools.permutations(SHAPES, 2))
    specs = [PromptSpec("single_object", (s,)) for s in SHAPES]
    specs += [PromptSpec("two_object", pair) for pair in pairs]
    specs += [PromptSpec("counting", (s,), count=n) for s in SHAPES for n in NUMBERS_EN]
    specs += [PromptSpec("colors", (s,), (c,)) for s in SHAPES for c in COLORS]
    specs += [PromptSpec("position", pair, relation=r) for pair in pairs for r in RELATIONS_EN]
    specs += [PromptSpec("color_attr", pair, colors) for pair in pairs for colors in itertools.permutations(COLORS, 2)]
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(100)]
    return [format_prompt(spec, lang) for spec in specs for lang in LANGS] + \
           [describe_scene(scene, lang) for scene in scenes for lang in LANGS]


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A MarsPipeline bundle directory (random weights, 256-px output with super-resolution)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mars.model import MarsModel
    from mars.pipeline import MarsPipeline
    from mars.superres import SuperResConfig, SuperResModel
    from mars.tokenizer import PromptTokenizer, VocabMap, load_qwen_tokenizer
    from vq import VQTokenizer

    root = tmp_path_factory.mktemp("tiny_bundle")
    tokenizer = load_qwen_tokenizer()
    vocab_map = VocabMap.from_texts(tokenizer, shapes_corpus())
    torch.manual_seed(0)
    qwen_config = Qwen2Config(vocab_size=len(vocab_map), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=128, max_position_embeddings=TINY_CONTEXT,
                              tie_word_embeddings=True, eos_token_id=vocab_map.eos_id, pad_token_id=vocab_map.pad_id,
                              bos_token_id=None)
    Qwen2ForCausalLM(qwen_config).save_pretrained(root / "qwen")
    model = MarsModel.from_qwen(root / "qwen", codebook_size=256, image_grid=(8, 8))
    superres = SuperResModel.from_config(SuperResConfig(low_grid=(8, 8), group_size=4), model.config)
    pipe = MarsPipeline(model, VQTokenizer.from_pretrained(SHIPPED_VQ), PromptTokenizer(tokenizer, vocab_map), superres)
    return pipe.save_pretrained(root / "bundle")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_bundle):
    """MarsPipeline.from_pretrained(tiny_bundle), loaded once per session: do not modify it."""
    from mars.pipeline import MarsPipeline

    return MarsPipeline.from_pretrained(tiny_bundle)


@pytest.fixture
def reuse_tiny_pipe(monkeypatch, tiny_bundle, tiny_pipe):
    """MarsPipeline.from_pretrained(tiny_bundle) returns the session's pipeline (CPU, default dtype)."""
    from mars.pipeline import MarsPipeline

    load = MarsPipeline.from_pretrained.__func__

    def from_pretrained(cls, directory, device=None, dtype=None):
        if Path(directory) == tiny_bundle and str(device) == "cpu" and dtype is None:
            return tiny_pipe
        return load(cls, directory, device, dtype)

    monkeypatch.setattr(MarsPipeline, "from_pretrained", classmethod(from_pretrained))
    return tiny_bundle
