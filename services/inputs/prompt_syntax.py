"""AUTOMATIC1111's prompt attention syntax: text → (text, weight) fragments, and BREAK.

    parse_prompt_attention("a (red:1.3) [cube]")   # [("a ", 1.0), ("red", 1.3), (" ", 1.0), ("cube", 0.909…)]

The rules are A1111's `modules/prompt_parser.py` (`parse_prompt_attention`):
  (text)      weight × 1.1            [text]       weight ÷ 1.1
  (text:1.3)  weight × 1.3            nesting      the factors multiply, innermost first
  \\( \\) \\[ \\] \\\\   the literal character    BREAK        end the 75-token chunk here (a fragment of its own)
An unclosed bracket applies its factor to everything after it; a stray closing bracket is literal text.
Adjacent fragments of equal weight merge. A prompt with none of this is one fragment of weight 1.

One departure: A1111 multiplies a BREAK inside brackets by their factor, after which it no longer counts as a
break (its text "BREAK" is then encoded with a negative weight); here a BREAK is a break wherever it stands.

JAX-free; the tokenizer (`tokenizer.PromptTokenizer.tokenize_chunks`) turns the fragments into weighted chunks.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from sdmesh.services.inputs.errors import InvalidRequest

ROUND_FACTOR = 1.1  # (text)
SQUARE_FACTOR = 1 / 1.1  # [text]
MAX_WEIGHT = 1000.0  # |weight| of any fragment, brackets multiplied; past it float32 conditioning overflows soon

# A1111's tokens, in its order: escapes, a lone backslash, openers, ":weight)", closers, plain text, a lone colon.
_ATTENTION = re.compile(
    r"""
    \\\(|\\\)|\\\[|\\]|\\\\|\\|
    \(|\[|
    :([+-]?[.\d]+)\)|
    \)|]|
    [^\\()\[\]:]+|
    :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


class Fragment(NamedTuple):
    text: str
    weight: float


BREAK = Fragment("BREAK", -1.0)  # A1111's marker: the chunk ends here


def parse_prompt_attention(text: str) -> list[Fragment]:
    """The prompt's fragments with their weights, and BREAK markers; [("", 1.0)] for an empty prompt.

    Raises InvalidRequest for a weight that is not a number or comes to more than MAX_WEIGHT."""
    res: list[list] = []  # [text, weight, is_break], mutable while brackets close
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for item in res[start:]:
            if not item[2]:
                item[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0, False])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), _weight(weight, text))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_FACTOR)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_FACTOR)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    res.append([BREAK.text, BREAK.weight, True])
                res.append([part, 1.0, False])
    for start in round_open:  # unclosed: A1111 closes them at the end
        multiply_from(start, ROUND_FACTOR)
    for start in square_open:
        multiply_from(start, SQUARE_FACTOR)
    if not res:
        return [Fragment("", 1.0)]
    for item in res:
        if not item[2] and not abs(item[1]) <= MAX_WEIGHT:  # NaN fails this too
            raise InvalidRequest(
                f"the weight of {item[0][:40]!r} comes to {item[1]:.4g} (its brackets multiplied); "
                f"keep weights within ±{MAX_WEIGHT:g}"
            )
    merged: list[list] = [res[0]]
    for item in res[1:]:
        last = merged[-1]
        if not item[2] and not last[2] and item[1] == last[1]:
            last[0] += item[0]
        else:
            merged.append(item)
    return [BREAK if is_break else Fragment(t, w) for t, w, is_break in merged]


def is_plain(fragments: list[Fragment], text: str) -> bool:
    """Whether the prompt used no syntax at all: one fragment of weight 1 whose text is the prompt's own."""
    return len(fragments) == 1 and fragments[0].weight == 1.0 and fragments[0].text == text


def _weight(number: str, prompt: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise InvalidRequest(
            f"prompt weight {number!r} is not a number (in {prompt[:80]!r}); write it as (text:1.2)"
        ) from None
