"""GPT-2 checkpoints both ways, and the GPT-2 finetuning recipe.

A randomly initialized GPT2LMHeadModel with GPT-2's vocabulary (50257) and the real GPT-2 BPE
files (../shared/tokenizers/gpt2, converted into the HF tokenizer folder), saved locally:
- import-hf (tokenizer.json, and a second folder with only vocab.json + merges.txt) for
  tp 2 x pp 2: our forward equals transformers' logits within 1e-4, in one process and laid out at
  tp 2 (2 ranks, vocab-parallel logits gathered); exporting the import gives the original tensors
  bit for bit;
- `megatron-gpt train` from the import at tp 2 x pp 2: its first loss equals transformers' on
  the same batch, and the checkpoint it saves (4 ranks) loads with transformers' logits and
  exports bit for bit;
- configs/finetune/gpt2-shakespeare.yml trains from the import (a few steps, 4 ranks).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_checkpoints import TINY, common_overrides, losses, run_jobs
from test_convert import randomize

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

REPO = Path(__file__).resolve().parents[1]
SHARED_GPT2 = REPO.parent / "shared" / "tokenizers" / "gpt2"
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"
RECIPE = REPO / "configs" / "finetune" / "gpt2-shakespeare.yml"


def random_gpt2(folder: Path, bpe_only: bool = False) -> "transformers.GPT2LMHeadModel":
    """A small random GPT2LMHeadModel (every tensor random) saved with GPT-2's tokenizer: as
    tokenizer.json (+ tokenizer_config.json), or as vocab.json + merges.txt only."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    torch.manual_seed(3)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                       bos_token_id=50256, eos_token_id=50256))
    randomize(model, norm_marker=".ln_").save_pretrained(folder)
    for theirs, ours in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        shutil.copyfile(SHARED_GPT2 / theirs, folder / ours)
    if not bpe_only:  # built from the folder: GPT2TokenizerFast(vocab_file=...) is empty in transformers 5
        GPT2TokenizerFast.from_pretrained(folder).save_pretrained(folder)
        (folder / "vocab.json").unlink()
        (folder / "merges.txt").unlink()
    return model.eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory, data_cache):
    if not SHARED_GPT2.is_dir():
        pytest.skip("the real GPT-2 files (../shared/tokenizers/gpt2) are absent")
    tmp = tmp_path_factory.mktemp("gpt2")
    models = {}
    for name, bpe_only, entry in (("json", False, ["-m", "megatron_gpt", "import-hf"]),
                                  ("bpe", True, [str(REPO / "tools" / "convert_from_hf.py")])):
        models[name] = random_gpt2(tmp / f"hf-{name}", bpe_only)
        done = subprocess.run([sys.executable, *entry, str(tmp / f"hf-{name}"), str(tmp / f"imported-{name}"),
                               "--tensor", "2", "--pipeline", "2"], capture_output=True, text=True, cwd=tmp, env=ENV)
        assert done.returncode == 0, done.stdout + done.stderr
    imported = tmp / "imported-json"
    jobs = [{"name": "import", "configs": [str(TINY), str(imported / "config.yml")],
             "dump_batches": str(tmp / "batches.pt"),
             "overrides": common_overrides(tmp, data_cache, "import", "training.micro_batch_size=4",
                                           "training.train_steps=1", "optimizer.lr=1e-30", "optimizer.min_lr=0",
                                           "optimizer.weight_decay=0", f"checkpoint.save_dir={tmp / 'ckpt-import'}")},
            {"name": "finetune", "configs": [str(imported / "config.yml"), str(RECIPE)],
             "overrides": common_overrides(tmp, data_cache, "finetune", "training.train_steps=4",
                                           "training.micro_batch_size=2", "training.global_batch_size=8",
                                           "training.eval_interval=2", "training.generate_samples=0",
                                           f"checkpoint.save_dir={tmp / 'ckpt-finetune'}")}]
    return tmp, models, run_jobs(jobs, tmp)


def test_import_matches_transformers_and_exports_bit_for_bit(work, single_process_group):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from megatron_gpt.checkpoint.reader import load_checkpoint
    from megatron_gpt.config import padded_vocab_size
    from megatron_gpt.convert.hf import export_hf, read_checkpoint
    from megatron_gpt.model import GPT, masked_mean, parallel_config

    tmp, models, output = work
    hf = models["json"]
    original = load_file(tmp / "hf-json" / "model.safetensors")

    def assert_bit_equal(folder: Path) -> None:
        again = load_file(folder / "model.safetensors")
        assert sorted(again) == sorted(original)
        assert all(again[k].dtype == original[k].dtype and torch.equal(again[k], original[k]) for k in original)

    for name in ("json", "bpe"):  # both tokenizer forms give GPT-2's ids and the same weights
        source = read_checkpoint(tmp / f"imported-{name}")
        assert source.cfg.model.position_embedding == "learned" and source.cfg.model.activation == "gelu_tanh"
        assert source.tokenizer.vocab_size == 50257 and source.tokenizer.eod == 50256
        model = GPT(source.cfg.model, padded_vocab_size(50257, source.cfg), parallel_config())
        names = model.canonical_names()
        with torch.no_grad():
            for pname, param in model.named_parameters():
                param.copy_(source.state[names[pname]])
            tokens = torch.tensor([source.tokenizer.encode(TEXT)])
            error = (model(tokens)[..., :50257] - hf(tokens).logits).abs().max().item()
        print(f"import gpt2 ({name} tokenizer): max |logits(ours) - logits(transformers)| = {error:.2e}")
        assert error <= 1e-4
        assert_bit_equal(export_hf(tmp / f"imported-{name}", tmp / f"reexport-{name}"))
    theirs = AutoTokenizer.from_pretrained(tmp / "reexport-json")
    assert theirs(TEXT)["input_ids"] == tokens[0].tolist() and theirs.eos_token_id == 50256
    assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp / "reexport-json")).__name__ == "GPT2LMHeadModel"

    # Trained at tp 2 x pp 2 from the import: the first loss is transformers' on the same batch.
    assert "initializing weights from" in output
    batches = torch.load(tmp / "batches.pt", weights_only=True)
    with torch.no_grad():
        hf_loss = sum(masked_mean(torch.nn.functional.cross_entropy(
            hf(b["tokens"]).logits.flatten(0, 1), b["labels"].flatten(), reduction="none").view_as(b["labels"]),
            b["loss_mask"]) for b in batches) / len(batches)
    first = losses(tmp / "import")[1]
    print(f"gpt2 tp2 x pp2 first loss {first:.6f}, transformers {hf_loss.item():.6f}")
    assert abs(first - hf_loss.item()) <= 1e-4
    # The checkpoint its 4 ranks saved gives transformers' logits and exports to the original tensors.
    ours = load_checkpoint(tmp / "ckpt-import")
    with torch.no_grad():
        error = (ours.model(tokens)[..., :50257] - hf(tokens).logits).abs().max().item()
    print(f"gpt2 saved at tp2 x pp2: max logits error {error:.2e}")
    assert error <= 1e-4
    assert_bit_equal(export_hf(tmp / "ckpt-import", tmp / "reexport-trained", arch="gpt2"))


def test_import_logits_at_tensor_parallel_2(work):
    """The import laid out at tp 2 (column/row-parallel slices, vocab-parallel logits gathered)."""
    from transformers import AutoTokenizer

    tmp, models, _ = work
    tokens = torch.tensor([AutoTokenizer.from_pretrained(tmp / "hf-json")(TEXT)["input_ids"]])
    torch.save(tokens, tmp / "tokens.pt")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "tp_logits_check.py"), str(tmp / "imported-json"),
                           str(tmp / "tokens.pt"), str(tmp / "logits-tp2.pt")],
                          capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    with torch.no_grad():
        error = (torch.load(tmp / "logits-tp2.pt", weights_only=True) - models["json"](tokens).logits).abs().max().item()
    print(f"gpt2 import at tp 2: max |logits(ours) - logits(transformers)| = {error:.2e}")
    assert error <= 1e-4


def test_finetune_recipe_trains_from_the_import(work):
    tmp, _, output = work
    steps = losses(tmp / "finetune")
    print(f"gpt2-shakespeare recipe: losses {steps}")
    assert sorted(steps) == [1, 2, 3, 4] and all(math.isfinite(v) for v in steps.values())
    assert abs(steps[1] - math.log(50257)) < 3  # starts from the imported model, not a broken one
    assert (tmp / "ckpt-finetune" / "global_step4" / "metadata.json").is_file()
    assert "validation loss" in output


def test_gpt2_options_the_class_cannot_express_are_errors():
    from megatron_gpt.config.schema import ModelConfig
    from megatron_gpt.convert import UnsupportedOption, gpt2
    from megatron_gpt.convert.hf import infer_arch

    assert infer_arch(ModelConfig(position_embedding="learned", activation="gelu_tanh")) == "gpt2"
    for options, match in [(dict(position_embedding="rotary"), "position_embedding=rotary"),
                           (dict(position_embedding="learned", parallel_residual=True), "parallel_residual"),
                           (dict(position_embedding="learned", bias=False), "model.bias=false")]:
        with pytest.raises(UnsupportedOption, match=match):
            gpt2.check(ModelConfig(**options))
