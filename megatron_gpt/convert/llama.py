"""State-dict adapter: our Llama-style GPT <-> Hugging Face LlamaForCausalLM.

    ours (canonical)                      LlamaForCausalLM
    {emb}.word.weight                     model.embed_tokens.weight
    {i+1}.attn_norm.weight                model.layers.{i}.input_layernorm.weight
    {i+1}.attention.qkv.{weight,bias}     model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}
    {i+1}.attention.dense.{weight,bias}   model.layers.{i}.self_attn.o_proj.{weight,bias}
    {i+1}.mlp_norm.weight                 model.layers.{i}.post_attention_layernorm.weight
    {i+1}.mlp.{gate,up,down}.{w,b}        model.layers.{i}.mlp.{gate,up,down}_proj.{weight,bias}
    {L+1}.norm.weight                     model.norm.weight
    {L+2}.linear.weight                   lm_head.weight (absent when tie_word_embeddings)

Our fused QKV rows are grouped per key/value head g: [q heads g*r .. g*r+r-1, k_g, v_g] with
r = heads / kv_heads, which is exactly HF's grouped-query assignment (query head h reads kv head
h // r, `repeat_kv`); splitting is a view and a reshape, no permutation. HF-format Llama weights
already use the half-split rotary (rotate_half), as ours does. Biases (ours: model.bias) map to
attention_bias and mlp_bias together.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_gpt.config.schema import ModelConfig
from megatron_gpt.convert.adapter import refuse_export, refuse_import
from megatron_gpt.model.names import Prefixes

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"
FAMILY = "llama"

_LINEAR = {"attention.dense": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
           "mlp.down": "mlp.down_proj"}
_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def check(cfg: ModelConfig) -> None:
    """Raise UnsupportedOption for what LlamaForCausalLM cannot express."""
    problems = []
    if cfg.norm != "rmsnorm":
        problems.append(f"model.norm={cfg.norm} (Llama uses RMSNorm)")
    if cfg.activation != "swiglu":
        problems.append(f"model.activation={cfg.activation} (Llama's MLP is SwiGLU: gate/up/down)")
    if cfg.position_embedding != "rotary":
        problems.append(f"model.position_embedding={cfg.position_embedding} (Llama has rotary positions only)")
    elif cfg.rotary_pct != 1.0:
        problems.append(f"model.rotary_pct={cfg.rotary_pct:g} (Llama rotates every head dimension)")
    if cfg.parallel_residual:
        problems.append("model.parallel_residual=true (Llama blocks are sequential)")
    refuse_export(ARCHITECTURE, problems, "export with --arch neox if the model is NeoX-style, or train a model "
                  "with the Llama options (see README: Model families)")


def _heads(cfg: ModelConfig) -> tuple[int, int, int]:
    kv = cfg.num_kv_heads or cfg.num_attention_heads
    return cfg.num_attention_heads, kv, cfg.hidden_size // cfg.num_attention_heads


def hf_config_kwargs(cfg: ModelConfig, vocab_size: int, ffn_hidden_size: int) -> dict[str, Any]:
    heads, kv, head_dim = _heads(cfg)
    return dict(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, intermediate_size=ffn_hidden_size,
        hidden_act="silu", rope_theta=cfg.rotary_base, max_position_embeddings=cfg.seq_length,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.bias,
        mlp_bias=cfg.bias, initializer_range=cfg.init_std, attention_dropout=cfg.dropout, pretraining_tp=1,
    )


def _split_qkv(fused: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    heads, kv, head_dim = _heads(cfg)
    per_group = fused.view(kv, heads // kv + 2, head_dim, *fused.shape[1:])
    q = per_group[:, : heads // kv].reshape(heads * head_dim, *fused.shape[1:])
    k = per_group[:, heads // kv].reshape(kv * head_dim, *fused.shape[1:])
    v = per_group[:, heads // kv + 1].reshape(kv * head_dim, *fused.shape[1:])
    return q, k, v


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    heads, kv, head_dim = _heads(cfg)
    rest = q.shape[1:]
    groups = torch.cat([q.reshape(kv, heads // kv, head_dim, *rest), k.reshape(kv, 1, head_dim, *rest),
                        v.reshape(kv, 1, head_dim, *rest)], dim=1)
    return groups.reshape((heads + 2 * kv) * head_dim, *rest)


def _kinds(cfg: ModelConfig) -> tuple[str, ...]:
    return ("weight", "bias") if cfg.bias else ("weight",)


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our canonical state dict -> LlamaForCausalLM's (q/k/v are views of our fused QKV)."""
    check(cfg)
    at = Prefixes.of(cfg)
    out = {"model.embed_tokens.weight": state[f"{at.embedding}.word.weight"]}
    for i in range(cfg.num_layers):
        ours, theirs = at.block(i), f"model.layers.{i}"
        for kind in _kinds(cfg):
            q, k, v = _split_qkv(state[f"{ours}.attention.qkv.{kind}"], cfg)
            out.update({f"{theirs}.self_attn.q_proj.{kind}": q, f"{theirs}.self_attn.k_proj.{kind}": k,
                        f"{theirs}.self_attn.v_proj.{kind}": v})
            for name, hf_name in _LINEAR.items():
                out[f"{theirs}.{hf_name}.{kind}"] = state[f"{ours}.{name}.{kind}"]
        for name, hf_name in _NORMS.items():
            out[f"{theirs}.{hf_name}.weight"] = state[f"{ours}.{name}.weight"]
    out["model.norm.weight"] = state[f"{at.final_norm}.norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state[f"{at.output}.linear.weight"]
    return out


def model_config(hf: Any, rope: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields from a LlamaConfig (rope: theta, partial factor, type)."""
    problems = []
    if hf.hidden_act != "silu":
        problems.append(f"hidden_act={hf.hidden_act!r} (ours is SwiGLU with silu)")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        problems.append(f"head_dim={head_dim} x {hf.num_attention_heads} heads != hidden_size {hf.hidden_size}")
    if bool(getattr(hf, "attention_bias", False)) != bool(getattr(hf, "mlp_bias", False)):
        problems.append("attention_bias != mlp_bias (our model.bias covers both)")
    if rope["type"] not in (None, "default"):
        problems.append(f"rope type {rope['type']!r} (ours is plain rotary)")
    if rope["partial"] != 1.0:
        problems.append(f"partial_rotary_factor={rope['partial']}")
    if getattr(hf, "pretraining_tp", 1) not in (None, 1):
        problems.append(f"pretraining_tp={hf.pretraining_tp}")
    refuse_import(ARCHITECTURE, problems)
    kv = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    return dict(
        num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, num_attention_heads=hf.num_attention_heads,
        num_kv_heads=None if kv == hf.num_attention_heads else kv, ffn_hidden_size=hf.intermediate_size,
        seq_length=hf.max_position_embeddings, norm="rmsnorm", norm_eps=hf.rms_norm_eps, activation="swiglu",
        position_embedding="rotary", rotary_pct=1.0, rotary_base=rope["theta"], parallel_residual=False,
        bias=bool(getattr(hf, "attention_bias", False)), tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        init_std=getattr(hf, "initializer_range", 0.02),
    )


def from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's state dict -> our canonical one (vocabulary rows as in the HF model)."""
    at = Prefixes.of(cfg)
    state = {f"{at.embedding}.word.weight": hf_state["model.embed_tokens.weight"]}
    for i in range(cfg.num_layers):
        ours, theirs = at.block(i), f"model.layers.{i}"
        for kind in _kinds(cfg):
            state[f"{ours}.attention.qkv.{kind}"] = _fuse_qkv(
                *(hf_state[f"{theirs}.self_attn.{p}_proj.{kind}"] for p in "qkv"), cfg)
            for name, hf_name in _LINEAR.items():
                state[f"{ours}.{name}.{kind}"] = hf_state[f"{theirs}.{hf_name}.{kind}"]
        for name, hf_name in _NORMS.items():
            state[f"{ours}.{name}.weight"] = hf_state[f"{theirs}.{hf_name}.weight"]
    state[f"{at.final_norm}.norm.weight"] = hf_state["model.norm.weight"]
    if not cfg.tie_embeddings:
        state[f"{at.output}.linear.weight"] = hf_state["lm_head.weight"]
    return state


def used_keys(cfg: ModelConfig) -> set[str]:
    """The HF tensor names from_hf reads."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(cfg.num_layers):
        theirs = f"model.layers.{i}"
        for kind in _kinds(cfg):
            names |= {f"{theirs}.self_attn.{p}_proj.{kind}" for p in "qkv"}
            names |= {f"{theirs}.{hf_name}.{kind}" for hf_name in _LINEAR.values()}
        names |= {f"{theirs}.{hf_name}.weight" for hf_name in _NORMS.values()}
    if not cfg.tie_embeddings:
        names.add("lm_head.weight")
    return names
