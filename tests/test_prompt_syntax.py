"""A1111's prompt syntax: the parser against A1111's documented examples, its 75-token chunks, and the weighted,
chunked conditioning against transformers' CLIPTextModel running A1111's algorithm step by step (fp32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import assert_rel_close

from sdmesh.services.engine.stages import TextEncoderStage, apply_emphasis, encode_text
from sdmesh.services.inputs.errors import InvalidRequest
from sdmesh.services.inputs.prompt_syntax import BREAK, Fragment, parse_prompt_attention
from sdmesh.services.inputs.tokenizer import COMMA_BACKTRACK

# --- the parser: A1111's doctests (modules/prompt_parser.py), written out --------------------------------------


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
    ],
)
def test_parser_gives_a1111s_documented_fragments(prompt, expected):
    assert parse_prompt_attention(prompt) == [Fragment(t, w) for t, w in expected]


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("", [("", 1.0)]),
        ("[faded]", [("faded", 1 / 1.1)]),
        ("[[faded]", [("faded", 1 / 1.1 / 1.1)]),  # an unclosed [ weighs the rest
        ("stray) closers] stay", [("stray) closers] stay", 1.0)]),
        ("(a:b)", [("a:b", 1.1)]),  # a colon without a number is text
        ("(a:-0.5) z", [("a", -0.5), (" z", 1.0)]),
        ("a \\\\ b", [("a \\ b", 1.0)]),
    ],
)
def test_parser_follows_a1111_on_edges(prompt, expected):
    assert parse_prompt_attention(prompt) == [Fragment(t, w) for t, w in expected]


def test_break_ends_a_chunk_and_swallows_its_spaces_even_inside_brackets():
    assert parse_prompt_attention("a cat  BREAK dog") == [Fragment("a cat", 1.0), BREAK, Fragment("dog", 1.0)]
    # A1111 would weight the marker and then encode the word "BREAK": here it stays a break
    assert parse_prompt_attention("(a BREAK b)") == [Fragment("a", 1.1), BREAK, Fragment("b", 1.1)]
    assert parse_prompt_attention("BREAKFAST") == [Fragment("BREAKFAST", 1.0)]  # only the whole word


@pytest.mark.parametrize("prompt", ["(cat:1.2.3)", "(cat:.)", "(" * 80 + "cat", "(cat:1000000)"])
def test_weights_that_are_no_number_or_too_large_are_refused(prompt):
    with pytest.raises(InvalidRequest, match="weight"):
        parse_prompt_attention(prompt)


# --- A1111's algorithm, step by step, on transformers' CLIPTextModel (the reference) --------------------------


def reference_chunks(tokenizer: transformers.CLIPTokenizer, prompt: str) -> tuple[list[list[int]], list[list[float]]]:
    """sd_hijack_clip.tokenize_line: (per chunk 77 ids, per chunk 77 weights), SD 2's pad put in by process_tokens."""
    fragments = parse_prompt_attention(prompt)
    comma, bos, eos, pad = tokenizer.get_vocab()[",</w>"], tokenizer.bos_token_id, tokenizer.eos_token_id, None
    pad = tokenizer.pad_token_id  # A1111 pads with EOS, then process_tokens writes SD 2's pad past the first EOS
    chunks, tokens, mults, last_comma = [], [], [], -1

    def next_chunk():
        nonlocal tokens, mults, last_comma
        fill = 75 - len(tokens)
        chunks.append(([bos] + tokens + [eos] + [pad] * fill, [1.0] + mults + [1.0] * (fill + 1)))
        tokens, mults, last_comma = [], [], -1

    for text, weight in fragments:
        if (text, weight) == BREAK:
            next_chunk()
            continue
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == 75 and last_comma != -1 and 75 - last_comma <= COMMA_BACKTRACK:
                keep = last_comma + 1
                moved = tokens[keep:], mults[keep:]
                tokens, mults = tokens[:keep], mults[:keep]
                next_chunk()
                tokens, mults = list(moved[0]), list(moved[1])
            if len(tokens) == 75:
                next_chunk()
            tokens.append(token)
            mults.append(weight)
    if tokens or not chunks:
        next_chunk()
    return [c[0] for c in chunks], [c[1] for c in chunks]


def reference_conditioning(model: transformers.CLIPTextModel, tokenizer, prompt: str) -> np.ndarray:
    """process_tokens per chunk, EmphasisOriginal's after_transformers, then torch.hstack: (chunks·77, D).

    The means are taken in float64: a tiny encoder's chunk means are near 0 (its final LayerNorm centres each
    token), where float32 summation alone moves their ratio by ~1e-4, more than the parity bar."""
    ids, mults = reference_chunks(tokenizer, prompt)
    zs = []
    for chunk_ids, chunk_mults in zip(ids, mults):
        with torch.no_grad():
            z = model(input_ids=torch.tensor([chunk_ids])).last_hidden_state
        original_mean = z.double().mean()
        z = z * torch.tensor([chunk_mults]).reshape(1, -1, 1).expand(z.shape)
        z = z * (original_mean / z.double().mean()).float()
        zs.append(z)
    return torch.hstack(zs)[0].numpy()


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def encoder(request, tiny_checkpoints):
    """(our stage, the reference model, its tokenizer) on one tiny checkpoint."""
    folder = tiny_checkpoints[request.param]
    model = transformers.CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval()
    return TextEncoderStage.load(folder), model, transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))


WEIGHTED = "a (red:1.3) cube on [a blue] ((ball)), photo"
LONG = ", ".join(["a photo of a (cat:1.2)", "riding a horse", "[dog]"] * 14)  # 167 tokens: 3 chunks cut at commas
BROKEN = "a red cube BREAK a (blue:0.8) ball BREAK BREAK astronaut"


@pytest.mark.parametrize("prompt", [WEIGHTED, LONG, BROKEN, "cat " * 200])
def test_weighted_and_long_prompts_match_a1111_on_transformers(encoder, prompt):
    stage, model, tokenizer = encoder
    hidden, removed, _ = stage.encode([prompt])
    expected = reference_conditioning(model, tokenizer, prompt)
    assert hidden.shape == (1, *expected.shape) and removed == [""]
    assert_rel_close(hidden[0], expected)  # fp32, the same ops: ≤ 1e-4


def test_chunks_are_a1111s_ids_and_weights(encoder):
    stage, _, tokenizer = encoder
    for prompt in (WEIGHTED, LONG, BROKEN):
        (tokens,) = stage.tokenize([prompt])
        ids, mults = reference_chunks(tokenizer, prompt)
        np.testing.assert_array_equal(tokens.ids, ids)
        np.testing.assert_array_equal(tokens.weights, np.asarray(mults, np.float32))
    assert [len(reference_chunks(tokenizer, p)[0]) for p in (WEIGHTED, LONG, BROKEN)] == [1, 3, 4]
    (long,) = stage.tokenize([LONG])
    last = [row[list(row).index(tokenizer.eos_token_id) - 1] for row in long.ids[:2]]  # before each chunk's EOS
    assert last == [tokenizer.get_vocab()[",</w>"]] * 2  # both cuts fell after a comma


def test_long_prompt_breaks_after_its_last_comma_near_the_limit(encoder):
    stage, _, tokenizer = encoder
    comma = tokenizer.get_vocab()[",</w>"]
    prompt = "cat " * 70 + ", " + "dog " * 10  # the comma is token 71: the dogs after it start chunk 2
    (tokens,) = stage.tokenize([prompt])
    assert tokens.chunks == 2
    assert tokens.ids[0, 71] == comma and tokens.ids[0, 72] == tokenizer.eos_token_id
    assert list(tokens.ids[1, 1:12]) == [tokenizer.convert_tokens_to_ids("dog</w>")] * 10 + [tokenizer.eos_token_id]
    far = "cat " * 50 + ", " + "dog " * 30  # the comma is 25 tokens back: no backtrack, a plain cut at 75
    assert stage.tokenize([far])[0].ids[0, 75] == tokenizer.convert_tokens_to_ids("dog</w>")


def test_past_13_chunks_the_rest_is_dropped_and_reported(encoder):
    stage, _, _ = encoder
    hidden, removed, _ = stage.encode(["cat " * 980, "a dog"])
    assert hidden.shape[:2] == (2, 13 * 77)  # the short prompt is padded with empty chunks to the same L
    assert removed == [" ".join(["cat"] * 5), ""]


def test_plain_short_prompts_are_bitwise_what_diffusers_tokenization_gives(encoder):
    stage, _, tokenizer = encoder
    prompts = ["a photo of a cat", "An astronaut riding a horse, in the style of Monet!", "", "cat " * 75]
    (hidden, removed, _), tokens = stage.encode(prompts), stage.tokenize(prompts)
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]  # diffusers' call
    np.testing.assert_array_equal(np.concatenate([t.ids for t in tokens]), ids)
    before = jax.jit(encode_text, static_argnums=0)(stage.encoder, stage.params, jnp.asarray(ids, jnp.int32))
    np.testing.assert_array_equal(hidden, np.asarray(before))  # the program diffusers parity is tested on
    assert removed == [""] * 4


def test_a_negative_prompt_is_padded_to_its_prompts_length_with_the_empty_prompts_chunks(encoder):
    stage, _, _ = encoder
    hidden, _, _ = stage.encode(["cat " * 100, ""])
    empty, _, _ = stage.encode([""])
    np.testing.assert_array_equal(stage.tokenize(["cat " * 100, ""])[1].ids, stage.tokenize([""])[0].ids[[0, 0]])
    assert hidden.shape[1] == 154
    # another batch size: XLA on CPU may round the last bit differently
    np.testing.assert_allclose(hidden[1].reshape(2, 77, -1), empty[[0, 0]], rtol=0, atol=1e-5)


def test_emphasis_keeps_each_chunks_mean_and_is_skipped_at_weight_one():
    hidden = np.random.default_rng(0).standard_normal((2, 77, 8)).astype(np.float32) + 0.3
    weights = np.ones((2, 77), np.float32)
    weights[0, 3:6] = 1.5
    out = apply_emphasis(hidden, weights)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), hidden.mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_array_equal(out[1], hidden[1])  # weight 1 everywhere: the ratio is exactly 1


# --- batched in the service: each request as it is alone ------------------------------------------------------


def test_a_batch_mixing_one_and_three_chunk_prompts_equals_each_alone(tiny_checkpoints):
    from sdmesh.services.serving import text_encoder_service
    from sdmesh.services.serving.metrics import StageMetrics

    class Batches(StageMetrics):
        def observe_batch(self, used: int, capacity: int) -> None:
            seen.append((used, capacity))

    seen: list[tuple[int, int]] = []
    stage = TextEncoderStage.load(tiny_checkpoints["sd2"])
    service = text_encoder_service.TextEncoderService(
        stage, "tiny", max_batch=8, batch_wait=2.0, max_queue=8, metrics=Batches("text_encoder")
    )
    requests = [["a red cube", ""], ["cat " * 200, "(blurry:1.2)"], ["a (blue:0.7) ball"], [WEIGHTED, LONG]]
    try:
        futures = [service.batcher.submit(stage.tokenize(texts)) for texts in requests]
        results = [f.result(timeout=60) for f in futures]
    finally:
        service.close()
    assert seen == [(7, 8)]  # one batch of 7 texts: 2·1 + 2·3 + 1 + 2·3 = 15 chunks, two calls of bucket 8
    for texts, (hidden, removed) in zip(requests, results):
        alone, removed_alone, _ = stage.encode(texts)
        got = np.stack(hidden)
        assert got.shape == alone.shape and list(removed) == removed_alone
        np.testing.assert_allclose(got, alone, rtol=0, atol=1e-5 * np.abs(alone).max())
    assert [np.stack(h).shape[1] for h, _ in results] == [77, 231, 77, 231]  # each its own L
