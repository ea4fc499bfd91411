"""Activation recompute (training.recompute) in one process: gradients identical with dropout on,
the saved-activation bytes it cuts (measured from autograd's saved tensors, tests/activation_bytes.py),
and the memory plan (training.memory_plan) against those measured bytes. The multi-rank proof
(tensor 2, pipeline 2, both) is tests/test_parallelism.py::test_variants_match_their_plain_layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from activation_bytes import model_activation_bytes
from megatron_gpt.config import ConfigError, load_config

TINY = str(Path(__file__).parent / "configs" / "tiny.yml")
VOCAB = 512
SHAPE = ["model.num_layers=8", "model.hidden_size=128", "model.num_attention_heads=8", "model.seq_length=64",
         "training.micro_batch_size=2", "training.device=cpu"]
FAMILIES = {
    "neox": ["model.parallel_residual=true", "model.rotary_pct=0.25"],
    "llama": ["model.norm=rmsnorm", "model.activation=swiglu", "model.bias=false", "model.num_kv_heads=2",
              "model.tie_embeddings=false"],
    "gpt2": ["model.position_embedding=learned", "model.activation=gelu_tanh"],
}
MODES = {"none": ["model.recompute=none"], "selective": ["model.recompute=selective"],
         "full": ["model.recompute=full", "model.recompute_num_layers=2"]}


def config(family: str, mode: str, *extra: str):
    return load_config([TINY], FAMILIES[family] + SHAPE + MODES[mode] + list(extra))


@pytest.mark.parametrize("family", ["neox", "llama"])
def test_recompute_reruns_with_the_same_dropout(family, single_process_group):
    from megatron_gpt.model import GPT, parallel_config, token_losses
    from megatron_gpt.training.recompute import COUNTS, apply_recompute

    tokens = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(0))
    results = {}
    for mode, chunk in [("none", 1), ("full", 1), ("full", 3), ("selective", 1)]:
        cfg = config(family, mode, "model.num_layers=4", "model.seq_length=32", "model.dropout=0.1",
                     f"model.recompute_num_layers={chunk}").model
        model = apply_recompute(GPT(cfg, VOCAB, parallel_config(), seed=1), cfg).train()
        COUNTS.clear()
        torch.manual_seed(5)
        loss = token_losses(model(tokens[:, :-1]), tokens[:, 1:], 1).mean()
        loss.backward()
        results[mode, chunk] = loss.item(), {n: p.grad for n, p in model.named_parameters()}, dict(COUNTS)
    loss, grads, counts = results["none", 1]
    assert counts == {}
    expected = {("full", 1): {"block chunk checkpointed": 4, "block chunk recomputed": 4},
                ("full", 3): {"block chunk checkpointed": 2, "block chunk recomputed": 2},  # blocks 3 + 1
                ("selective", 1): {"attention core checkpointed": 4, "attention core recomputed": 4}}
    for key, (other_loss, other_grads, other_counts) in results.items():
        assert other_loss == loss, key  # dropout on: the same masks in the first forward
        for name, grad in grads.items():  # and in the rerun, or the gradients would differ
            assert torch.allclose(other_grads[name], grad, rtol=1e-6, atol=1e-9), (key, name)
        if key in expected:
            assert other_counts == expected[key]


def measured(family: str, mode: str, precision: str = "fp32") -> int:
    cfg = config(family, mode, f"training.precision={precision}")
    return model_activation_bytes(cfg.model, VOCAB, cfg.training.micro_batch_size, precision)


@pytest.mark.parametrize("family", ["neox", "llama"])
def test_recompute_cuts_saved_activations(family, single_process_group):
    """8 blocks, fp32, one process: full (2 blocks per chunk) keeps <= 30% of the bytes, selective fewer."""
    none, selective, full = (measured(family, mode) for mode in ("none", "selective", "full"))
    print(f"{family}: none {none:,} B, selective {selective:,} B ({selective / none:.4f}), "
          f"full {full:,} B ({full / none:.3f})")
    assert full <= 0.3 * none
    assert selective < none


@pytest.mark.parametrize("family, precision", [("neox", "fp32"), ("llama", "bf16"), ("llama", "fp32"),
                                               ("gpt2", "fp32")])
def test_memory_plan_matches_saved_activations(family, precision, single_process_group):
    from megatron_gpt.training.memory_plan import model_activation_bytes as planned

    for mode in MODES:
        cfg = config(family, mode, f"training.precision={precision}")
        plan, got = planned(cfg, VOCAB, device="cpu"), measured(family, mode, precision)
        print(f"{family} {precision} {mode}: plan {plan:,.0f} B, measured {got:,} B ({plan / got - 1:+.2%})")
        assert abs(plan / got - 1) <= 0.10, (family, precision, mode, plan, got)


@pytest.mark.parametrize("overrides, message", [
    (["model.recompute=selective", "model.recompute_num_layers=2"],
     "model.recompute_num_layers: 2 applies only to full recompute, but model.recompute=selective (--set)"),
    (["model.recompute=full", "model.recompute_num_layers=3"],
     "model.recompute_num_layers: 3 blocks per chunk is more than model.num_layers=2"),
])
def test_impossible_recompute_settings_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config([TINY], overrides)
    assert message in str(info.value) and "fix: set model.recompute" in str(info.value)


@pytest.mark.slow
def test_memory_plan_matches_saved_activations_at_tensor_2(tmp_path):
    """The same measuring inside a 2-rank torchrun job (tensor-parallel layers, vocab-parallel loss):
    the plan's per-rank bytes within 10% for every family and mode."""
    import json
    import os
    import subprocess
    import sys

    from megatron_gpt.training.memory_plan import model_activation_bytes as planned

    out = tmp_path / "bytes.json"
    script = Path(__file__).parent / "activation_bytes.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(out), *FAMILIES], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    for name, got in json.loads(out.read_text()).items():
        family, mode = name.split()
        plan = planned(config(family, mode, "parallelism.tensor=2", "launcher.nproc_per_node=2"), VOCAB, device="cpu")
        print(f"tp2 {family} {mode}: plan {plan:,.0f} B, measured {got:,} B ({plan / got - 1:+.2%})")
        assert abs(plan / got - 1) <= 0.10, (name, plan, got)


@pytest.mark.slow
def test_training_with_recompute_and_zero3_matches_without(train):
    """Through the real CLI and trainer, ZeRO-3 (parameters gathered again for the rerun) and
    dropout on: full recompute trains with the same per-step losses."""
    common = ["parallelism.zero_stage=3", "model.dropout=0.1", "training.train_steps=3", "logging.log_interval=1"]
    plain = train(*common, name="plain").losses()
    full = train(*common, "model.recompute=full", name="full").losses()
    assert sorted(plain) == sorted(full) == [1, 2, 3]
    assert max(abs(plain[step] - full[step]) for step in plain) <= 1e-5, (plain, full)
