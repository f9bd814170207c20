"""Prompt tokenization: the ids diffusers' StableDiffusionPipeline would feed the text encoder."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers

from sdmesh.services.inputs.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    TINY_VOCAB_SIZE,
    load_tokenizer,
    write_tiny_vocab,
)

PROMPTS = ["a photo of a cat", "An astronaut riding a horse, in the style of Monet!", ""]


@pytest.fixture(scope="module")
def sd1_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sd1") / "tokenizer"
    write_tiny_vocab(path)
    return path


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sd2") / "tokenizer"
    write_tiny_vocab(path, pad_token="!")
    return path


def reference_ids(path: Path, prompts: list[str]) -> np.ndarray:
    """What diffusers' StableDiffusionPipeline.encode_prompt computes."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(path))
    out = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    return np.asarray(out["input_ids"])


def test_tiny_vocab_is_a_real_clip_bpe_vocab(sd1_dir):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(sd1_dir))
    assert len(tokenizer) == TINY_VOCAB_SIZE == 546
    assert tokenizer.model_max_length == 77
    # CLIP's layout: special tokens last, BOS before EOS.
    assert tokenizer.convert_tokens_to_ids([BOS_TOKEN, EOS_TOKEN]) == [TINY_VOCAB_SIZE - 2, TINY_VOCAB_SIZE - 1]
    # Lower-cased, word-final '</w>' tokens, merges applied, any byte representable.
    assert tokenizer.tokenize("A Photo of a CAT, naïve") == [
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "cat</w>",
        ",</w>",
        "n",
        "a",
        "Ã",
        "¯",
        "v",
        "e</w>",
    ]


def test_short_prompts_match_transformers(sd1_dir):
    tokens = load_tokenizer(sd1_dir).tokenize(PROMPTS)
    assert tokens.input_ids.dtype == np.int32
    assert tokens.input_ids.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(tokens.input_ids, reference_ids(sd1_dir, PROMPTS))
    assert tokens.truncated == (False, False, False)
    assert tokens.removed_text == ("", "", "")


def test_checkpoint_root_finds_its_tokenizer_folder(sd1_dir):
    root = sd1_dir.parent  # a diffusers checkpoint: <root>/tokenizer/vocab.json
    np.testing.assert_array_equal(
        load_tokenizer(root).tokenize(PROMPTS).input_ids, load_tokenizer(sd1_dir).tokenize(PROMPTS).input_ids
    )


def test_over_long_prompt_is_truncated_and_reported(sd1_dir):
    long_prompt = "a photo of a cat " * 20  # 100 tokens + BOS + EOS
    tokenizer = load_tokenizer(sd1_dir)
    tokens = tokenizer.tokenize(["a cat", long_prompt])
    np.testing.assert_array_equal(tokens.input_ids, reference_ids(sd1_dir, ["a cat", long_prompt]))
    assert tokens.input_ids[1, -1] == tokenizer.tokenizer.eos_token_id  # EOS survives truncation
    assert tokens.truncated == (False, True)
    assert tokens.removed_text[0] == ""
    # 75 prompt tokens fit: 15 repeats of the 5-token phrase; the other 5 are cut.
    assert tokens.removed_text[1] == " ".join(["a photo of a cat"] * 5)

    # The same text diffusers would log (pipeline_stable_diffusion.encode_prompt).
    hf = tokenizer.tokenizer
    untruncated = hf([long_prompt], padding="longest", return_tensors="np").input_ids
    assert hf.batch_decode(untruncated[:, hf.model_max_length - 1 : -1]) == [tokens.removed_text[1]]


def test_truncation_starts_one_token_past_the_limit(sd1_dir):
    tokenizer = load_tokenizer(sd1_dir)
    fits, spills = "cat " * 75, "cat " * 76  # BOS + 75 + EOS = 77 exactly; one more spills
    tokens = tokenizer.tokenize([fits, spills])
    assert tokens.truncated == (False, True)
    assert tokens.removed_text == ("", "cat")
    np.testing.assert_array_equal(tokens.input_ids[0], tokens.input_ids[1])


def test_pad_token_comes_from_the_tokenizer_files(sd1_dir, sd2_dir):
    sd1, sd2 = load_tokenizer(sd1_dir), load_tokenizer(sd2_dir)
    assert sd1.pad_token_id == TINY_VOCAB_SIZE - 1  # SD 1.x pads with <|endoftext|>
    assert sd2.pad_token_id == 0  # SD 2.x pads with "!", the first byte token
    ids1, ids2 = sd1.tokenize(PROMPTS[:1]).input_ids, sd2.tokenize(PROMPTS[:1]).input_ids
    np.testing.assert_array_equal(ids2, reference_ids(sd2_dir, PROMPTS[:1]))
    n = 7  # BOS, a, photo, of, a, cat, EOS
    np.testing.assert_array_equal(ids1[:, :n], ids2[:, :n])
    assert (ids1[:, n:] == TINY_VOCAB_SIZE - 1).all() and (ids2[:, n:] == 0).all()


def test_loads_a_folder_with_only_tokenizer_json(sd2_dir, tmp_path):
    transformers.CLIPTokenizer.from_pretrained(str(sd2_dir)).save_pretrained(str(tmp_path))
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").is_file()
    np.testing.assert_array_equal(
        load_tokenizer(tmp_path).tokenize(PROMPTS).input_ids, load_tokenizer(sd2_dir).tokenize(PROMPTS).input_ids
    )


def test_missing_files_and_max_length_are_clear_errors(sd1_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer files"):
        load_tokenizer(tmp_path)
    shutil.copy(sd1_dir / "vocab.json", tmp_path)
    shutil.copy(sd1_dir / "merges.txt", tmp_path)
    with pytest.raises(ValueError, match="model_max_length"):
        load_tokenizer(tmp_path)
    assert load_tokenizer(tmp_path, max_length=77).tokenize(["a cat"]).input_ids.shape == (1, 77)


@pytest.mark.processes
def test_tokenizing_does_not_import_jax(sd1_dir):
    # The gateway tokenizes (and reports truncation) without the model stack.
    code = (
        "import sys, sdmesh.services.inputs.tokenizer as t; "
        "t.load_tokenizer(sys.argv[1]).tokenize(['a cat']); "
        "assert 'jax' not in sys.modules, 'jax was imported'"
    )
    subprocess.run([sys.executable, "-c", code, str(sd1_dir)], check=True)
