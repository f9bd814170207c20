"""Prompt tokenization for the text encoder: diffusers' fixed 77 tokens, and AUTOMATIC1111's weighted chunks.

A thin wrapper over transformers' CLIP tokenizer loaded from a diffusers
checkpoint's `tokenizer/` folder, used by the text-encoder stage. No JAX here.

    tokenizer.tokenize(prompts)                # diffusers' StableDiffusionPipeline: 77 ids, truncated
    tokenizer.tokenize_chunks(prompts, found)  # A1111's: weights, BREAK, 75-token chunks, embeddings (PromptTokens)

`tokenize_chunks` is what the stage encodes. It follows A1111's `sd_hijack_clip.tokenize_line`: the prompt's
fragments (`prompt_syntax.parse_prompt_attention`) are tokenized without special tokens; tokens fill chunks of
max_length − 2 (75), and when a chunk is full with a comma among its last COMMA_BACKTRACK tokens, the tokens
after that comma move to the next chunk; each chunk becomes BOS + tokens + EOS, padded with the pad token
(SD 1.x's is EOS, SD 2.x's "!": the tokenizer files say). A textual-inversion embedding's name, matched on token
ids (A1111's EmbeddingDatabase), stands for its n vectors, kept within one chunk. A prompt that fits one chunk
and uses no syntax gets exactly `tokenize`'s ids. Past MAX_CHUNKS chunks the rest is dropped and reported.

`write_tiny_vocab` writes a small but real CLIP BPE tokenizer, so tests and the demo model can build checkpoints
without network access; `write_clip_tokenizer` writes CLIP's own, for single-file checkpoints, which carry none.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sdmesh.services.inputs import prompt_syntax
from sdmesh.services.inputs.contract import MAX_CONTEXT_LENGTH
from sdmesh.services.inputs.errors import InvalidRequest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# transformers' default model_max_length when tokenizer_config.json names none.
_NO_MAX_LENGTH = int(1e20)
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default: how far back a full chunk looks for a comma


def max_chunks(max_length: int) -> int:
    """Chunks a prompt may take: as many as fit in a conditioning row of MAX_CONTEXT_LENGTH (13 of 77 tokens)."""
    return MAX_CONTEXT_LENGTH // max_length


@dataclasses.dataclass(frozen=True)
class Trigger:
    """A textual-inversion embedding as prompts name it: its name's token ids and the vectors they stand for."""

    name: str
    ids: tuple[int, ...]  # the name tokenized without special tokens
    vectors: np.ndarray | None  # (n, D) float32; None when the file could not be used
    error: str = ""  # why not, for the request that names it


@dataclasses.dataclass(frozen=True)
class EmbeddingSlot:
    chunk: int
    offset: int  # position in the chunk's max_length tokens (BOS is 0)
    vectors: np.ndarray  # (n, D): they replace the token embeddings at offset .. offset + n − 1


@dataclasses.dataclass(frozen=True)
class PromptTokens:
    """One prompt as A1111 encodes it: C chunks of max_length tokens, each token's weight, embeddings' places."""

    ids: np.ndarray  # (C, max_length) int32
    weights: np.ndarray  # (C, max_length) float32: 1 for BOS, EOS and padding
    embeddings: tuple[EmbeddingSlot, ...] = ()
    removed_text: str = ""  # what did not fit in max_chunks chunks ("" if nothing)
    loras: tuple[tuple[int, float], ...] = ()  # (LoRA bank row, weight) its encoding applies (the stage's lease)

    @property
    def chunks(self) -> int:
        return self.ids.shape[0]

    @property
    def weighted(self) -> bool:
        return bool((self.weights != 1.0).any())

    def padded_to(self, chunks: int, empty: np.ndarray) -> PromptTokens:
        """With empty chunks (`empty`: (max_length,) ids of the empty prompt) appended up to `chunks`, as A1111
        pads the shorter of a batch's prompts: a prompt and its negative must have one length."""
        extra = chunks - self.chunks
        if extra <= 0:
            return self
        ids = np.concatenate([self.ids, np.repeat(empty[None], extra, axis=0)])
        weights = np.concatenate([self.weights, np.ones((extra, self.ids.shape[1]), np.float32)])
        return dataclasses.replace(self, ids=ids, weights=weights)


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

    @functools.cached_property
    def comma_id(self) -> int | None:
        """The "," token A1111's chunking cuts after (None if the vocabulary has none); get_vocab copies it."""
        return self.tokenizer.get_vocab().get(",</w>")

    @property
    def empty_chunk(self) -> np.ndarray:
        """(max_length,) int32: BOS, EOS, then padding: the chunk of an empty prompt."""
        tok = self.tokenizer
        return np.asarray([tok.bos_token_id, tok.eos_token_id] + [self.pad_token_id] * (self.max_length - 2), np.int32)

    def trigger(self, name: str, vectors: np.ndarray | None, error: str = "") -> Trigger:
        """What prompts must contain to name an embedding: `name`'s tokens."""
        ids = self.tokenizer([name], add_special_tokens=False, verbose=False)["input_ids"][0]
        return Trigger(name, tuple(int(i) for i in ids), vectors, error)

    def tokenize_chunks(
        self, prompts: list[str], triggers: list[Trigger] | tuple[Trigger, ...] = ()
    ) -> list[PromptTokens]:
        """Each prompt as A1111 chunks it (see the module docstring); raises InvalidRequest for a prompt naming an
        embedding that could not be loaded, or a weight that is not a number."""
        if isinstance(prompts, str):
            raise TypeError("tokenize_chunks takes a list of prompts, not a single string")
        lookup: dict[int, list[Trigger]] = {}
        for trigger in sorted(triggers, key=lambda t: -len(t.ids)):  # the longest name that matches wins
            if trigger.ids:
                lookup.setdefault(trigger.ids[0], []).append(trigger)
        return [self._chunks(prompt, lookup) for prompt in prompts]

    def _chunks(self, prompt: str, lookup: dict[int, list[Trigger]]) -> PromptTokens:
        fragments = prompt_syntax.parse_prompt_attention(prompt)
        texts = [f.text for f in fragments if f != prompt_syntax.BREAK]
        tokenized = iter(self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else [])
        comma = self.comma_id
        size = self.max_length - 2  # tokens per chunk between BOS and EOS
        chunks: list[_Chunk] = []
        chunk = _Chunk()

        def next_chunk() -> None:
            nonlocal chunk
            chunks.append(chunk)
            chunk = _Chunk()

        for fragment in fragments:
            if fragment == prompt_syntax.BREAK:
                next_chunk()
                continue
            tokens, weight, position = next(tokenized), fragment.weight, 0
            while position < len(tokens):
                token = tokens[position]
                if token == comma:
                    chunk.last_comma = len(chunk.tokens)
                elif len(chunk.tokens) == size and chunk.last_comma >= 0 and size - chunk.last_comma <= COMMA_BACKTRACK:
                    # full, and a comma is near: the words after it start the next chunk (A1111's backtrack)
                    tail = chunk.split_after(chunk.last_comma + 1)
                    next_chunk()
                    chunk = tail
                if len(chunk.tokens) == size:
                    next_chunk()
                found = _match(lookup, tokens, position)
                if found is None:
                    chunk.add([token], weight, [token])
                    position += 1
                    continue
                if found.vectors is None:
                    raise InvalidRequest(
                        f"the prompt names the embedding {found.name!r}, which cannot be used: {found.error}"
                    )
                n = len(found.vectors)
                if len(chunk.tokens) + n > size:  # an embedding never straddles two chunks
                    next_chunk()
                chunk.slots.append((len(chunk.tokens), found.vectors))
                chunk.add([0] * n, weight, list(found.ids))
                position += len(found.ids)
        if chunk.tokens or not chunks:
            next_chunk()

        limit = max_chunks(self.max_length)
        removed = [i for c in chunks[limit:] for ids in c.source for i in ids]
        chunks = chunks[:limit]
        tok = self.tokenizer
        ids = np.full((len(chunks), self.max_length), self.pad_token_id, np.int32)
        weights = np.ones((len(chunks), self.max_length), np.float32)
        slots = []
        for k, c in enumerate(chunks):
            n = len(c.tokens)
            ids[k, 0], ids[k, 1 : n + 1], ids[k, n + 1] = tok.bos_token_id, c.tokens, tok.eos_token_id
            weights[k, 1 : n + 1] = c.weights
            slots += [EmbeddingSlot(k, 1 + offset, vectors) for offset, vectors in c.slots]
        return PromptTokens(ids, weights, tuple(slots), str(tok.decode(removed)) if removed else "")


@dataclasses.dataclass
class _Chunk:
    """A chunk being filled: its tokens (0 where an embedding goes) and their weights, without BOS/EOS."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    weights: list[float] = dataclasses.field(default_factory=list)
    # per token, the prompt's own ids it came from (an embedding's name on its first slot), to report truncation
    source: list[list[int]] = dataclasses.field(default_factory=list)
    slots: list[tuple[int, np.ndarray]] = dataclasses.field(default_factory=list)  # (offset in tokens, vectors)
    last_comma: int = -1

    def add(self, tokens: list[int], weight: float, source: list[int]) -> None:
        self.source += [source] + [[] for _ in tokens[1:]]
        self.tokens += tokens
        self.weights += [weight] * len(tokens)

    def split_after(self, at: int) -> _Chunk:
        """Cut this chunk at token `at`: the tokens from there, and any embedding among them, form a new chunk."""
        tail = _Chunk(self.tokens[at:], self.weights[at:], self.source[at:])
        tail.slots = [(offset - at, v) for offset, v in self.slots if offset >= at]
        self.slots = [(offset, v) for offset, v in self.slots if offset < at]
        del self.tokens[at:], self.weights[at:], self.source[at:]
        return tail


def _match(lookup: dict[int, list[Trigger]], tokens: list[int], position: int) -> Trigger | None:
    for trigger in lookup.get(tokens[position], ()):
        if tuple(tokens[position : position + len(trigger.ids)]) == trigger.ids:
            return trigger
    return None


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
    return _vocab(_TINY_MERGES)


def _vocab(merges: Sequence[str]) -> dict[str, int]:
    """CLIP's vocab layout (open_clip's SimpleTokenizer, transformers' vocab.json): the byte alphabet, the same
    word-final, each merge's result in merge order, then BOS and EOS."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    assert len(set(tokens)) == len(tokens), "the vocab has a duplicate token"
    return {token: i for i, token in enumerate(tokens)}


# 256 bytes + 256 word-final bytes + 32 merges + BOS + EOS.
TINY_VOCAB_SIZE = 2 * 256 + len(_TINY_MERGES) + 2  # 546

# CLIP's BPE merges as open_clip ships them (MIT, see bpe_simple_vocab_16e6.LICENSE): a header line, then merges,
# of which CLIP uses the first CLIP_MERGES. Every SD 1.x/2.x text encoder was trained on this vocabulary.
CLIP_BPE_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
CLIP_MERGES = 49152 - 256 - 2
CLIP_VOCAB_SIZE = 49408


def write_clip_tokenizer(directory: Path, *, pad_token: str = EOS_TOKEN) -> None:
    """Write CLIP's own tokenizer (the one SD 1.x and 2.x use; 49408 tokens) from the package's copy of its merges.

    `pad_token`: "<|endoftext|>" as in SD 1.x (openai/clip-vit-large-patch14), "!" as in SD 2.x.
    """
    with gzip.open(CLIP_BPE_FILE, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 1 + CLIP_MERGES]
    _write_vocab(Path(directory), merges, pad_token)


def write_tiny_vocab(directory: Path, *, pad_token: str = EOS_TOKEN) -> None:
    """Write a loadable CLIP tokenizer folder (vocab.json, merges.txt, configs) of TINY_VOCAB_SIZE tokens.

    `pad_token` is "<|endoftext|>" as in SD 1.x, or "!" as in SD 2.x; it must be in the vocab.
    """
    _write_vocab(Path(directory), _TINY_MERGES, pad_token)


def _write_vocab(directory: Path, merges: Sequence[str], pad_token: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    vocab = _vocab(merges)
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the vocab")
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
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
