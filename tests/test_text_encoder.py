"""CLIP text encoder: parity with transformers' CLIPTextModel.last_hidden_state, and checkpoint keys."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import assert_rel_close, rel_error
from safetensors.numpy import load_file

from sdmesh.services.checkpoints.weights import convert
from sdmesh.services.inputs.tokenizer import TINY_VOCAB_SIZE
from sdmesh.services.models.text_encoder import (
    ACTIVATIONS,
    CLIPTextEncoder,
    TextEncoderConfig,
    fix_checkpoint_key,
    init_shapes,
)

SEQ = 77  # SD's prompt length


def tiny_torch_config(hidden_act: str = "quick_gelu", layers: int = 2, **overrides) -> transformers.CLIPTextConfig:
    fields = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=SEQ,
        hidden_act=hidden_act,
        # CLIP's token ids: keep them inside the tiny vocab, as a real config would.
        bos_token_id=TINY_VOCAB_SIZE - 2,
        eos_token_id=TINY_VOCAB_SIZE - 1,
    )
    return transformers.CLIPTextConfig(**{**fields, **overrides})


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace the init with visible randomness so every weight (and bias) matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.05)
    return model.eval()


def random_ids(batch: int = 2, vocab: int = TINY_VOCAB_SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, SEQ)).astype(np.int32)


def torch_last_hidden(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()


def load(state: dict[str, np.ndarray], cfg: TextEncoderConfig) -> dict:
    """The loader's path: drop/rename keys, then the checked conversion."""
    pairs = ((fix_checkpoint_key(k), v) for k, v in state.items())
    return convert(((k, v) for k, v in pairs if k is not None), init_shapes(cfg))


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def run(cfg: TextEncoderConfig, params: dict, ids: np.ndarray, dtype=jnp.float32) -> np.ndarray:
    out = jax.jit(CLIPTextEncoder(cfg, dtype=dtype).apply)({"params": params}, jnp.asarray(ids))
    return np.asarray(out.astype(jnp.float32))


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu", "gelu_pytorch_tanh"])
def test_matches_transformers_last_hidden_state(hidden_act):
    torch_cfg = tiny_torch_config(hidden_act)
    reference = randomized(transformers.CLIPTextModel(torch_cfg))
    cfg = TextEncoderConfig.from_json(torch_cfg.to_dict())
    assert cfg.hidden_act == hidden_act and cfg.num_hidden_layers == 2

    ids = random_ids()
    out = run(cfg, load(numpy_state(reference), cfg), ids)

    assert out.shape == (2, SEQ, 32)
    assert_rel_close(out, torch_last_hidden(reference, ids))


def test_loads_what_transformers5_save_pretrained_writes(tmp_path):
    # transformers 5 writes CLIPTextModel keys without the `text_model.` prefix.
    reference = randomized(transformers.CLIPTextModel(tiny_torch_config("gelu", layers=3)), seed=1)
    reference.save_pretrained(str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    assert "encoder.layers.2.mlp.fc1.weight" in state

    cfg = TextEncoderConfig.from_json(json.loads((tmp_path / "config.json").read_text()))
    assert cfg == TextEncoderConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    ids = random_ids(seed=1)
    assert_rel_close(run(cfg, load(state, cfg), ids), torch_last_hidden(reference, ids))


def test_loads_transformers4_style_keys_with_buffers_and_projection_head():
    # Hub SD checkpoints: `text_model.`-prefixed keys plus the position_ids buffer;
    # CLIPTextModelWithProjection adds a `text_projection` head we do not use.
    reference = randomized(transformers.CLIPTextModelWithProjection(tiny_torch_config(vocab_size=1000)), seed=2)
    state = numpy_state(reference)
    state["text_model.embeddings.position_ids"] = np.arange(SEQ, dtype=np.int64)[None]
    assert "text_projection.weight" in state
    assert all(k.startswith(("text_model.", "text_projection.")) for k in state)

    cfg = TextEncoderConfig.from_json(reference.config.to_dict())
    ids = random_ids(vocab=1000, seed=2)
    assert_rel_close(run(cfg, load(state, cfg), ids), torch_last_hidden(reference, ids))


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"])
def test_activations_match_transformers_act2fn(hidden_act):
    # Tighter than model parity: erf and tanh GELU differ by less than 1e-4 through a tiny model.
    x = np.linspace(-6, 6, 1001, dtype=np.float32)
    expected = transformers.activations.ACT2FN[hidden_act](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(ACTIVATIONS[hidden_act](jnp.asarray(x))), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "key, fixed",
    [
        ("text_model.encoder.layers.3.self_attn.q_proj.weight", "encoder.layers.3.self_attn.q_proj.weight"),
        ("encoder.layers.3.self_attn.q_proj.weight", "encoder.layers.3.self_attn.q_proj.weight"),
        ("text_model.final_layer_norm.bias", "final_layer_norm.bias"),
        ("text_model.embeddings.position_ids", None),
        ("embeddings.position_ids", None),
        ("text_projection.weight", None),
        ("visual_projection.weight", None),  # a full CLIPModel checkpoint
        ("vision_model.embeddings.class_embedding", None),
        ("logit_scale", None),
        ("text_model.something_new.weight", "something_new.weight"),  # kept, so the loader names it
    ],
)
def test_fix_checkpoint_key(key, fixed):
    assert fix_checkpoint_key(key) == fixed


def test_bf16_activations_are_finite_and_close_to_fp32():
    reference = randomized(transformers.CLIPTextModel(tiny_torch_config()), seed=3)
    cfg = TextEncoderConfig.from_json(reference.config.to_dict())
    params = load(numpy_state(reference), cfg)
    ids = random_ids(seed=3)

    out = run(cfg, params, ids, dtype=jnp.bfloat16)

    assert np.isfinite(out).all()
    assert rel_error(out, torch_last_hidden(reference, ids)) < 5e-2


def test_is_causal_each_position_sees_only_earlier_tokens():
    cfg = TextEncoderConfig(
        vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
    )
    model = CLIPTextEncoder(cfg)
    ids = random_ids(batch=1, vocab=100)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), ids)["params"]
    changed = ids.copy()
    changed[0, 40:] = (changed[0, 40:] + 1) % 100  # edit the padding region, say

    apply = jax.jit(model.apply)
    a, b = apply({"params": params}, ids), apply({"params": params}, changed)

    np.testing.assert_array_equal(a[:, :40], b[:, :40])
    assert not np.allclose(a[:, 40:], b[:, 40:])


def test_param_tree_uses_checkpoint_names():
    cfg = TextEncoderConfig(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
    )
    shapes = init_shapes(cfg)
    assert set(shapes) == {"embeddings", "encoder", "final_layer_norm"}
    assert set(shapes["encoder"]) == {"layers_0", "layers_1"}
    layer = shapes["encoder"]["layers_1"]
    assert set(layer) == {"layer_norm1", "self_attn", "layer_norm2", "mlp"}
    assert set(layer["self_attn"]) == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert layer["mlp"]["fc1"]["kernel"].shape == (32, 37)  # (in, out): torch's weight transposed
    assert layer["layer_norm1"]["scale"].shape == (32,)
    assert shapes["embeddings"]["token_embedding"]["embedding"].shape == (TINY_VOCAB_SIZE, 32)
    assert shapes["embeddings"]["position_embedding"]["embedding"].shape == (77, 32)


def test_config_from_json_defaults_unknown_keys_and_nested_clip_config():
    # transformers' CLIPTextConfig defaults when a key is absent or null.
    assert TextEncoderConfig.from_json({}) == TextEncoderConfig()
    assert TextEncoderConfig().vocab_size == 49408 and TextEncoderConfig().hidden_act == "quick_gelu"
    assert TextEncoderConfig.from_json({"layer_norm_eps": None}).layer_norm_eps == 1e-5
    # SD 2.x (OpenCLIP ViT-H) text_encoder/config.json, abridged, with keys we ignore.
    sd2 = {
        "architectures": ["CLIPTextModel"],
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "projection_dim": 512,
        "torch_dtype": "float32",
        "dropout": 0.0,
        "pad_token_id": 1,
    }
    cfg = TextEncoderConfig.from_json(sd2)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.hidden_act) == (1024, 23, 64, "gelu")
    # A full CLIPConfig: the text tower is under `text_config`.
    full = {
        "model_type": "clip",
        "projection_dim": 768,
        "text_config": {"hidden_size": 768, "num_attention_heads": 12},
        "vision_config": {"hidden_size": 1024},
    }
    assert TextEncoderConfig.from_json(full).hidden_size == 768


def test_config_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="'relu'"):
        TextEncoderConfig.from_json({"hidden_act": "relu"})
    with pytest.raises(ValueError, match="divisible"):
        TextEncoderConfig(hidden_size=30, num_attention_heads=4)


def test_rejects_sequences_longer_than_the_position_table():
    cfg = TextEncoderConfig(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=4,
    )
    with pytest.raises(ValueError, match="max_position_embeddings"):
        CLIPTextEncoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 5), jnp.int32))
