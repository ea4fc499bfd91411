"""Config loading, merging, overrides, validation messages, derived batch layout and DeepSpeed JSON."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_gpt.config import (
    Config,
    ConfigError,
    batch_layout,
    config_to_dict,
    deepspeed_config,
    load_config,
    padded_vocab_size,
)
from megatron_gpt.cli.config import register

BASE = """\
name: base
model:
  num_layers: 2
  hidden_size: 64
  num_attention_heads: 4
data:
  embedded: shakespeare
schedule:
  warmup_steps: 2
"""


@pytest.fixture
def write(tmp_path: Path):
    def write(name: str, text: str) -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return str(path)
    return write


@pytest.fixture
def base(write) -> str:
    return write("base.yml", BASE)


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- merging and overrides


def test_later_file_wins_and_sections_merge_key_by_key(base, write):
    over = write("over.yml", """\
        model:
          num_layers: 3
        training:
          seed: 7
    """)
    cfg = load_config([base, over])
    assert cfg.model.num_layers == 3        # from over.yml
    assert cfg.model.hidden_size == 64      # kept from base.yml: nested merge, not replace
    assert cfg.training.seed == 7
    assert cfg.name == "base"
    assert load_config([over, base]).model.num_layers == 2  # order matters


def test_lists_replace_instead_of_appending(write):
    a = write("a.yml", "data: {paths: [a, b]}\ntokenizer: {type: bytes}\n")
    b = write("b.yml", "data: {paths: [c]}\n")
    assert load_config([a, b]).data.paths == ["c"]


def test_empty_section_means_no_overrides(base, write):
    empty = write("empty.yml", "model:\n  # hidden_size: 32\n")
    assert load_config([base, empty]).model.hidden_size == 64


def test_yaml_merge_keys_explicit_keys_win(write):
    path = write("anchors.yml", """\
        data: {embedded: shakespeare}
        schedule: {warmup_steps: 1}
        model:
          <<: {hidden_size: 64, num_layers: 2}
          num_layers: 3
    """)
    cfg = load_config([path])
    assert (cfg.model.hidden_size, cfg.model.num_layers) == (64, 3)


def test_set_overrides_are_yaml_and_beat_every_file(base, write):
    over = write("over.yml", "checkpoint:\n  save_dir: ckpt\ntraining:\n  train_steps: 100\n")
    cfg = load_config([base, over], [
        "training.train_steps=5",
        "data.paths=[a, b]",
        "data.embedded=null",
        "tokenizer.type=bytes",
        "checkpoint.save_dir=null",
        "optimizer.lr=1e-3",
        "model.bias=false",
    ])
    assert cfg.training.train_steps == 5
    assert cfg.data.paths == ["a", "b"] and cfg.data.embedded is None
    assert cfg.checkpoint.save_dir is None
    assert cfg.optimizer.lr == 1e-3
    assert cfg.model.bias is False
    assert cfg.model.hidden_size == 64  # --set merges into the section too


def test_later_set_wins_over_earlier_set(base):
    assert load_config([base], ["training.seed=1", "training.seed=2"]).training.seed == 2


@pytest.mark.parametrize("bad", ["training.train_steps", "=5", "training..seed=1"])
def test_malformed_set(base, bad):
    assert "KEY=VALUE" in error_of([base], [bad])


def test_set_value_that_is_not_yaml(base):
    msg = error_of([base], ["data.paths=[a, b"])
    assert "--set" in msg and "data.paths" in msg and "quote" in msg


# --------------------------------------------------------------------------- errors from the schema


def test_unknown_key_names_file_line_and_suggestion(base, write):
    bad = write("bad.yml", "model:\n  num_layers: 2\n  hiden_size: 32\n")
    msg = error_of([base, bad])
    assert f"{bad}:3: unknown key 'model.hiden_size'; did you mean 'model.hidden_size'?" in msg


def test_unknown_section_and_key_in_the_wrong_section(write):
    bad = write("bad.yml", "modle:\n  num_layers: 2\nmodel:\n  micro_batch_size: 4\n")
    msg = error_of([bad])
    assert f"{bad}:1: unknown key 'modle'; did you mean 'model'?" in msg
    assert f"{bad}:4: unknown key 'model.micro_batch_size'; did you mean 'training.micro_batch_size'?" in msg


def test_wrong_type_names_file_line_key_and_fix(base, write):
    bad = write("bad.yml", "name: x\nmodel:\n  num_layers: four\n")
    msg = error_of([base, bad])
    assert f"{bad}:3: model.num_layers: expected an integer, got 'four' (str); fix: " in msg


def test_wrong_type_from_set_names_set(base):
    msg = error_of([base], ["training.train_steps=many"])
    assert "--set: training.train_steps: expected an integer, got 'many' (str)" in msg


def test_bad_choice_suggests_the_closest_option(base):
    msg = error_of([base], ["model.norm=rms"])
    assert "model.norm: expected one of layernorm, rmsnorm" in msg and "did you mean 'rmsnorm'?" in msg


def test_all_problems_are_reported_at_once(write):
    bad = write("bad.yml", "model:\n  num_layers: four\n  hiden_size: 2\ntraining:\n  seed: x\n")
    msg = error_of([bad])
    assert msg.startswith("3 problems")
    assert f"{bad}:2:" in msg and f"{bad}:3:" in msg and f"{bad}:5:" in msg


def test_missing_file_names_the_path(base, tmp_path):
    missing = str(tmp_path / "nope.yml")
    msg = error_of([base, missing])
    assert missing in msg and "not found" in msg


def test_yaml_syntax_error_names_file_and_line(write):
    bad = write("bad.yml", "model:\n  hidden_size: 64\n   num_layers: 2\n")
    msg = error_of([bad])
    assert f"{bad}:3: invalid YAML" in msg


def test_duplicate_key_in_one_file(write):
    bad = write("bad.yml", "model:\n  hidden_size: 64\n  hidden_size: 32\n")
    assert f"{bad}:3: duplicate key 'model.hidden_size' (also on line 2)" in error_of([bad])


def test_top_level_must_be_a_mapping(write):
    bad = write("bad.yml", "- model\n")
    assert f"{bad}:1: the top level must be a mapping" in error_of([bad])


# --------------------------------------------------------------------------- cross-field checks


def test_hidden_not_divisible_by_heads(base, write):
    bad = write("bad.yml", "model:\n  hidden_size: 100\n  num_attention_heads: 3\n")
    msg = error_of([base, bad])
    assert f"{bad}:2: model.hidden_size: 100 is not divisible by model.num_attention_heads=3 ({bad}:3)" in msg
    assert "fix: set model.hidden_size to a multiple of 3, e.g. 102" in msg


def test_world_size_not_divisible_by_tensor_times_pipeline(base, write):
    par = write("par.yml", "parallelism:\n  tensor: 2\n  pipeline: 2\nlauncher:\n  nproc_per_node: 6\n")
    msg = error_of([base, par])
    assert f"{par}:2: parallelism.tensor: world size 6" in msg
    assert "not divisible by parallelism.tensor 2 x parallelism.pipeline 2 = 4" in msg
    assert "fix:" in msg
    assert "world size 6 is not divisible" in error_of([base, par], world_size=6)
    assert load_config([base, par], world_size=8).parallelism.tensor == 2


def test_global_batch_not_divisible(base, write):
    bad = write("bad.yml", """\
        launcher: {nproc_per_node: 2}
        training: {micro_batch_size: 4, global_batch_size: 12}
    """)
    msg = error_of([base, bad])
    assert f"{bad}:2: training.global_batch_size: 12 is not divisible" in msg
    assert ("fix: set training.global_batch_size to a multiple of 8 "
            "(micro_batch_size 4 x data-parallel 2), e.g. 16") in msg


def test_gradient_accumulation_must_agree_with_global_batch(base):
    msg = error_of([base], ["training.micro_batch_size=4", "training.global_batch_size=16",
                            "training.gradient_accumulation_steps=2"])
    assert "--set: training.gradient_accumulation_steps: 2 disagrees" in msg
    assert "set training.gradient_accumulation_steps to 4" in msg


def test_zero2_with_pipeline_is_rejected_with_fix(base):
    msg = error_of([base], ["parallelism.zero_stage=2", "parallelism.pipeline=2"], world_size=2)
    assert "--set: parallelism.zero_stage: ZeRO stage 2 cannot be combined with parallelism.pipeline 2" in msg
    assert "fix: set parallelism.zero_stage to 1 (or 0)" in msg
    assert load_config([base], ["parallelism.zero_stage=1", "parallelism.pipeline=2"], world_size=2)


PATHS = ["data.embedded=null", "tokenizer.type=bytes", "data.paths=[a, b]"]


def test_data_sources_weights_and_tokenizers_that_load(base):
    cfg = load_config([base], PATHS + ["data.weights=[0.7, 0.3]"])
    assert (cfg.data.paths, cfg.data.weights) == (["a", "b"], [0.7, 0.3])
    cfg = load_config([base], ["data.embedded=null", "tokenizer.type=bytes", "data.train_paths=[a, b]",
                               "data.train_weights=[2, 1]", "data.valid_paths=[v]", "data.test_paths=[t]"])
    assert (cfg.data.train_paths, cfg.data.valid_paths, cfg.data.test_paths) == (["a", "b"], ["v"], ["t"])
    cfg = load_config([base], PATHS[:2] + ["data.paths=[a]", "tokenizer.type=tiktoken",
                                           "tokenizer.name=cl100k_base", "tokenizer.cache_dir=/tmp/tk"])
    assert (cfg.tokenizer.name, cfg.tokenizer.cache_dir) == ("cl100k_base", "/tmp/tk")


@pytest.mark.parametrize("overrides, world, expected", [
    (["model.num_kv_heads=3"], None, "model.num_kv_heads: 3 does not divide model.num_attention_heads=4"),
    (["parallelism.tensor=8"], 8, "parallelism.tensor: 8 does not divide model.num_attention_heads=4"),
    (["parallelism.pipeline=4"], 4, "parallelism.pipeline: 4 is larger than model.num_layers=2"),
    (["optimizer.min_lr=0.1"], None, "optimizer.min_lr: 0.1 is above the peak optimizer.lr=0.0006 (default)"),
    (["schedule.decay_steps=1", "schedule.warmup_steps=5"], None, "schedule.warmup_steps: 5 is longer than"),
    (["data.paths=[x]"], None, "data.paths: set together with data.embedded=shakespeare"),
    (["data.embedded=null"], None, "none of data.embedded, data.paths, data.train_paths is set"),
    (["data.embedded=null", "data.paths=[x]"], None, "tokenizer.type=embedded (default)"),
    (["tokenizer.type=hf"], None, "tokenizer.type: hf needs tokenizer.path"),
    (["tokenizer.type=gpt2bpe", "tokenizer.vocab_file=e.json"], None, "gpt2bpe needs tokenizer.merge_file"),
    (["data.split=0,1"], None, "data.split: '0,1' is not 1-3"),
    (["data.split=1,2,3,4"], None, "data.split: '1,2,3,4' is not 1-3"),
    (["model.rotary_pct=0.3"], None, "model.rotary_pct: rotary_pct 0.3 x head_dim 16"),
    (PATHS + ["data.weights=[1]"], None, "data.weights: has 1 weights for 2 prefixes in data.paths"),
    (PATHS + ["data.weights=[1, 0]"], None, "data.weights: [1.0, 0.0] has a weight that is not a positive number"),
    (["data.embedded=null", "tokenizer.type=bytes", "data.train_paths=[a]"], None,
     "data.valid_paths: is empty, but data.train_paths needs a validation set"),
    (["data.valid_paths=[v]"], None, "data.valid_paths: is a per-split list but data.train_paths is empty"),
    (PATHS + ["data.train_paths=[t]", "data.valid_paths=[v]"], None,
     "data.train_paths: set together with data.paths=[a, b]"),
    (["data.embedded=null", "tokenizer.type=bytes", "data.train_paths=[t]", "data.valid_paths=[v]",
      "data.valid_weights=[1, 2]"], None, "data.valid_weights: has 2 weights for 1 prefixes in data.valid_paths"),
    (["tokenizer.type=tiktoken"], None, "tokenizer.type: tiktoken needs tokenizer.name"),
    (["tokenizer.type=sentencepiece"], None, "tokenizer.type: sentencepiece needs tokenizer.path"),
    (["tokenizer.type=bytes", "tokenizer.name=cl100k_base"], None,
     "tokenizer.name: is set but tokenizer.type=bytes (--set) does not use it"),
    (["data.embedded=null", "data.train_paths=[t]", "data.valid_paths=[v]"], None,
     "data.train_paths: needs its own tokenizer: tokenizer.type=embedded (default)"),
])
def test_cross_field_checks(base, overrides, world, expected):
    msg = error_of([base], overrides, world_size=world)
    assert expected in msg and "fix:" in msg


def test_defaults_report_origin_default(base):
    # lr comes from --set, min_lr from the schema default: the default is named as such.
    msg = error_of([base], ["optimizer.lr=1e-5"])
    assert "--set: optimizer.lr: 1e-05 is below optimizer.min_lr=6.0e-05 (default)" in msg


def test_valid_splits_and_rotary(base):
    load_config([base], ["data.split=1", "data.split=98, 1.5, 0.5", "model.rotary_pct=0.25"])


# --------------------------------------------------------------------------- derived values


@pytest.mark.parametrize("overrides, world, dp, micro, ga", [
    (["training.micro_batch_size=4", "training.global_batch_size=16"], 1, 1, 4, 4),
    (["training.micro_batch_size=2", "training.global_batch_size=12", "parallelism.tensor=2",
      "parallelism.pipeline=2"], 8, 2, 2, 3),
    (["training.micro_batch_size=3", "training.gradient_accumulation_steps=5"], 4, 4, 3, 5),
    (["training.micro_batch_size=3"], 2, 2, 3, 1),
])
def test_deepspeed_batch_sizes(base, overrides, world, dp, micro, ga):
    cfg = load_config([base], overrides, world_size=world)
    ds = deepspeed_config(cfg, world_size=world)
    assert ds["train_batch_size"] == micro * ga * dp
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["gradient_accumulation_steps"] == ga
    layout = batch_layout(cfg, world_size=world)
    assert (layout.data_parallel, layout.global_batch_size) == (dp, micro * ga * dp)


def test_deepspeed_world_size_from_launcher(base):
    cfg = load_config([base], ["launcher.nproc_per_node=2", "launcher.num_nodes=2", "training.micro_batch_size=2"])
    assert deepspeed_config(cfg)["train_batch_size"] == 8


def test_deepspeed_blocks(base):
    cfg = load_config([base], ["training.precision=fp16", "parallelism.zero_stage=2", "optimizer.lr=0.001",
                               "optimizer.beta2=0.99", "training.gradient_clipping=0.5"], world_size=2)
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 0.001, "betas": [0.9, 0.99], "eps": 1e-8,
                                                           "weight_decay": 0.1, "torch_adam": True, "fused": True}}
    assert ds["gradient_clipping"] == 0.5 and "scheduler" not in ds
    json.dumps(ds)  # JSON-ready


@pytest.mark.parametrize("stage, world, tensor, pipeline, precision, engine_stage, deepspeed_clips", [
    (1, 1, 1, 1, "fp32", 0, False),  # one data rank: nothing to shard; the trainer clips (keeps the norm)
    (2, 2, 2, 1, "fp32", 0, False),  # tp 2 x dp 1
    (1, 1, 1, 1, "bf16", 0, True),   # DeepSpeed's bf16 optimizer clips and keeps the norm
    (3, 1, 1, 1, "fp32", 3, True),   # ZeRO-3 is kept as asked
    (1, 2, 1, 1, "fp32", 1, True),   # two data ranks: ZeRO-1 shards
    (0, 2, 1, 1, "fp32", 0, False),
    (1, 2, 1, 2, "fp32", 1, True),   # pipeline stages keep ZeRO-1 (its optimizer reports the norm)
])
def test_engine_zero_stage_and_who_clips(base, stage, world, tensor, pipeline, precision, engine_stage,
                                         deepspeed_clips):
    cfg = load_config([base], [f"parallelism.zero_stage={stage}", f"parallelism.tensor={tensor}",
                               f"parallelism.pipeline={pipeline}", f"training.precision={precision}",
                               "training.gradient_clipping=0.5"], world_size=world)
    ds = deepspeed_config(cfg, world_size=world)
    assert ds["zero_optimization"]["stage"] == engine_stage
    assert ds["gradient_clipping"] == (0.5 if deepspeed_clips else 0.0)


def test_batch_layout_rejects_a_world_size_that_does_not_fit(base):
    cfg = load_config([base], ["parallelism.tensor=2"], world_size=2)
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        batch_layout(cfg, world_size=3)


def test_padded_vocab_size(base):
    assert padded_vocab_size(50257, load_config([base])) == 50304
    assert padded_vocab_size(50257, load_config([base], ["parallelism.tensor=2"], world_size=2)) == 50432
    assert padded_vocab_size(256, load_config([base])) == 256


# --------------------------------------------------------------------------- CLI


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="megatron-gpt")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.mark.parametrize("doc", [False, True])
def test_config_show_round_trips(base, write, capsys, doc):
    over = write("over.yml", """\
        model: {norm: rmsnorm, activation: swiglu, rotary_pct: 0.25, num_kv_heads: 2}
        training: {generate_prompt: "ROMEO:\\n", precision: bf16, micro_batch_size: 2, global_batch_size: 8}
        optimizer: {lr: 3.0e-4, min_lr: 1.0e-5}
        launcher: {nproc_per_node: 2}
    """)
    overrides = ["data.split=90,10", "checkpoint.save_dir=out/ckpt"]
    assert cli("config", "show", base, over, *(f"--set={o}" for o in overrides), *(["--doc"] if doc else [])) == 0
    shown = write("shown.yml", capsys.readouterr().out)
    expected = load_config([base, over], overrides)
    assert load_config([shown]) == expected
    assert config_to_dict(load_config([shown])) == config_to_dict(expected)
    if doc:
        assert "# Number of transformer blocks." in Path(shown).read_text()


def test_config_show_sections_in_schema_order(base, capsys):
    assert cli("config", "show", base) == 0
    out = capsys.readouterr().out
    tops = [line.split(":")[0] for line in out.splitlines() if line and line[0].isalpha()]
    assert tops == list(Config.model_fields)


def test_config_show_error_exit_code(base, capsys):
    assert cli("config", "show", base, "--set", "model.hiden_size=3") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set: unknown key 'model.hiden_size'")


def test_config_deepspeed_prints_json(base, capsys):
    assert cli("config", "deepspeed", base, "--set", "training.micro_batch_size=2", "--world-size", "4") == 0
    assert json.loads(capsys.readouterr().out)["train_batch_size"] == 8


def test_config_package_does_not_import_torch():
    code = ("import sys, megatron_gpt.config, megatron_gpt.cli.config; "
            "bad = [m for m in ('torch', 'deepspeed', 'megatron') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"


def test_config_show_never_echoes_a_secret_override(capsys, tmp_path):
    from megatron_gpt.cli import main

    base = tmp_path / "base.yml"
    base.write_text("data: {embedded: shakespeare}\n")
    assert main(["config", "show", str(base), "--set", "launcher.env.WANDB_API_KEY=hunter2",
                 "--set", "launcher.env.NCCL_DEBUG=INFO"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "WANDB_API_KEY" in out and "NCCL_DEBUG=INFO" in out
