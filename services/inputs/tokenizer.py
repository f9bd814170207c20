"""Prompt tokenization for the text encoder, exactly as diffusers' pipelines do it.

A thin wrapper over transformers' CLIP tokenizer loaded from a diffusers
checkpoint's `tokenizer/` folder, used by the text-encoder stage; it reports
the text each prompt lost to truncation. No JAX here.

`write_tiny_vocab` writes a small but real CLIP BPE tokenizer, so tests and the
demo model can build checkpoints without network access.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# transformers' default model_max_length when tokenizer_config.json names none.
_NO_MAX_LENGTH = int(1e20)


@dataclasses.dataclass(frozen=True)
class TokenizedPrompts:
    """Token ids for a batch of prompts and what truncation removed from each."""

    input_ids: np.ndarray  # (B, max_length) int32, padded with the tokenizer's pad token
    truncated: tuple[bool, ...]  # per prompt: did it not fit in max_length tokens?
    removed_text: tuple[str, ...]  # per prompt: the decoded part that was cut off ("" if none)


class PromptTokenizer:
    """Tokenizes prompts to fixed-length id arrays, as StableDiffusionPipeline does."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.tokenizer = tokenizer  # a transformers CLIPTokenizer (slow or fast)
        self.max_length = max_length

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def vocab_size(self) -> int:
        """Ids run 0..vocab_size-1 (added tokens included): the text encoder's vocab must cover them."""
        return len(self.tokenizer)

    def tokenize(self, prompts: list[str]) -> TokenizedPrompts:
        if isinstance(prompts, str):
            raise TypeError("tokenize takes a list of prompts, not a single string")
        prompts = list(prompts)
        if not prompts:
            return TokenizedPrompts(np.zeros((0, self.max_length), np.int32), (), ())
        # The ids the model sees: diffusers' StableDiffusionPipeline call, verbatim.
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True)["input_ids"]
        input_ids = np.asarray(ids, dtype=np.int32)
        # What was cut off, as diffusers reports it: tokenize without truncation and
        # decode what lies between the kept tokens (the last kept one is the EOS at
        # max_length-1) and the untruncated EOS.
        full = self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
        truncated = tuple(len(row) > self.max_length for row in full)
        removed = tuple(
            self.tokenizer.decode(row[self.max_length - 1 : -1]) if cut else "" for row, cut in zip(full, truncated)
        )
        return TokenizedPrompts(input_ids, truncated, removed)


def load_tokenizer(path: str | Path, *, max_length: int | None = None) -> PromptTokenizer:
    """Load the CLIP tokenizer from a diffusers `tokenizer/` folder (or a checkpoint root holding one).

    Reads `vocab.json` + `merges.txt` or `tokenizer.json`, whichever is there.
    `max_length` defaults to the tokenizer's `model_max_length` (77 for SD).
    """
    import transformers  # heavy: only when a tokenizer is actually loaded

    path = Path(path)
    if not _has_tokenizer_files(path) and _has_tokenizer_files(path / "tokenizer"):
        path = path / "tokenizer"
    if not _has_tokenizer_files(path):
        raise FileNotFoundError(f"{path}: no CLIP tokenizer files (vocab.json + merges.txt, or tokenizer.json)")
    # diffusers loads `CLIPTokenizer`; in transformers 4 that is the slow, file-pair
    # tokenizer, so a folder holding only tokenizer.json needs the fast class.
    # (transformers 5 has one class that reads either; CLIPTokenizerFast is its alias.)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        cls = transformers.CLIPTokenizer
    else:
        cls = transformers.CLIPTokenizerFast
    tokenizer = cls.from_pretrained(str(path))
    if max_length is None:
        max_length = int(tokenizer.model_max_length)
        if max_length >= _NO_MAX_LENGTH:
            raise ValueError(
                f"{path}: tokenizer_config.json sets no model_max_length; pass max_length "
                "(the text encoder's max_position_embeddings, 77 for SD)"
            )
    return PromptTokenizer(tokenizer, max_length)


def _has_tokenizer_files(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())


# ---------------------------------------------------------------------------
# A tiny CLIP vocabulary for tests and the offline demo model.

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# A few merges, in rank order, so common prompt words become single tokens and
# the BPE path is exercised. Each merge's parts are bytes or earlier merges.
_TINY_MERGES = (
    "t h",
    "th e</w>",
    "a n",
    "an d</w>",
    "o f</w>",
    "i n",
    "in g</w>",
    "o n</w>",
    "i n</w>",
    "c a",
    "ca t</w>",
    "p h",
    "o t",
    "ph ot",
    "phot o</w>",
    "d o",
    "do g</w>",
    "h o",
    "r s",
    "ho rs",
    "hors e</w>",
    "r i",
    "d ing</w>",
    "ri ding</w>",
    "a s",
    "t r",
    "as tr",
    "astr o",
    "a u",
    "n au",
    "nau t</w>",
    "astro naut</w>",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: each byte ↦ a printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def tiny_vocab() -> dict[str, int]:
    """CLIP's vocab layout, shrunk: bytes, bytes+'</w>', merge results, then BOS and EOS."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in _TINY_MERGES]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    assert len(set(tokens)) == len(tokens), "tiny vocab has a duplicate token"
    return {token: i for i, token in enumerate(tokens)}


# 256 bytes + 256 word-final bytes + 32 merges + BOS + EOS.
TINY_VOCAB_SIZE = 2 * 256 + len(_TINY_MERGES) + 2  # 546


def write_tiny_vocab(directory: Path, *, pad_token: str = EOS_TOKEN) -> None:
    """Write a loadable CLIP tokenizer folder (vocab.json, merges.txt, configs) of TINY_VOCAB_SIZE tokens.

    `pad_token` is "<|endoftext|>" as in SD 1.x, or "!" as in SD 2.x; it must be in the vocab.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the tiny vocab")
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_TINY_MERGES) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    config = {
        **special,
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
