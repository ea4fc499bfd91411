"""The `deepspeed:` config section: merged last into the derived DeepSpeed JSON, derived keys
refused with their origin and the schema key to use, and ZeRO-Offload training with real ranks."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from megatron_gpt.cli import main as cli
from megatron_gpt.config import ConfigError, deepspeed_config, engine_zero_stage, load_config

TINY = Path(__file__).resolve().parent / "configs" / "tiny.yml"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ds.yml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_section_is_merged_last_key_by_key(tmp_path):
    extra = write(tmp_path, """\
        deepspeed:
          zero_optimization:
            offload_optimizer: {device: cpu, pin_memory: false}
            reduce_bucket_size: 1000
            overlap_comm: true
          fp16: {loss_scale_window: 500}
          flops_profiler: {enabled: true, profile_step: 3}
        """)
    cfg = load_config([str(TINY), extra], ["parallelism.zero_stage=2"], world_size=2)
    ds = deepspeed_config(cfg, world_size=2)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] is True and zero["reduce_bucket_size"] == 1000
    assert zero["allgather_bucket_size"] == 500_000_000 and zero["contiguous_gradients"] is True  # kept
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert ds["fp16"]["loss_scale_window"] == 500 and ds["fp16"]["initial_scale_power"] == 16
    assert ds["flops_profiler"] == {"enabled": True, "profile_step": 3}
    assert ds["train_batch_size"] == 8 and ds["optimizer"]["params"]["fused"] is True
    json.dumps(ds)


def test_offload_keeps_zero_at_one_data_rank():
    # Without offload, stage 1 over one data rank runs as stage 0; the offloaded optimizer lives in ZeRO's.
    plain = load_config([str(TINY)], ["parallelism.zero_stage=1"], world_size=1)
    offload = load_config([str(TINY)], ["parallelism.zero_stage=1",
                                        "deepspeed.zero_optimization.offload_optimizer.device=cpu"], world_size=1)
    assert engine_zero_stage(plain, 1) == 0 and engine_zero_stage(offload, 1) == 1
    assert deepspeed_config(offload, 1)["zero_optimization"]["stage"] == 1


def test_derived_keys_are_errors_naming_origin_and_schema_key(tmp_path):
    extra = write(tmp_path, """\
        deepspeed:
          train_batch_size: 64
          zero_optimization:
            stage: 3
          bf16: {enabled: true}
          optimizer: {type: Adam}
          zero_optimization_typo_free: 1
        """)
    with pytest.raises(ConfigError) as err:
        load_config([str(TINY), extra], ["deepspeed.gradient_clipping=2.0"], world_size=1)
    lines = [str(p) for p in err.value.problems]
    assert f"{extra}:2: deepspeed.train_batch_size: set by training.global_batch_size" in lines[0]
    assert lines[1] == (f"{extra}:4: deepspeed.zero_optimization.stage: set by parallelism.zero_stage "
                        "(the framework derives it); fix: remove deepspeed.zero_optimization.stage and set "
                        "parallelism.zero_stage instead")
    assert lines[2].startswith(f"{extra}:5: deepspeed.bf16.enabled: set by training.precision")
    assert lines[3].startswith(f"{extra}:6: deepspeed.optimizer: set by the optimizer section")
    assert lines[4].startswith("--set: deepspeed.gradient_clipping: set by training.gradient_clipping")
    assert len(lines) == 5  # keys DeepSpeed itself knows nothing of are DeepSpeed's to refuse


def test_offload_needs_a_zero_stage_and_mappings_stay_mappings():
    with pytest.raises(ConfigError) as err:
        load_config([str(TINY)], ["parallelism.zero_stage=0", "deepspeed.zero_optimization.offload_optimizer.device=cpu",
                                  "deepspeed.fp16=1"], world_size=1)
    text = str(err.value)
    assert ("--set: deepspeed.zero_optimization.offload_optimizer: device cpu needs ZeRO stage 1, 2 or 3, but "
            "parallelism.zero_stage is 0; fix: set parallelism.zero_stage to 1, 2 or 3") in text
    assert "--set: deepspeed.fp16: 1 would replace the derived mapping fp16" in text
    with pytest.raises(ConfigError, match="offload_param: device cpu needs ZeRO stage 3"):
        load_config([str(TINY)], ["parallelism.zero_stage=2", "deepspeed.zero_optimization.offload_param.device=cpu"],
                    world_size=2)


def test_config_deepspeed_prints_the_merged_json(capsys):
    assert cli(["config", "deepspeed", str(TINY), "--world-size", "2", "--set", "parallelism.zero_stage=2",
                "--set", "deepspeed.zero_optimization.overlap_comm=true"]) == 0
    ds = json.loads(capsys.readouterr().out)
    assert ds["zero_optimization"]["overlap_comm"] is True and ds["zero_optimization"]["stage"] == 2


@pytest.mark.slow
def test_zero_offload_matches_plain_run_and_resumes(train, tmp_path):
    """2 ranks, gloo, ZeRO-2: the optimizer offloaded to the CPU (torch's fused AdamW run by ZeRO's
    offload path) gives the per-step losses of the run without offload, and resumes exactly."""
    common = ["parallelism.zero_stage=2", "training.train_steps=5"]
    offload = "deepspeed.zero_optimization.offload_optimizer.device=cpu"
    plain = train(*common, nproc=2, name="plain")
    assert "ZeRO-Offload" not in plain.output
    ckpt = tmp_path / "ckpt"
    first = train(*common, offload, "training.train_steps=3", f"checkpoint.save_dir={ckpt}", nproc=2, name="first")
    assert "optimizer offloaded to cpu (ZeRO-Offload)" in first.output
    second = train(*common, offload, f"checkpoint.save_dir={ckpt}", nproc=2, name="second")
    assert "steps 3->5" in second.output
    straight, offloaded = plain.losses(), {**first.losses(), **second.losses()}
    assert sorted(straight) == sorted(offloaded) == [1, 2, 3, 4, 5]
    print("max |loss(plain) - loss(offload)|:", max(abs(straight[s] - offloaded[s]) for s in straight))
    for step in straight:
        assert abs(straight[step] - offloaded[step]) <= 1e-5, (step, straight[step], offloaded[step])
    assert straight[5] < straight[1]


def test_pipeline_partitioning_is_derived_under_sequence_parallelism():
    """Under sequence parallelism each tensor rank sends its own slice between stages, so the
    derived pipe_partitioned/grad_partitioned false may not be overridden; without it they are free."""
    sets = ["parallelism.tensor=2", "parallelism.pipeline=2", "launcher.nproc_per_node=4",
            "deepspeed.pipeline.pipe_partitioned=true"]
    with pytest.raises(ConfigError, match="deepspeed.pipeline.pipe_partitioned: set by parallelism.sequence_parallel"):
        load_config([str(TINY)], sets + ["parallelism.sequence_parallel=true"], world_size=4)
    cfg = load_config([str(TINY)], sets, world_size=4)
    assert deepspeed_config(cfg, 4)["pipeline"] == {"pipe_partitioned": True}
