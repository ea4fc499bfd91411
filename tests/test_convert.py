"""Hugging Face export and import, checked numerically against `transformers` (fp32, CPU, offline).

- Export: the NeoX-style model (parallel residual, partial rotary, tied embeddings) and the
  Llama-style model (grouped-query attention, untied output) trained a few steps under
  (tp=2, pp=2) and under (tp=2, ZeRO-3, dp=2), exported, loaded by AutoModelForCausalLM: logits on
  the same tokens within 1e-4 of ours, 20 greedy tokens identical, AutoTokenizer's ids equal ours.
- Import: small randomly initialized HF GPTNeoX and Llama (GQA) models imported for (tp=2, pp=2):
  our forward equals HF's logits within 1e-4; exporting the import gives the original tensors bit
  for bit; `megatron-gpt train` on the written config starts from them at tp=2 x pp=2 (its first
  loss equals HF's loss on the same batch), and its checkpoint exports bit for bit too (the step
  runs at a learning rate far below fp32 resolution, so the weights stay the imported ones).

All training runs share one torchrun job (tests/test_checkpoints.py's harness).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_checkpoints import TINY, common_overrides, losses, run_jobs

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
TOKENIZER_JSON = REPO / "megatron_gpt" / "data" / "assets" / "shakespeare-bpe.json"
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"
FAMILIES = {
    "neox": ["model.parallel_residual=true", "model.rotary_pct=0.5", "model.tie_embeddings=true"],
    "llama": ["model.norm=rmsnorm", "model.activation=swiglu", "model.bias=false", "model.num_attention_heads=8",
              "model.num_kv_heads=4", "model.tie_embeddings=false"],
}
LAYOUTS = {"tp2-pp2": ["parallelism.tensor=2", "parallelism.pipeline=2"],
           "tp2-z3": ["parallelism.tensor=2", "parallelism.zero_stage=3"]}
EXPORTS = [(family, layout) for family in FAMILIES for layout in LAYOUTS]


def random_hf_model(family: str):
    """A small HF model built from a config (nothing downloaded), every tensor random so a
    misplaced bias or norm weight cannot hide behind zeros and ones."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed({"neox": 1, "llama": 2}[family])
    if family == "neox":
        config = GPTNeoXConfig(vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=256, rotary_pct=0.25, max_position_embeddings=64,
                               use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
        model = GPTNeoXForCausalLM(config)
    else:
        config = LlamaConfig(vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                             num_key_value_heads=4, intermediate_size=192, max_position_embeddings=64,
                             rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
        model = LlamaForCausalLM(config)
    return randomize(model, norm_marker="norm").eval()


def randomize(model, norm_marker: str):
    """Every tensor random: norm weights (names holding `norm_marker`) near 1, the rest N(0, 0.05)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if norm_marker in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def work(tmp_path_factory, data_cache):
    """Random HF models imported for tp=2 x pp=2, then one torchrun job: the export trainings and
    one training step from each import."""
    tmp = tmp_path_factory.mktemp("convert")
    jobs = []
    for family, layout in EXPORTS:
        name = f"{family}-{layout}"
        jobs.append({"name": name, "configs": [str(TINY)], "overrides": common_overrides(
            tmp, data_cache, name, *FAMILIES[family], *LAYOUTS[layout],
            "training.micro_batch_size=4", "training.train_steps=3", f"checkpoint.save_dir={tmp / ('ckpt-' + name)}")})
    for family in FAMILIES:
        hf_dir = tmp / f"hf-{family}"
        random_hf_model(family).save_pretrained(hf_dir)
        shutil.copyfile(TOKENIZER_JSON, hf_dir / "tokenizer.json")
        imported = tmp / f"imported-{family}"
        # One through the CLI, one through the GPT-NeoX-style tool.
        entry = ["-m", "megatron_gpt", "import-hf"] if family == "llama" else [str(REPO / "tools" / "convert_from_hf.py")]
        done = subprocess.run([sys.executable, *entry, str(hf_dir), str(imported), "--tensor", "2", "--pipeline", "2"],
                              capture_output=True, text=True, cwd=tmp, env=ENV)
        assert done.returncode == 0, done.stdout + done.stderr
        name = f"import-{family}"
        jobs.append({"name": name, "configs": [str(TINY), str(imported / "config.yml")],
                     "dump_batches": str(tmp / f"batches-{family}.pt"),
                     "overrides": common_overrides(tmp, data_cache, name, "training.micro_batch_size=4",
                                                   "training.train_steps=1", "optimizer.lr=1e-30",
                                                   "optimizer.min_lr=0", "optimizer.weight_decay=0",
                                                   f"checkpoint.save_dir={tmp / ('ckpt-' + name)}")})
    output = run_jobs(jobs, tmp)
    return tmp, output


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def greedy_hf(model, prompt: list[int], steps: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def greedy_ours(loaded, prompt: list[int], steps: int) -> list[int]:
    from megatron_gpt.model.sampling import SamplingOptions, generate

    return generate(loaded.model, prompt, SamplingOptions(max_new_tokens=steps, temperature=0.0),
                    loaded.tokenizer.vocab_size, loaded.context_length)


@pytest.mark.parametrize("family,layout", EXPORTS, ids=[f"{f}-{l}" for f, l in EXPORTS])
def test_export_matches_transformers(work, family, layout, single_process_group):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_gpt.convert.hf import export_hf
    from megatron_gpt.checkpoint.reader import load_checkpoint

    tmp, _ = work
    save_dir = tmp / f"ckpt-{family}-{layout}"
    out = export_hf(save_dir, tmp / f"hf-export-{family}-{layout}")
    ours = load_checkpoint(save_dir)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == {"neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM"}[family]
    assert hf.config.vocab_size == ours.tokenizer.vocab_size == 2048
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = ours.tokenizer.encode(TEXT)
    assert tokenizer(TEXT)["input_ids"] == ids
    assert tokenizer.eos_token_id == ours.tokenizer.eod
    assert tokenizer.decode(ids) == TEXT

    tokens = torch.tensor([ids])
    with torch.no_grad():
        our_logits = ours.model(tokens)[..., : ours.tokenizer.vocab_size]
    error = (our_logits - hf_logits(hf, tokens)).abs().max().item()
    print(f"{family} {layout}: max |logits(ours) - logits(transformers)| = {error:.2e}")
    assert error <= 1e-4
    prompt = ids[:12]
    ours_greedy, hf_greedy = greedy_ours(ours, prompt, 20), greedy_hf(hf, prompt, 20)
    assert len(ours_greedy) == 20 and ours_greedy == hf_greedy


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_roundtrip_and_training_from_it(work, family, single_process_group):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_gpt.config import padded_vocab_size
    from megatron_gpt.convert.hf import export_hf, read_checkpoint
    from megatron_gpt.checkpoint.reader import load_checkpoint
    from megatron_gpt.model import GPT, parallel_config, masked_mean

    tmp, output = work
    hf_dir, imported = tmp / f"hf-{family}", tmp / f"imported-{family}"
    original = load_file(hf_dir / "model.safetensors")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()

    # The import is a layout-independent checkpoint plus a config for tp=2 x pp=2.
    written = (imported / "config.yml").read_text()
    assert "tensor: 2" in written and "pipeline: 2" in written and f"init_from: {imported}" in written
    source = read_checkpoint(imported)
    model = GPT(source.cfg.model, padded_vocab_size(source.tokenizer.vocab_size, source.cfg), parallel_config())
    names = model.canonical_names()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(source.state[names[name]])
    tokens = torch.tensor([source.tokenizer.encode(TEXT)])
    with torch.no_grad():
        error = (model(tokens)[..., :2048] - hf_logits(hf, tokens)).abs().max().item()
    print(f"import {family}: max |logits(ours) - logits(transformers)| = {error:.2e}")
    assert error <= 1e-4

    def assert_bit_equal(folder: Path) -> None:
        again = load_file(folder / "model.safetensors")
        assert sorted(again) == sorted(original)
        assert all(again[k].dtype == original[k].dtype and torch.equal(again[k], original[k]) for k in original)

    assert_bit_equal(export_hf(imported, tmp / f"reexport-{family}"))

    # `megatron-gpt train` from the written config ran at tp=2 x pp=2 starting from these weights:
    # its first loss (the pipeline's forward over the first batch) is HF's on the same batch.
    assert "initializing weights from" in output
    batches = torch.load(tmp / f"batches-{family}.pt", weights_only=True)
    with torch.no_grad():
        hf_loss = sum(masked_mean(torch.nn.functional.cross_entropy(
            hf_logits(hf, b["tokens"]).flatten(0, 1), b["labels"].flatten(), reduction="none").view_as(b["labels"]),
            b["loss_mask"]) for b in batches) / len(batches)
    first = losses(tmp / f"import-{family}")[1]
    print(f"import {family}: tp2 x pp2 first loss {first:.6f}, transformers {hf_loss.item():.6f}")
    assert abs(first - hf_loss.item()) <= 1e-4

    # Its checkpoint, saved by 4 ranks (tp=2 x pp=2), merges and exports back to the same tensors.
    trained = tmp / f"ckpt-import-{family}"
    assert json.loads((trained / "global_step1" / "metadata.json").read_text())["layout"]["pipeline"] == 2
    ours = load_checkpoint(trained)
    with torch.no_grad():
        assert (ours.model(tokens)[..., :2048] - hf_logits(hf, tokens)).abs().max().item() <= 1e-4
    assert_bit_equal(export_hf(trained, tmp / f"reexport-trained-{family}"))


def test_export_options_dtype_shards_and_unsupported(work, single_process_group):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_gpt.config.schema import ModelConfig
    from megatron_gpt.convert import UnsupportedOption, llama, neox
    from megatron_gpt.convert.hf import export_hf

    tmp, _ = work
    save_dir = tmp / "ckpt-llama-tp2-pp2"
    out = export_hf(save_dir, tmp / "hf-bf16-sharded", dtype="bf16", max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16 and json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0

    # The GPT-NeoX-style tool, with its flag names, writes the same weights as the package.
    tool = subprocess.run([sys.executable, str(REPO / "tools" / "convert_to_hf.py"), "--input_dir", str(save_dir),
                           "--output_dir", str(tmp / "hf-tool"), "--architecture", "llama", "--precision", "bf16",
                           "--no-tokenizer"], capture_output=True, text=True, cwd=REPO, env=ENV)
    assert tool.returncode == 0, tool.stdout + tool.stderr
    shards = {}
    for file in sorted(set(index["weight_map"].values())):
        shards.update(load_file(out / file))
    assert all(torch.equal(t, shards[k]) for k, t in load_file(tmp / "hf-tool" / "model.safetensors").items())
    assert not (tmp / "hf-tool" / "tokenizer.json").exists()

    # Options the target class cannot express are errors naming the option, never a silent export.
    with pytest.raises(UnsupportedOption, match="GPTNeoXForCausalLM cannot express .*num_kv_heads"):
        export_hf(save_dir, tmp / "wrong-arch", arch="neox")
    for adapter, options, match in [
        (neox, dict(position_embedding="learned"), "position_embedding=learned"),
        (neox, dict(bias=False), "model.bias=false"),
        (llama, dict(norm="rmsnorm", activation="swiglu", rotary_pct=0.5), "rotary_pct=0.5"),
        (llama, dict(norm="rmsnorm", activation="swiglu", parallel_residual=True), "parallel_residual"),
        (llama, dict(activation="gelu"), "model.norm=layernorm.*model.activation=gelu"),
    ]:
        with pytest.raises(UnsupportedOption, match=match):
            adapter.check(ModelConfig(**options))
    cli = subprocess.run([sys.executable, "-m", "megatron_gpt", "export-hf", str(save_dir), str(tmp / "cli-wrong"),
                          "--arch", "neox"], capture_output=True, text=True, cwd=REPO, env=ENV)
    assert cli.returncode == 2 and "cannot express" in cli.stderr and "Traceback" not in cli.stderr


SHARED_GPT2 = REPO.parent / "shared" / "tokenizers" / "gpt2"


@pytest.mark.skipif(not SHARED_GPT2.is_dir(), reason="the real GPT-2 files (../shared/tokenizers/gpt2) are absent")
def test_gpt2bpe_tokenizer_files(tmp_path):
    from transformers import AutoTokenizer

    from megatron_gpt.config.schema import Config
    from megatron_gpt.convert.hf import write_tokenizer
    from megatron_gpt.data.tokenizer import build_tokenizer

    cfg = Config.model_validate({"tokenizer": {"type": "gpt2bpe", "vocab_file": str(SHARED_GPT2 / "encoder.json"),
                                               "merge_file": str(SHARED_GPT2 / "vocab.bpe")}})
    ours = build_tokenizer(cfg.tokenizer)
    assert "tokenizer.json" in write_tokenizer(ours, cfg, tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert theirs(TEXT)["input_ids"] == ours.encode(TEXT) and theirs.eos_token_id == ours.eod == 50256


def test_hf_tokenizer_files_keep_the_tokenizers_own_end_of_document(tmp_path):
    """A Llama 3 tokenizer.json (no <|endoftext|>) is exported with its <|end_of_text|> as bos/eos,
    not a new token."""
    from transformers import AutoTokenizer

    from megatron_gpt.config.schema import Config
    from megatron_gpt.convert.hf import write_tokenizer
    from megatron_gpt.data.tokenizer import build_tokenizer
    from test_recipes import llama3_style_tokenizer

    llama3_style_tokenizer([TEXT] * 4, 400, tmp_path / "llama3.json")
    cfg = Config.model_validate({"tokenizer": {"type": "hf", "path": str(tmp_path / "llama3.json")}})
    ours = build_tokenizer(cfg.tokenizer)
    (tmp_path / "out").mkdir()
    write_tokenizer(ours, cfg, tmp_path / "out")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert theirs.eos_token == theirs.bos_token == "<|end_of_text|>" and theirs.eos_token_id == ours.eod == 1
    assert len(theirs) == ours.vocab_size and theirs(TEXT, add_special_tokens=False)["input_ids"] == ours.encode(TEXT)
