"""State-dict adapter: our NeoX-style GPT <-> Hugging Face GPTNeoXForCausalLM.

    ours (canonical)                      GPTNeoXForCausalLM
    {emb}.word.weight                     gpt_neox.embed_in.weight
    {i+1}.attn_norm.{weight,bias}         gpt_neox.layers.{i}.input_layernorm.{weight,bias}
    {i+1}.attention.qkv.{weight,bias}     gpt_neox.layers.{i}.attention.query_key_value.{weight,bias}
    {i+1}.attention.dense.{weight,bias}   gpt_neox.layers.{i}.attention.dense.{weight,bias}
    {i+1}.mlp_norm.{weight,bias}          gpt_neox.layers.{i}.post_attention_layernorm.{weight,bias}
    {i+1}.mlp.up.{weight,bias}            gpt_neox.layers.{i}.mlp.dense_h_to_4h.{weight,bias}
    {i+1}.mlp.down.{weight,bias}          gpt_neox.layers.{i}.mlp.dense_4h_to_h.{weight,bias}
    {L+1}.norm.{weight,bias}              gpt_neox.final_layer_norm.{weight,bias}
    {L+2}.linear.weight                   embed_out.weight (absent when tie_word_embeddings)

Our fused QKV is laid out per key/value group, [q x (heads/kv_heads), k, v]; with one key/value
head per query head that is NeoX's per-head [q, k, v], so the tensors map unchanged. Rotary is the
half-split (rotate_half) form on the first rotary_pct of each head in both. transformers >= 5
loads `embed_out` as `lm_head` and writes it back as `embed_out`; both names are read.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_gpt.config.schema import ModelConfig
from megatron_gpt.convert.adapter import refuse_export, refuse_import
from megatron_gpt.model.names import Prefixes

ARCHITECTURE = "GPTNeoXForCausalLM"
MODEL_TYPE = "gpt_neox"
FAMILY = "neox"

_BLOCK = {  # ours (inside block) -> HF (inside gpt_neox.layers.{i})
    "attn_norm": "input_layernorm",
    "attention.qkv": "attention.query_key_value",
    "attention.dense": "attention.dense",
    "mlp_norm": "post_attention_layernorm",
    "mlp.up": "mlp.dense_h_to_4h",
    "mlp.down": "mlp.dense_4h_to_h",
}


def check(cfg: ModelConfig) -> None:
    """Raise UnsupportedOption for what GPTNeoXForCausalLM cannot express."""
    problems = []
    if cfg.norm != "layernorm":
        problems.append(f"model.norm={cfg.norm} (GPTNeoX uses LayerNorm)")
    if not cfg.bias:
        problems.append("model.bias=false (GPTNeoX's MLP and LayerNorms always have biases)")
    if cfg.activation != "gelu":
        problems.append(f"model.activation={cfg.activation} (GPTNeoX's MLP is dense_h_to_4h -> gelu -> dense_4h_to_h)")
    if cfg.position_embedding != "rotary":
        problems.append(f"model.position_embedding={cfg.position_embedding} (GPTNeoX has rotary positions only)")
    if cfg.num_kv_heads not in (None, cfg.num_attention_heads):
        problems.append(f"model.num_kv_heads={cfg.num_kv_heads} (GPTNeoX has no grouped-query attention)")
    refuse_export(ARCHITECTURE, problems, "export with --arch llama if the model is Llama-style, or train a model "
                  "with the GPT-NeoX options (see README: Model families)")


def hf_config_kwargs(cfg: ModelConfig, vocab_size: int, ffn_hidden_size: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=ffn_hidden_size, hidden_act="gelu",
        rotary_pct=cfg.rotary_pct, rotary_emb_base=cfg.rotary_base, max_position_embeddings=cfg.seq_length,
        layer_norm_eps=cfg.norm_eps, use_parallel_residual=cfg.parallel_residual,
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=True, initializer_range=cfg.init_std,
        attention_dropout=cfg.dropout, hidden_dropout=cfg.dropout,
    )


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our canonical state dict -> GPTNeoXForCausalLM's (no tensor is copied or changed)."""
    check(cfg)
    at = Prefixes.of(cfg)
    out = {"gpt_neox.embed_in.weight": state[f"{at.embedding}.word.weight"]}
    for i in range(cfg.num_layers):
        for ours, theirs in _BLOCK.items():
            for kind in ("weight", "bias"):
                out[f"gpt_neox.layers.{i}.{theirs}.{kind}"] = state[f"{at.block(i)}.{ours}.{kind}"]
    out["gpt_neox.final_layer_norm.weight"] = state[f"{at.final_norm}.norm.weight"]
    out["gpt_neox.final_layer_norm.bias"] = state[f"{at.final_norm}.norm.bias"]
    if not cfg.tie_embeddings:
        out["embed_out.weight"] = state[f"{at.output}.linear.weight"]
    return out


def model_config(hf: Any, rope: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields from a GPTNeoXConfig (rope: theta, partial factor, type)."""
    problems = []
    if hf.hidden_act != "gelu":
        problems.append(f"hidden_act={hf.hidden_act!r} (ours is exact gelu)")
    if not getattr(hf, "attention_bias", True):
        problems.append("attention_bias=false with MLP biases (our model.bias covers both)")
    if rope["type"] not in (None, "default"):
        problems.append(f"rope type {rope['type']!r} (ours is plain rotary)")
    refuse_import(ARCHITECTURE, problems)
    return dict(
        num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, num_attention_heads=hf.num_attention_heads,
        num_kv_heads=None, ffn_hidden_size=hf.intermediate_size, seq_length=hf.max_position_embeddings,
        norm="layernorm", norm_eps=hf.layer_norm_eps, activation="gelu", position_embedding="rotary",
        rotary_pct=rope["partial"], rotary_base=rope["theta"], parallel_residual=bool(hf.use_parallel_residual),
        bias=True, tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        init_std=getattr(hf, "initializer_range", 0.02),
    )


def from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPTNeoXForCausalLM's state dict -> our canonical one (vocabulary rows as in the HF model)."""
    at = Prefixes.of(cfg)
    state = {f"{at.embedding}.word.weight": hf_state["gpt_neox.embed_in.weight"]}
    for i in range(cfg.num_layers):
        for ours, theirs in _BLOCK.items():
            for kind in ("weight", "bias"):
                state[f"{at.block(i)}.{ours}.{kind}"] = hf_state[f"gpt_neox.layers.{i}.{theirs}.{kind}"]
    state[f"{at.final_norm}.norm.weight"] = hf_state["gpt_neox.final_layer_norm.weight"]
    state[f"{at.final_norm}.norm.bias"] = hf_state["gpt_neox.final_layer_norm.bias"]
    if not cfg.tie_embeddings:
        state[f"{at.output}.linear.weight"] = hf_state.get("embed_out.weight", hf_state.get("lm_head.weight"))
    return state


def used_keys(cfg: ModelConfig) -> set[str]:
    """The HF tensor names from_hf reads (others in a checkpoint are reported, not silently dropped)."""
    names = set(to_hf({k: None for k in _canonical_names(cfg)}, cfg))
    if not cfg.tie_embeddings:
        names.add("lm_head.weight")
    return names


def _canonical_names(cfg: ModelConfig) -> list[str]:
    at = Prefixes.of(cfg)
    names = [f"{at.embedding}.word.weight", f"{at.final_norm}.norm.weight", f"{at.final_norm}.norm.bias"]
    names += [f"{at.block(i)}.{ours}.{kind}" for i in range(cfg.num_layers) for ours in _BLOCK for kind in ("weight", "bias")]
    if not cfg.tie_embeddings:
        names.append(f"{at.output}.linear.weight")
    return names
