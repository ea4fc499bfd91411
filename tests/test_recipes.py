"""The recipes in configs/ (GPT-2, Pythia, GPT-NeoX-20B, Llama 2/3): every one is checked.

A recipe is any .yml under configs/ except quickstart.yml (a self-contained run), finetune/ (laid
over an import-hf config) and examples/ (the user's own files). Each one's header states the
cluster it is laid out for, in lines these tests read back and compare with the config:

    # Laid out for: 64 GPUs x 80GB (...)
    #   tensor 8 x pipeline 4 x data 2, ZeRO-1, ...
    #   ..., global batch 1024 (accumulation 512 at data 2), bf16.
    # Tokenizer vocabulary: 32000 (...),
    #   padded to 32000 embedding rows as published (...)

- parses with a user's data and cluster files at that world size, and alone fails naming the keys
  the user fills in; a cluster of another size keeps the global batch;
- `megatron-gpt layout` counts exactly the parameters of the published model, built by
  transformers from its HF config.json values on the meta device (nothing allocated);
- `megatron-gpt layout --gpu-memory` says the recipe fits the GPU memory it documents;
- one recipe of each family trains 2 steps at a reduced size through --set (CPU, fp32), with the
  recipe's own tokenizer type, several runs under one torchrun, and Llama 3 through the CLI.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_gpt.config import ConfigError, batch_layout, load_config
from test_checkpoints import run_jobs

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED_GPT2 = REPO.parent / "shared" / "tokenizers" / "gpt2"
NOT_RECIPES = ("quickstart.yml", "finetune/", "examples/")
RECIPES = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yml")
                 if not str(p.relative_to(CONFIGS)).startswith(NOT_RECIPES))
# The keys a recipe leaves to the user's data file, by the recipe's tokenizer.type.
TOKENIZER_FILES = {"hf": {"path": "/shared/tokenizers/tokenizer.json"},
                   "sentencepiece": {"path": "/shared/tokenizers/tokenizer.model"},
                   "gpt2bpe": {"vocab_file": "/shared/tokenizers/encoder.json", "merge_file": "/shared/tokenizers/vocab.bpe"},
                   "tiktoken": {"name": "cl100k_base"}}

# The published models' HF config.json values (hidden, layers, heads, kv heads, intermediate size,
# vocabulary rows, positions, norm eps, rotary, tying): the reference each recipe must count to.
GPT2 = dict(vocab_size=50257, n_positions=1024, layer_norm_epsilon=1e-5, tie_word_embeddings=True)
NEOX = dict(rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=2048, layer_norm_eps=1e-5,
            use_parallel_residual=True, tie_word_embeddings=False)
LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
              attention_bias=False, mlp_bias=False, tie_word_embeddings=False)
PUBLISHED = {
    "gpt2/124m.yml": ("GPT2Config", dict(GPT2, n_embd=768, n_layer=12, n_head=12)),
    "gpt2/350m.yml": ("GPT2Config", dict(GPT2, n_embd=1024, n_layer=24, n_head=16)),
    "gpt2/774m.yml": ("GPT2Config", dict(GPT2, n_embd=1280, n_layer=36, n_head=20)),
    "gpt2/1.5b.yml": ("GPT2Config", dict(GPT2, n_embd=1600, n_layer=48, n_head=25)),
    "pythia/70m.yml": ("GPTNeoXConfig", dict(NEOX, vocab_size=50304, hidden_size=512, num_hidden_layers=6,
                                              num_attention_heads=8, intermediate_size=2048)),
    "pythia/160m.yml": ("GPTNeoXConfig", dict(NEOX, vocab_size=50304, hidden_size=768, num_hidden_layers=12,
                                               num_attention_heads=12, intermediate_size=3072)),
    "pythia/410m.yml": ("GPTNeoXConfig", dict(NEOX, vocab_size=50304, hidden_size=1024, num_hidden_layers=24,
                                               num_attention_heads=16, intermediate_size=4096)),
    "pythia/1b.yml": ("GPTNeoXConfig", dict(NEOX, vocab_size=50304, hidden_size=2048, num_hidden_layers=16,
                                             num_attention_heads=8, intermediate_size=8192)),
    "pythia/1.4b.yml": ("GPTNeoXConfig", dict(NEOX, vocab_size=50304, hidden_size=2048, num_hidden_layers=24,
                                               num_attention_heads=16, intermediate_size=8192)),
    "pythia/2.8b.yml": ("GPTNeoXConfig", dict(NEOX, vocab_size=50304, hidden_size=2560, num_hidden_layers=32,
                                               num_attention_heads=32, intermediate_size=10240)),
    "pythia/6.9b.yml": ("GPTNeoXConfig", dict(NEOX, vocab_size=50432, hidden_size=4096, num_hidden_layers=32,
                                               num_attention_heads=32, intermediate_size=16384)),
    "pythia/12b.yml": ("GPTNeoXConfig", dict(NEOX, vocab_size=50688, hidden_size=5120, num_hidden_layers=36,
                                              num_attention_heads=40, intermediate_size=20480)),
    "neox-20b.yml": ("GPTNeoXConfig", dict(NEOX, vocab_size=50432, hidden_size=6144, num_hidden_layers=44,
                                            num_attention_heads=64, intermediate_size=24576)),
    "llama/llama2-7b.yml": ("LlamaConfig", dict(LLAMA2, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                                 num_key_value_heads=32, intermediate_size=11008)),
    "llama/llama2-13b.yml": ("LlamaConfig", dict(LLAMA2, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                                                  num_key_value_heads=40, intermediate_size=13824)),
    "llama/llama2-70b.yml": ("LlamaConfig", dict(LLAMA2, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                                                  num_key_value_heads=8, intermediate_size=28672)),
    "llama/llama3-8b.yml": ("LlamaConfig", dict(LLAMA2, vocab_size=128256, max_position_embeddings=8192,
                                                 rope_theta=500000.0, hidden_size=4096, num_hidden_layers=32,
                                                 num_attention_heads=32, num_key_value_heads=8,
                                                 intermediate_size=14336)),
}


def header(recipe: str) -> dict[str, int]:
    """The numbers a recipe's comments document (the test fails if a line is missing)."""
    text = (CONFIGS / recipe).read_text()
    patterns = {"published": r"^# .*: ([\d,]+) parameters", "gpus": r"^# Laid out for: (\d+) GPUs x \d+GB",
                "memory_gb": r"^# Laid out for: \d+ GPUs x (\d+)GB", "tensor": r"^#\s+tensor (\d+) x",
                "pipeline": r"x pipeline (\d+) x", "data": r"x pipeline \d+ x data (\d+),", "zero": r"ZeRO-(\d)",
                "accumulation": r"\(accumulation (\d+) at data", "vocab": r"^# Tokenizer vocabulary: (\d+)",
                "rows": r"padded to (\d+) embedding rows"}
    found = {}
    for key, pattern in patterns.items():
        match = re.search(pattern, text, re.MULTILINE)
        assert match, f"configs/{recipe}: its header lacks the line matching {pattern!r} (see this test's docstring)"
        found[key] = int(match.group(1).replace(",", ""))
    return found


def user_files(tmp: Path, recipe: str, **cluster: object) -> list[str]:
    """A user's data file (corpus, the tokenizer's files, checkpoint folder) and cluster file."""
    raw = yaml.safe_load((CONFIGS / recipe).read_text())
    data = {"data": {"paths": ["/shared/data/corpus"]}, "tokenizer": TOKENIZER_FILES[raw["tokenizer"]["type"]],
            "checkpoint": {"save_dir": "/shared/checkpoints/run"}}
    launcher = {"type": "pdsh", "hostfile": "/shared/hostfile"} if raw["launcher"]["num_nodes"] > 1 else {}
    (tmp / "data.yml").write_text(yaml.safe_dump(data))
    (tmp / "cluster.yml").write_text(yaml.safe_dump({"launcher": {**launcher, **cluster}}))
    return [str(CONFIGS / recipe), str(tmp / "data.yml"), str(tmp / "cluster.yml")]


def layout(capsys, *args: str) -> list[str]:
    """`megatron-gpt layout ...` through the CLI's own entry (in this process, for speed)."""
    from megatron_gpt.cli import main

    capsys.readouterr()
    code = main(["layout", *args])
    out, err = capsys.readouterr()
    assert code == 0, f"megatron-gpt layout {' '.join(args)} failed:\n{err[-3000:]}"
    return out.strip().splitlines()


def test_the_recipes_are_all_there():
    expected = {*PUBLISHED}
    assert expected <= set(RECIPES), f"missing recipes: {sorted(expected - set(RECIPES))}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_parses_with_user_files_at_its_world_size(recipe, tmp_path):
    doc = header(recipe)
    cfg = load_config(user_files(tmp_path, recipe))
    batch = batch_layout(cfg)
    assert cfg.world_size == doc["gpus"], f"{recipe}: launcher says {cfg.world_size} ranks, the header {doc['gpus']}"
    assert (cfg.parallelism.tensor, cfg.parallelism.pipeline, batch.data_parallel, cfg.parallelism.zero_stage,
            batch.gradient_accumulation_steps) == (doc["tensor"], doc["pipeline"], doc["data"], doc["zero"],
                                                   doc["accumulation"]), f"{recipe}: header and config disagree"
    multiple = cfg.model.make_vocab_size_divisible_by * cfg.parallelism.tensor
    assert -(-doc["vocab"] // multiple) * multiple == doc["rows"], f"{recipe}: the padding gives other rows"
    raw = yaml.safe_load((CONFIGS / recipe).read_text())
    # The global batch is the recipe's; accumulation must follow the user's world size.
    assert "global_batch_size" in raw["training"] and "gradient_accumulation_steps" not in raw["training"]
    # A cluster with twice the ranks keeps the global batch with half the accumulation.
    bigger = load_config(user_files(tmp_path, recipe, num_nodes=2 * cfg.launcher.num_nodes))
    assert batch_layout(bigger).global_batch_size == batch.global_batch_size
    assert batch_layout(bigger).gradient_accumulation_steps * 2 == batch.gradient_accumulation_steps
    # Alone, the recipe names what the user must fill in.
    with pytest.raises(ConfigError) as alone:
        load_config([str(CONFIGS / recipe)])
    for key in ["data.paths", *[f"tokenizer.{k}" for k in TOKENIZER_FILES[raw["tokenizer"]["type"]]]]:
        assert key in str(alone.value), f"{recipe} alone: the error does not name {key}:\n{alone.value}"


def test_example_files_compose_as_the_readme_shows():
    """`megatron-gpt train configs/pythia/1b.yml my-data.yml my-cluster.yml`: later files win."""
    examples = CONFIGS / "examples"
    cfg = load_config([str(CONFIGS / "pythia/1b.yml"), str(examples / "my-data.yml"), str(examples / "my-cluster.yml")])
    batch = batch_layout(cfg)
    assert (cfg.world_size, batch.data_parallel, batch.global_batch_size, batch.gradient_accumulation_steps) == \
        (64, 64, 1024, 2)
    assert cfg.launcher.type == "pdsh" and cfg.tokenizer.type == "hf" and cfg.tokenizer.path.endswith(".json")
    assert cfg.checkpoint.save_dir == "/shared/checkpoints/pythia-1b" and cfg.model.hidden_size == 2048


@pytest.mark.parametrize("recipe", RECIPES)
def test_layout_counts_the_published_parameters(recipe, tmp_path, capsys):
    import torch
    import transformers

    assert recipe in PUBLISHED, f"configs/{recipe}: add its published HF config.json shape to PUBLISHED"
    cls, values = PUBLISHED[recipe]
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**values))
    published = sum(p.numel() for p in model.parameters())  # tied weights once
    doc = header(recipe)
    lines = layout(capsys, *user_files(tmp_path, recipe), "--vocab-size", str(doc["vocab"]))
    ours = int(lines[[i for i, line in enumerate(lines) if line.startswith("unique parameters")][0]]
               .split(":")[1].replace(",", ""))
    print(f"{recipe}: layout {ours:,} parameters, {cls} {published:,}")
    assert any(line.startswith("world ") and f"vocab {doc['rows']} (padded)" in line for line in lines)
    assert ours == published == doc["published"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_layout_says_the_recipe_fits_its_gpus(recipe, tmp_path, capsys):
    doc = header(recipe)
    lines = layout(capsys, *user_files(tmp_path, recipe), "--vocab-size", str(doc["vocab"]),
                   "--gpu-memory", f"{doc['memory_gb']}GB")
    print(f"{recipe} on {doc['gpus']} x {doc['memory_gb']}GB: {lines[-1]}")
    assert lines[-1].startswith("fits"), f"{recipe}: {lines[-1]}"


# --------------------------------------------------------------------------- 2 steps per family

REDUCED = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.seq_length=64",
           "parallelism.tensor=1", "parallelism.pipeline=1", "parallelism.sequence_parallel=false",
           "training.precision=fp32", "training.device=cpu", "training.train_steps=2",
           "training.micro_batch_size=2", "training.global_batch_size=4", "training.eval_iters=1",
           "training.generate_samples=0", "launcher.nproc_per_node=1", "launcher.num_nodes=1",
           "launcher.threads_per_rank=1", "checkpoint.save_dir=null", "logging.log_interval=1",
           "logging.plot=false", "data.embedded=shakespeare", "data.split=90,10,0"]
LLAMA_REDUCED = ["model.ffn_hidden_size=160"]
GQA_REDUCED = ["model.num_kv_heads=2"]


def llama3_style_tokenizer(texts: list[str], vocab_size: int, path: Path) -> None:
    """A byte-level BPE tokenizer.json with Llama 3's special tokens: <|begin_of_text|> (id 0),
    <|end_of_text|> (id 1), and no <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))


def _tokenizers(tmp: Path) -> dict[str, dict]:
    """Small tokenizers of each recipe's type, trained offline on a slice of the bundled corpus."""
    import lzma

    import sentencepiece as spm

    from megatron_gpt.data.embedded import embedded_corpus_path
    from megatron_gpt.data.tokenizer import EMBEDDED_TOKENIZER_PATH

    docs = [json.loads(line)["text"] for line in lzma.open(embedded_corpus_path("shakespeare"), "rt", encoding="utf-8")]
    lines = [line for d in docs[:4] for line in d[:40_000].splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp / "llama2"), vocab_size=600,
                                   model_type="bpe", byte_fallback=True, minloglevel=2, num_threads=1)
    llama3_style_tokenizer(lines, 700, tmp / "llama3.json")
    gpt2 = ({"type": "gpt2bpe", "vocab_file": str(SHARED_GPT2 / "encoder.json"),
             "merge_file": str(SHARED_GPT2 / "vocab.bpe")} if SHARED_GPT2.is_dir() else {"type": "embedded"})
    return {"gpt2bpe": gpt2, "hf": {"type": "hf", "path": str(EMBEDDED_TOKENIZER_PATH)},
            "sentencepiece": {"type": "sentencepiece", "path": str(tmp / "llama2.model")},
            "llama3": {"type": "hf", "path": str(tmp / "llama3.json")}}


def _reduced(recipe: str) -> list[str]:
    raw = yaml.safe_load((CONFIGS / recipe).read_text())["model"]
    return [*REDUCED, *(LLAMA_REDUCED if raw.get("ffn_hidden_size") else []),
            *(GQA_REDUCED if raw.get("num_kv_heads") else [])]


def _kept_family_options(recipe: str, run_dir: Path) -> None:
    """Every model key the reduction did not touch reached the run as the recipe wrote it."""
    ours = yaml.safe_load((CONFIGS / recipe).read_text())["model"]
    ran = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    touched = {o.split("=")[0].split(".", 1)[1] for o in _reduced(recipe) if o.startswith("model.")}
    for key, value in ours.items():
        if key not in touched:
            assert ran[key] == value, f"{recipe}: model.{key} ran as {ran[key]!r}, the recipe says {value!r}"


def _check_two_steps(recipe: str, run_dir: Path, vocab: int) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r["loss"] for r in records if "loss" in r}
    print(f"{recipe} (reduced): losses {steps}, vocab {vocab}")
    assert sorted(steps) == [1, 2] and all(math.isfinite(v) for v in steps.values())
    assert abs(steps[1] - math.log(vocab)) < 1.0  # a fresh model: about uniform over the vocabulary
    _kept_family_options(recipe, run_dir)
    return steps


def test_each_family_trains_two_steps_at_a_reduced_size(tmp_path, data_cache):
    """gpt2/124m, pythia/1b, neox-20b, llama2-70b (GQA) under one torchrun (tensor 1); llama3-8b
    through the CLI with a data file, as a user runs it, at its own tensor 2 + sequence parallel."""
    from megatron_gpt.data.tokenizer import build_tokenizer
    from megatron_gpt.config.schema import TokenizerConfig

    tokenizers = _tokenizers(tmp_path)
    families = {"gpt2/124m.yml": "gpt2bpe", "pythia/1b.yml": "hf", "neox-20b.yml": "hf",
                "llama/llama2-70b.yml": "sentencepiece"}
    jobs = []
    for recipe, kind in families.items():
        name = recipe.replace("/", "-").removesuffix(".yml")
        tok = [f"tokenizer.{k}={v}" for k, v in tokenizers[kind].items()]
        jobs.append({"name": name, "configs": [str(CONFIGS / recipe)],
                     "overrides": [*_reduced(recipe), *tok, f"data.cache_dir={data_cache}",
                                   f"logging.run_dir={tmp_path / name}"]})
    run_jobs(jobs, tmp_path, nproc=1)
    for recipe, kind in families.items():
        vocab = build_tokenizer(TokenizerConfig(**tokenizers[kind])).vocab_size
        _check_two_steps(recipe, tmp_path / recipe.replace("/", "-").removesuffix(".yml"), vocab)

    # Llama 3 through `megatron-gpt train RECIPE my-data.yml --set ...` (its tokenizer.json ends
    # documents with <|end_of_text|>), in the recipe's own layout: tensor 2 with sequence parallelism.
    recipe = "llama/llama3-8b.yml"
    own_layout = ["parallelism.tensor=2", "parallelism.sequence_parallel=true", "launcher.nproc_per_node=2"]
    (tmp_path / "my-data.yml").write_text(yaml.safe_dump({
        "data": {"embedded": "shakespeare", "split": "90,10,0", "cache_dir": str(data_cache)},
        "tokenizer": {"path": tokenizers["llama3"]["path"]}, "logging": {"run_dir": str(tmp_path / "llama3")}}))
    command = [sys.executable, "-m", "megatron_gpt", "train", str(CONFIGS / recipe), str(tmp_path / "my-data.yml"),
               *[a for o in [*_reduced(recipe), *own_layout] for a in ("--set", o)]]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert "world 2 (tp 2 x pp 1 x dp 1)" in done.stdout + done.stderr, "the run did not keep tensor 2"
    llama3 = build_tokenizer(TokenizerConfig(**tokenizers["llama3"]))
    assert llama3.eod == llama3._tok.token_to_id("<|end_of_text|>")
    _check_two_steps(recipe, tmp_path / "llama3", llama3.vocab_size)
