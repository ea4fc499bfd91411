"""Supervised finetuning data: chat-template spans, the per-token loss mask beside the indexed
dataset, and training on it.

- The mask of a hand-written conversation matches its assistant spans token by token (each
  maximal run of trained tokens decodes to exactly one assistant reply plus its end of turn, each
  untrained run to the text between them), and prompt/completion trains only the completion.
- Changing the labels at masked positions changes neither the loss nor any gradient.
- A 2-rank run on a blend of SFT data and plain text trains, and a run stopped at step 3 and
  resumed gives the uninterrupted run's losses exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sft_data import CHATML, preprocess_sft_corpus, sft_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You speak as Hamlet."},
    {"role": "user", "content": "What do you read, my lord?"},
    {"role": "assistant", "content": "Words, words, words."},
    {"role": "user", "content": "What is the matter?"},
    {"role": "assistant", "content": "Between who?"},
]
# What ChatML renders, by hand: the trained spans are each reply with its end of turn.
UNTRAINED = ["<|im_start|>system\nYou speak as Hamlet.<|im_end|>\n<|im_start|>user\nWhat do you read, my lord?"
             "<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nWhat is the matter?<|im_end|>\n<|im_start|>assistant\n"]
TRAINED = ["Words, words, words.<|im_end|>\n", "Between who?<|im_end|>\n"]


def runs(mask: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs (value, start, end) of a 0/1 list."""
    out, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            out.append((mask[start], start, i))
            start = i
    return out


@pytest.fixture(scope="module")
def tokenizer():
    from megatron_gpt.data.tokenizer import build_tokenizer

    return build_tokenizer(sft_tokenizer())


def test_mask_matches_the_assistant_spans_token_by_token(tmp_path, tokenizer):
    from megatron_gpt.data.sft import ChatTemplate, example_spans, tokenize_spans

    # The template as a tokenizer folder carries it: tokenizer_config.json's chat_template.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|endoftext|>"}))
    template = ChatTemplate.load(None, str(tmp_path / "tokenizer_config.json"))
    ids, mask = tokenize_spans(tokenizer, example_spans({"messages": CONVERSATION}, template, "test:1"))
    assert len(ids) == len(mask) and ids[-1] == tokenizer.eod and mask[-1] == 1  # ends with a reply: EOD trained
    pieces = [(value, tokenizer.decode(ids[a:b])) for value, a, b in runs(mask[:-1])]
    assert pieces == [(0, UNTRAINED[0]), (1, TRAINED[0]), (0, UNTRAINED[1]), (1, TRAINED[1])]
    assert sum(mask) == sum(len(tokenizer.encode(t)) for t in TRAINED) + 1

    ids, mask = tokenize_spans(tokenizer, example_spans({"prompt": "Q: who?\nA:", "completion": " Hamlet"}, None, "t:2"))
    assert [(v, tokenizer.decode(ids[a:b])) for v, a, b in runs(mask[:-1])] == [(0, "Q: who?\nA:"), (1, " Hamlet")]


def test_preprocessed_mask_sits_beside_the_dataset_and_bad_input_is_named(tmp_path, tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_gpt.data.errors import DataError
    from megatron_gpt.data.sft import ChatTemplate, example_spans, preprocess_sft, tokenize_spans

    prefix = preprocess_sft_corpus(tmp_path / "corpus", conversations=5, pairs=3)
    conversations, pairs, template_file = (tmp_path / "corpus" / name for name in
                                           ("conversations.jsonl", "pairs.jsonl", "chatml.jinja"))
    tokens, masks = IndexedDataset(prefix), IndexedDataset(prefix + ".loss_mask")
    assert len(tokens) == len(masks) == 8 and masks[0].dtype == np.uint8
    template = ChatTemplate.load(str(template_file), None)
    lines = conversations.read_text().splitlines() + pairs.read_text().splitlines()
    for i, line in enumerate(lines):
        ids, mask = tokenize_spans(tokenizer, example_spans(json.loads(line), template, "x"))
        assert tokens[i].tolist() == ids and masks[i].tolist() == mask
    meta = json.loads(Path(prefix + ".meta.json").read_text())
    assert meta["examples"] == 8 and 0 < meta["trained_tokens"] < meta["tokens"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected 'messages'.*prompt"):
        preprocess_sft([str(bad)], str(tmp_path / "bad"), tokenizer, None)
    assert not list(tmp_path.glob("bad.*idx")) and not list(tmp_path.glob("bad*.tmp-*"))  # nothing half-written
    bad.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    with pytest.raises(DataError, match="needs a chat template"):
        preprocess_sft([str(bad)], str(tmp_path / "bad"), tokenizer, None)


def test_masked_labels_change_neither_loss_nor_gradients(single_process_group):
    from megatron_gpt.config.schema import ModelConfig
    from megatron_gpt.model import GPT, masked_mean, parallel_config, token_losses

    torch.manual_seed(0)
    model = GPT(ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32), 256, parallel_config())
    tokens = torch.randint(0, 256, (2, 32))
    labels = torch.randint(0, 256, (2, 32))
    loss_mask = (torch.rand(2, 32) < 0.5).float()

    def loss_and_grads(labels):
        model.zero_grad()
        loss = masked_mean(token_losses(model(tokens), labels, 1), loss_mask)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = loss_and_grads(labels)
    other = torch.where(loss_mask.bool(), labels, (labels + 1 + torch.randint(0, 200, labels.shape)) % 256)
    assert (other != labels).sum() == (loss_mask == 0).sum()
    loss2, grads2 = loss_and_grads(other)
    assert torch.equal(loss, loss2) and all(torch.equal(grads[n], grads2[n]) for n in grads)
    # ... while changing one trained label does change them.
    trained = loss_mask.nonzero()[0]
    other[tuple(trained)] = (labels[tuple(trained)] + 1) % 256
    loss3, _ = loss_and_grads(other)
    assert not torch.equal(loss, loss3)


@pytest.mark.slow
def test_two_ranks_train_on_sft_data_and_resume_exactly(tmp_path, data_cache):
    from megatron_gpt.data.embedded import prepare_embedded
    from test_checkpoints import TINY, common_overrides, losses, run_jobs

    sft = preprocess_sft_corpus(tmp_path / "sft")
    corpus = prepare_embedded("shakespeare", str(data_cache), tokenizer=sft_tokenizer())
    data = [f"data.paths=[{sft},{corpus}]", "data.weights=[0.7,0.3]", "data.embedded=null", "tokenizer.type=hf",
            f"tokenizer.path={sft_tokenizer().path}", "data.document_masking=true", "parallelism.zero_stage=1"]
    ckpt = tmp_path / "ckpt"
    jobs = [{"name": "straight", "configs": [str(TINY)], "overrides": common_overrides(
                tmp_path, data_cache, "straight", *data, "training.train_steps=6")},
            {"name": "first", "configs": [str(TINY)], "overrides": common_overrides(
                tmp_path, data_cache, "first", *data, "training.train_steps=3", f"checkpoint.save_dir={ckpt}")},
            {"name": "second", "configs": [str(TINY)], "overrides": common_overrides(
                tmp_path, data_cache, "second", *data, "training.train_steps=6", f"checkpoint.save_dir={ckpt}",
                "checkpoint.resume=true"),
             "dump_batches": str(tmp_path / "batches.pt")}]
    output = run_jobs(jobs, tmp_path, nproc=2)
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "second")
    assert "dp 2" in output and sorted(resumed) == [4, 5, 6]
    error = max(abs(resumed[s] - straight[s]) for s in resumed)
    print(f"SFT 2 ranks: losses {[round(straight[s], 4) for s in sorted(straight)]}; resumed max diff {error:.1e}")
    assert error == 0.0
    assert straight[6] < straight[1]
    # The resumed run's batches hold SFT samples with masked prompt tokens and per-document positions.
    batches = torch.load(tmp_path / "batches.pt", weights_only=True)
    mask = torch.cat([b["loss_mask"] for b in batches])
    assert 0.2 < mask.mean().item() < 0.99 and all("position_ids" in b for b in batches)


def test_preprocess_sft_command_reads_the_tokenizer_folders_template(tmp_path):
    import shutil
    import subprocess
    import sys

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from sft_data import write_sft_corpus

    conversations, pairs, _ = write_sft_corpus(tmp_path / "corpus", conversations=4, pairs=2)
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copyfile(sft_tokenizer().path, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "megatron_gpt", "preprocess-sft", "--input", str(conversations), str(pairs),
               "--output-prefix", str(tmp_path / "out"), "--tokenizer-type", "hf",
               "--tokenizer-path", str(folder / "tokenizer.json")]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "6 examples" in done.stdout and "trained" in done.stdout
    ours = preprocess_sft_corpus(tmp_path / "corpus", conversations=4, pairs=2)  # the library, same inputs
    for a, b in ((str(tmp_path / "out"), ours), (str(tmp_path / "out.loss_mask"), ours + ".loss_mask")):
        assert [x.tolist() for x in IndexedDataset(a)] == [x.tolist() for x in IndexedDataset(b)]
    (folder / "tokenizer_config.json").unlink()  # no template anywhere: conversations are refused, by line
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "conversations.jsonl:1: a conversation needs a chat template" in done.stderr
    assert "Traceback" not in done.stderr
