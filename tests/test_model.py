"""The GPT in one process: every family is causal, deterministic and independent of layout."""

from __future__ import annotations


import pytest
import torch

from megatron_gpt.config.schema import ModelConfig

FAMILIES = {
    "gpt2": dict(position_embedding="learned"),
    "neox": dict(parallel_residual=True, rotary_pct=0.25, tie_embeddings=False),
    "llama": dict(norm="rmsnorm", activation="swiglu", bias=False, num_kv_heads=2, tie_embeddings=False),
}
VOCAB = 256


pytestmark = pytest.mark.usefixtures("single_process_group")


def build(family: str, seed: int = 0, **extra):
    from megatron_gpt.model import GPT, parallel_config

    shape = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32)
    cfg = ModelConfig(**{**shape, **FAMILIES[family], **extra})
    return GPT(cfg, VOCAB, parallel_config(), seed=seed)


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_and_shapes(family):
    model = build(family)
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    assert logits.shape == (2, 32, VOCAB)
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % VOCAB  # alter the future only
    after = model(changed)
    assert torch.allclose(logits[:, :20], after[:, :20], atol=1e-6)
    assert not torch.allclose(logits[:, 20:], after[:, 20:])


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_weights_and_loss_is_near_uniform(family):
    from megatron_gpt.model import masked_mean, token_losses

    a, b, c = build(family, seed=3), build(family, seed=3), build(family, seed=4)
    tensors = lambda m: {k: v for k, v in m.state_dict().items() if torch.is_tensor(v)}
    assert all(torch.equal(x, tensors(b)[k]) for k, x in tensors(a).items())
    assert not all(torch.equal(x, tensors(c)[k]) for k, x in tensors(a).items())
    tokens = torch.randint(0, VOCAB, (2, 32))
    loss = masked_mean(token_losses(a(tokens), tokens, 1), torch.ones(2, 32))
    assert abs(loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 1.0  # 0.02-std init: near uniform


def test_layer_weights_do_not_depend_on_other_layers():
    """Each spec is built under its own seed, so a pipeline stage that builds only some layers
    gets the same weights as the full model."""
    from megatron_gpt.model.gpt import build_layer, layer_specs
    from megatron_gpt.model import parallel_config

    cfg = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, seq_length=32)
    specs = layer_specs(cfg, VOCAB, parallel_config())
    full = build("gpt2", seed=7, num_layers=3, position_embedding="rotary")
    alone = build_layer(specs[2], seed=7, position=2)  # block 1 built without anything before it
    assert torch.equal(alone.attention.qkv.weight, full.layers[2].attention.qkv.weight)


def test_grouped_query_attention_matches_repeated_kv_heads():
    """GQA with 2 kv heads equals plain attention after repeating each kv head per group."""
    from megatron_gpt.model.layers import Attention
    from megatron_gpt.model import parallel_config

    cfg = ModelConfig(hidden_size=64, num_attention_heads=4, num_kv_heads=2, seq_length=16, bias=False)
    attn = Attention(cfg, parallel_config())
    hidden = torch.randn(1, 16, 64)
    qkv, _ = attn.qkv(hidden)
    qkv = qkv.view(1, 16, 2, 4, 16)  # [b, s, kv groups, (2 q + k + v), head_dim]
    from megatron_gpt.model.layers import apply_rotary
    q = apply_rotary(qkv[:, :, :, :2].reshape(1, 16, 4, 16), 16, cfg.rotary_base)
    k = apply_rotary(qkv[:, :, :, 2], 16, cfg.rotary_base).repeat_interleave(2, dim=2)
    v = qkv[:, :, :, 3].repeat_interleave(2, dim=2)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    expected, _ = attn.dense(expected.reshape(1, 16, 64))
    assert torch.allclose(attn(hidden), expected, atol=1e-6)


def test_evaluate_bits_per_byte_of_a_uniform_model():
    """A model that predicts uniformly scores ln(V) nats per token, and bits per byte is the
    summed nats / ln 2 over the UTF-8 bytes the target tokens stand for."""
    import math

    from megatron_gpt.data.datasets import SampleOrder
    from megatron_gpt.training.validation import eval_batches, evaluate, module_summed_nats

    class Uniform(torch.nn.Module):
        def forward(self, tokens):
            return torch.zeros(*tokens.shape, VOCAB)

    labels = torch.arange(16).view(2, 8) + 1
    dataset = [{"tokens": labels[i] - 1, "labels": labels[i], "loss_mask": torch.ones(8)} for i in range(2)]
    byte_lengths = torch.arange(VOCAB) % 3 + 1  # token t stands for 1-3 bytes
    batches = eval_batches(dataset, SampleOrder(1, 1, 1, 0), 2, torch.device("cpu"))
    result = evaluate(module_summed_nats(Uniform(), 1), batches, byte_lengths)
    total_bytes = byte_lengths[labels].sum().item()
    assert result["val_loss"] == pytest.approx(math.log(VOCAB))
    assert result["val_bpb"] == pytest.approx(16 * math.log(VOCAB) / math.log(2) / total_bytes)
