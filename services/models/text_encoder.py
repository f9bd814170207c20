"""CLIP text encoder: the prompt conditioning of Stable Diffusion 1.x and 2.x.

A Flax re-implementation of transformers' `CLIPTextModel` up to its
`last_hidden_state` (after the final layer norm), which is what the UNet's
cross-attention reads. The pooled output and any projection head are not part
of SD's conditioning and are left out.

Module and parameter names are the checkpoint's (see `sdmesh.services.checkpoints.weights`):
`encoder.layers.3.self_attn.q_proj.weight` lives at
`params['encoder']['layers_3']['self_attn']['q_proj']['kernel']`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import unfreeze

from sdmesh.services.models.attention import attention
from sdmesh.services.models.layers import Dense


def _quick_gelu(x: jax.Array) -> jax.Array:
    # OpenAI CLIP's sigmoid approximation of GELU (SD 1.x's text encoder).
    return x * jax.nn.sigmoid(1.702 * x)


def _gelu_exact(x: jax.Array) -> jax.Array:
    # torch.nn.functional.gelu default: the erf form (OpenCLIP ViT-H, SD 2.x).
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


# transformers' ACT2FN names → the same function in JAX.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": _quick_gelu,
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
}


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """The architecture fields of transformers' `CLIPTextConfig`, with its defaults."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        # Fail when the config is read, not deep inside a trace.
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"text encoder hidden_act {self.hidden_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"text encoder hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TextEncoderConfig:
        """Read a diffusers `text_encoder/config.json` (a CLIPTextConfig) or a full CLIPConfig.

        Keys we do not model (dropout, token ids, projection_dim, ...) are ignored;
        missing or null ones take transformers' defaults.
        """
        if isinstance(d.get("text_config"), dict):  # a CLIPConfig: the text tower is nested
            d = d["text_config"]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding."""

    config: TextEncoderConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        init = nn.initializers.normal(0.02)
        self.token_embedding = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, dtype=self.dtype)
        self.position_embedding = nn.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init, dtype=self.dtype
        )

    def __call__(
        self, input_ids: jax.Array, override: jax.Array | None = None, mask: jax.Array | None = None
    ) -> jax.Array:
        """ids (B, L) → (B, L, D); where `mask` (B, L) is set, `override` (B, L, D) replaces the token embedding
        (textual inversion: an embedding's vectors stand where its name was)."""
        # Positions are always 0..L-1: SD prompts are padded to a fixed length, never packed.
        positions = jnp.arange(input_ids.shape[-1], dtype=jnp.int32)
        tokens = self.token_embedding(input_ids)
        if override is not None:
            tokens = jnp.where(mask[..., None], override.astype(tokens.dtype), tokens)
        return tokens + self.position_embedding(positions)[None]


class CLIPAttention(nn.Module):
    """Multi-head self-attention with a causal mask (CLIP's text tower is a causal LM)."""

    config: TextEncoderConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "dot_product"

    def setup(self) -> None:
        width = self.config.hidden_size
        self.q_proj = Dense(width, dtype=self.dtype)
        self.k_proj = Dense(width, dtype=self.dtype)
        self.v_proj = Dense(width, dtype=self.dtype)
        self.out_proj = Dense(width, dtype=self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        heads = (batch, length, self.config.num_attention_heads, self.config.head_dim)
        q = self.q_proj(x).reshape(heads)
        k = self.k_proj(x).reshape(heads)
        v = self.v_proj(x).reshape(heads)
        # No padding mask: SD pipelines call the encoder without one, so padded
        # positions attend to (and are attended by) nothing beyond what causality allows.
        out = attention(q, k, v, causal=True, impl=self.attention_impl)
        return self.out_proj(out.reshape(batch, length, width))


class CLIPMLP(nn.Module):
    config: TextEncoderConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.fc1 = Dense(self.config.intermediate_size, dtype=self.dtype)
        self.fc2 = Dense(self.config.hidden_size, dtype=self.dtype)
        self.activation = ACTIVATIONS[self.config.hidden_act]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: TextEncoderConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "dot_product"

    def setup(self) -> None:
        eps = self.config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(epsilon=eps, dtype=self.dtype)
        self.self_attn = CLIPAttention(self.config, dtype=self.dtype, attention_impl=self.attention_impl)
        self.layer_norm2 = nn.LayerNorm(epsilon=eps, dtype=self.dtype)
        self.mlp = CLIPMLP(self.config, dtype=self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    config: TextEncoderConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "dot_product"

    def setup(self) -> None:
        # A list attribute: linen names its members layers_0, layers_1, ... which is
        # the checkpoint's encoder.layers.0, encoder.layers.1, ... after conversion.
        self.layers = [
            CLIPEncoderLayer(self.config, dtype=self.dtype, attention_impl=self.attention_impl)
            for _ in range(self.config.num_hidden_layers)
        ]

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextEncoder(nn.Module):
    """input_ids (B, L) → last hidden state (B, L, hidden_size), after the final layer norm."""

    config: TextEncoderConfig
    dtype: jnp.dtype = jnp.float32  # activations; parameters stay float32 unless loaded otherwise
    attention_impl: str = "dot_product"

    def setup(self) -> None:
        self.embeddings = CLIPTextEmbeddings(self.config, dtype=self.dtype)
        self.encoder = CLIPEncoder(self.config, dtype=self.dtype, attention_impl=self.attention_impl)
        self.final_layer_norm = nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.dtype)

    def __call__(
        self, input_ids: jax.Array, override: jax.Array | None = None, mask: jax.Array | None = None
    ) -> jax.Array:
        """`override` (B, L, D) and `mask` (B, L): input embeddings in place of some tokens' (CLIPTextEmbeddings)."""
        length = input_ids.shape[-1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt of {length} tokens is longer than the text encoder's "
                f"max_position_embeddings {self.config.max_position_embeddings}; tokenize with truncation"
            )
        hidden = self.embeddings(input_ids.astype(jnp.int32), override, mask)
        return self.final_layer_norm(self.encoder(hidden))


def init_shapes(config: TextEncoderConfig, dtype: jnp.dtype = jnp.float32) -> dict[str, Any]:
    """The params tree as ShapeDtypeStructs (no memory allocated), for `weights.convert`."""
    model = CLIPTextEncoder(config, dtype=dtype)
    ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))
    return unfreeze(variables["params"])


# Checkpoint keys that are not the text encoder. A CLIPTextModelWithProjection or
# a full CLIPModel stores its heads (and vision tower) beside the text model.
_FOREIGN_PREFIXES = ("text_projection.", "vision_model.", "visual_projection.")
_FOREIGN_KEYS = ("logit_scale",)


def fix_checkpoint_key(key: str) -> str | None:
    """A checkpoint key → the key `weights.convert` expects, or None to drop it.

    transformers 4 saved `text_model.embeddings...`; transformers 5's
    `CLIPTextModel.save_pretrained` writes `embeddings...`. Old checkpoints also
    carry the `embeddings.position_ids` buffer, which is arange(77) and we
    compute instead. Anything else unknown is kept so the loader names it.
    """
    if key.startswith(_FOREIGN_PREFIXES) or key in _FOREIGN_KEYS:
        return None
    key = key.removeprefix("text_model.")
    if key == "embeddings.position_ids":
        return None
    return key
