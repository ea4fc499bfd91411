"""State-dict adapter: our GPT-2-style GPT <-> Hugging Face GPT2LMHeadModel.

    ours (canonical)                      GPT2LMHeadModel
    {emb}.word.weight                     transformer.wte.weight
    {emb}.position.weight                 transformer.wpe.weight
    {i+1}.attn_norm.{weight,bias}         transformer.h.{i}.ln_1.{weight,bias}
    {i+1}.attention.qkv.{weight,bias}     transformer.h.{i}.attn.c_attn.{weight,bias}
    {i+1}.attention.dense.{weight,bias}   transformer.h.{i}.attn.c_proj.{weight,bias}
    {i+1}.mlp_norm.{weight,bias}          transformer.h.{i}.ln_2.{weight,bias}
    {i+1}.mlp.up.{weight,bias}            transformer.h.{i}.mlp.c_fc.{weight,bias}
    {i+1}.mlp.down.{weight,bias}          transformer.h.{i}.mlp.c_proj.{weight,bias}
    {L+1}.norm.{weight,bias}              transformer.ln_f.{weight,bias}
    {L+2}.linear.weight                   lm_head.weight (absent when tie_word_embeddings)

GPT-2's linear layers are Conv1D modules whose weight is [in, out], the transpose of ours.
Its c_attn output is [q of every head, k of every head, v of every head]; ours is per head
[q, k, v] (one key/value group per head), so the rows are regrouped. Transposes and regrouping
are permutations, so a round trip is bit for bit. OpenAI's original checkpoints name the tensors
without the `transformer.` prefix (GPT2Model's names); `normalize_keys` adds it.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_gpt.config.schema import ModelConfig
from megatron_gpt.convert.adapter import refuse_export, refuse_import
from megatron_gpt.model.names import Prefixes

ARCHITECTURE = "GPT2LMHeadModel"
CONFIG_CLASS = "GPT2Config"
MODEL_TYPE = "gpt2"
FAMILY = "gpt2"
ROTARY = False
"""GPT-2 has learned positions: the exporter checks no rotary settings."""

_BLOCK = {  # ours (inside block) -> HF (inside transformer.h.{i}), with whether HF's weight is Conv1D's [in, out]
    "attn_norm": ("ln_1", False),
    "attention.qkv": ("attn.c_attn", True),
    "attention.dense": ("attn.c_proj", True),
    "mlp_norm": ("ln_2", False),
    "mlp.up": ("mlp.c_fc", True),
    "mlp.down": ("mlp.c_proj", True),
}
_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
_HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def check(cfg: ModelConfig) -> None:
    """Raise UnsupportedOption for what GPT2LMHeadModel cannot express."""
    problems = []
    if cfg.norm != "layernorm":
        problems.append(f"model.norm={cfg.norm} (GPT-2 uses LayerNorm)")
    if not cfg.bias:
        problems.append("model.bias=false (GPT-2's linear layers and LayerNorms always have biases)")
    if cfg.activation not in _ACTIVATIONS:
        problems.append(f"model.activation={cfg.activation} (GPT-2's MLP is c_fc -> gelu -> c_proj)")
    if cfg.position_embedding != "learned":
        problems.append(f"model.position_embedding={cfg.position_embedding} (GPT-2 has learned positions only)")
    if cfg.parallel_residual:
        problems.append("model.parallel_residual=true (GPT-2's block is sequential)")
    if cfg.num_kv_heads not in (None, cfg.num_attention_heads):
        problems.append(f"model.num_kv_heads={cfg.num_kv_heads} (GPT-2 has no grouped-query attention)")
    refuse_export(ARCHITECTURE, problems, "export with --arch neox or llama if the model is in that style, or train a "
                  "model with the GPT-2 options (see README: Model families)")


def hf_config_kwargs(cfg: ModelConfig, vocab_size: int, ffn_hidden_size: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size, n_positions=cfg.seq_length, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
        n_head=cfg.num_attention_heads, n_inner=ffn_hidden_size, activation_function=_ACTIVATIONS[cfg.activation],
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
    )


def _heads_first(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's [3 x heads x head_dim, ...] rows -> ours [heads x 3 x head_dim, ...]."""
    rest = qkv.shape[1:]
    return qkv.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(qkv.shape)


def _parts_first(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Ours [heads x 3 x head_dim, ...] rows -> HF's [3 x heads x head_dim, ...]."""
    rest = qkv.shape[1:]
    return qkv.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(qkv.shape)


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our canonical state dict -> GPT2LMHeadModel's."""
    check(cfg)
    at = Prefixes.of(cfg)
    out = {"transformer.wte.weight": state[f"{at.embedding}.word.weight"],
           "transformer.wpe.weight": state[f"{at.embedding}.position.weight"]}
    for i in range(cfg.num_layers):
        for ours, (theirs, conv) in _BLOCK.items():
            for kind in ("weight", "bias"):
                tensor = state[f"{at.block(i)}.{ours}.{kind}"]
                if tensor is not None and ours == "attention.qkv":
                    tensor = _parts_first(tensor, cfg.num_attention_heads)
                if tensor is not None and conv and kind == "weight":
                    tensor = tensor.t()
                out[f"transformer.h.{i}.{theirs}.{kind}"] = tensor
    out["transformer.ln_f.weight"] = state[f"{at.final_norm}.norm.weight"]
    out["transformer.ln_f.bias"] = state[f"{at.final_norm}.norm.bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state[f"{at.output}.linear.weight"]
    return out


def model_config(hf: Any, rope: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields from a GPT2Config."""
    problems = []
    if hf.activation_function not in _HF_ACTIVATIONS:
        problems.append(f"activation_function={hf.activation_function!r} (ours is gelu or its tanh approximation)")
    if not getattr(hf, "scale_attn_weights", True):
        problems.append("scale_attn_weights=false (ours scales by 1/sqrt(head_dim))")
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=true")
    if getattr(hf, "add_cross_attention", False):
        problems.append("add_cross_attention=true")
    refuse_import(ARCHITECTURE, problems)
    return dict(
        num_layers=hf.n_layer, hidden_size=hf.n_embd, num_attention_heads=hf.n_head, num_kv_heads=None,
        ffn_hidden_size=hf.n_inner or 4 * hf.n_embd, seq_length=hf.n_positions, norm="layernorm",
        norm_eps=hf.layer_norm_epsilon, activation=_HF_ACTIVATIONS[hf.activation_function],
        position_embedding="learned", parallel_residual=False, bias=True,
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)), init_std=getattr(hf, "initializer_range", 0.02),
    )


def normalize_keys(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2Model-style names (OpenAI's checkpoints: `wte.weight`, `h.0...`) -> GPT2LMHeadModel's."""
    if "transformer.wte.weight" in hf_state or "wte.weight" not in hf_state:
        return hf_state
    return {(name if name.startswith("lm_head.") else f"transformer.{name}"): t for name, t in hf_state.items()}


def from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict -> our canonical one (vocabulary rows as in the HF model)."""
    hf_state = normalize_keys(hf_state)
    at = Prefixes.of(cfg)
    state = {f"{at.embedding}.word.weight": hf_state["transformer.wte.weight"],
             f"{at.embedding}.position.weight": hf_state["transformer.wpe.weight"]}
    for i in range(cfg.num_layers):
        for ours, (theirs, conv) in _BLOCK.items():
            for kind in ("weight", "bias"):
                tensor = hf_state[f"transformer.h.{i}.{theirs}.{kind}"]
                if conv and kind == "weight":
                    tensor = tensor.t()
                if ours == "attention.qkv":
                    tensor = _heads_first(tensor, cfg.num_attention_heads)
                state[f"{at.block(i)}.{ours}.{kind}"] = tensor.contiguous()
    state[f"{at.final_norm}.norm.weight"] = hf_state["transformer.ln_f.weight"]
    state[f"{at.final_norm}.norm.bias"] = hf_state["transformer.ln_f.bias"]
    if not cfg.tie_embeddings:
        state[f"{at.output}.linear.weight"] = hf_state["lm_head.weight"]
    return state


def used_keys(cfg: ModelConfig) -> set[str]:
    """The HF tensor names from_hf reads (others in a checkpoint are reported, not silently dropped)."""
    at = Prefixes.of(cfg)
    names = [f"{at.embedding}.word.weight", f"{at.embedding}.position.weight",
             f"{at.final_norm}.norm.weight", f"{at.final_norm}.norm.bias"]
    names += [f"{at.block(i)}.{ours}.{kind}" for i in range(cfg.num_layers) for ours in _BLOCK for kind in ("weight", "bias")]
    if not cfg.tie_embeddings:
        names.append(f"{at.output}.linear.weight")
    return set(to_hf(dict.fromkeys(names), cfg))
