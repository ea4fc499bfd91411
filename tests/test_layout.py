"""`megatron-gpt layout`: counts match the real model, and bad layouts are clear errors."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_gpt.cli import main
from megatron_gpt.config import load_config

TINY = os.path.join(os.path.dirname(__file__), "configs", "tiny.yml")
FAMILIES = {
    "neox": ["model.parallel_residual=true", "model.rotary_pct=0.5", "model.tie_embeddings=true"],
    "llama": ["model.norm=rmsnorm", "model.activation=swiglu", "model.bias=false", "model.num_kv_heads=2",
              "model.tie_embeddings=false"],
    "gpt2": ["model.position_embedding=learned"],
}


pytestmark = pytest.mark.usefixtures("single_process_group")


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_sum_to_the_single_process_model(family):
    from megatron_gpt.training.layout_report import layer_counts, layout_report
    from megatron_gpt.model import GPT, parallel_config

    cfg = load_config([TINY], FAMILIES[family] + ["parallelism.tensor=2", "parallelism.pipeline=2"], world_size=4)
    model = GPT(cfg.model, 2048, parallel_config(), seed=1)
    per_layer = [sum(p.numel() for p in m.parameters()) for m in model.layers]
    counts = layer_counts(cfg.model, 2048, 1)
    distinct = counts[:-1] if cfg.model.tie_embeddings else counts
    assert [c.held for c in distinct] == per_layer
    _, unique_total = layout_report(cfg, 4, 2048)
    assert unique_total == sum(p.numel() for p in model.parameters())


def test_layout_command_prints_every_rank(capsys):
    assert main(["layout", TINY, "--world-size", "8", "--vocab-size", "2000",
                 "--set", "parallelism.tensor=2", "--set", "parallelism.pipeline=2"]) == 0
    out = capsys.readouterr().out
    assert "world 8 = tensor 2 x pipeline 2 x data 2" in out and "vocab 2048 (padded)" in out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [tuple(map(int, r[1:4])) for r in rows] == [  # (tp, pp, dp): tensor fastest, then data
        (0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (1, 1, 0), (0, 1, 1), (1, 1, 1)]


@pytest.mark.parametrize("overrides, world, message", [
    (["parallelism.tensor=3"], 3, "parallelism.tensor: 3 does not divide model.num_attention_heads=4"),
    (["model.num_kv_heads=2", "parallelism.tensor=4"], 4, "does not divide model.num_kv_heads=2"),
    (["parallelism.tensor=2"], 3, "world size 3"),
    (["parallelism.pipeline=2", "parallelism.zero_stage=2"], 2, "parallelism.zero_stage"),
])
def test_bad_layouts_are_clear_errors(overrides, world, message, capsys):
    args = ["layout", TINY, "--world-size", str(world), "--vocab-size", "2000"]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and ("tiny.yml" in err or "--set" in err), err


def test_layout_adds_activations_and_ends_with_a_verdict(capsys):
    from megatron_gpt.training.memory_plan import stage_activations

    overrides = ["parallelism.pipeline=2", "training.global_batch_size=16", "training.precision=bf16"]
    args = ["layout", TINY, "--world-size", "4", "--vocab-size", "2000"] + [a for o in overrides for a in ("--set", o)]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split()
    assert "activ" in header and lines[-1].startswith("fits: ") and "largest term: " in lines[-1], lines[-1]
    rows = {int(r.split()[0]): r.split() for r in lines if r.split() and r.split()[0].isdigit()}
    cfg = load_config([TINY], overrides, world_size=4)
    # 1F1B: the first stage holds pipeline (2) micro-batches of its block and ids, the last one its
    # block, final norm and logits; gradient accumulation is 16 / (4 x 2) = 4 micro-batches.
    first = stage_activations(cfg, 2048, 1, True, False, 0, 4)
    last = stage_activations(cfg, 2048, 1, False, True, 1, 4)
    assert (first.in_flight, last.in_flight) == (2, 1)
    assert float(rows[0][-2]) == pytest.approx(first.total / 2**20, abs=0.06)
    assert float(rows[2][-2]) == pytest.approx(last.total / 2**20, abs=0.06)
    assert main(args + ["--gpu-memory", "1MiB"]) == 0
    last_line = capsys.readouterr().out.splitlines()[-1]
    assert last_line.startswith("does not fit: ") and "of 1.0 MiB per GPU" in last_line, last_line
    assert "too much; largest term: " in last_line


def test_gpu_memory_sizes(capsys):
    from megatron_gpt.training.memory_plan import parse_size

    assert parse_size("80GB") == 80 * 10**9 and parse_size("40GiB") == 40 * 2**30
    assert parse_size("141gb") == 141 * 10**9 and parse_size("1.5 TB") == 1.5 * 10**12
    for bad in ("80", "80 GiBs", "lots"):
        with pytest.raises(ValueError, match="e.g. 80GB"):
            parse_size(bad)
    with pytest.raises(SystemExit):
        main(["layout", TINY, "--vocab-size", "2000", "--gpu-memory", "80"])
    assert "argument --gpu-memory: memory size '80' is not a number with a unit" in capsys.readouterr().err


def test_offloaded_states_leave_the_gpu():
    """ZeRO-Offload (the deepspeed: section) moves optimizer states, and under ZeRO-3 offload_param
    the parameter partitions, to host memory: the plan counts none of them on the GPU."""
    from megatron_gpt.training.layout_report import memory_mib

    plain = load_config([TINY], ["parallelism.zero_stage=3", "training.precision=bf16"], world_size=2)
    offload = load_config([TINY], ["parallelism.zero_stage=3", "training.precision=bf16",
                                   "deepspeed={zero_optimization: {offload_optimizer: {device: cpu}, "
                                   "offload_param: {device: cpu}}}"], world_size=2)
    weights, grads, optimizer = memory_mib(1_000_000, plain, 2)
    assert (weights, grads, optimizer) == pytest.approx((2e6 / 2 / 2**20, 2e6 / 2 / 2**20, 12e6 / 2 / 2**20))
    assert memory_mib(1_000_000, offload, 2) == (0.0, grads, 0.0)
