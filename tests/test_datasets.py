"""Dataset building over megatron-core's GPTDataset: whole-document splits and sample order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_gpt.config.schema import TokenizerConfig
from megatron_gpt.data.datasets import SampleOrder, build_datasets
from megatron_gpt.data.errors import DataError
from megatron_gpt.data.preprocess import preprocess
from megatron_gpt.data.tokenizer import build_tokenizer


@pytest.fixture
def corpus(tmp_path):
    """40 documents; document d is made only of the letter chr(65 + d), so every token tells
    which document it came from (byte tokenizer: token id = byte value)."""
    path = tmp_path / "letters.jsonl"
    path.write_text("".join(json.dumps({"text": chr(65 + d) * (50 + 7 * d)}) + "\n" for d in range(40)))
    tokenizer = build_tokenizer(TokenizerConfig(type="bytes"))
    preprocess([str(path)], str(tmp_path / "letters"), tokenizer, append_eod=True, progress=False)
    return str(tmp_path / "letters"), tokenizer


def documents_seen(dataset, eod: int) -> set[int]:
    tokens = np.concatenate([dataset[i]["tokens"].numpy() for i in range(len(dataset))])
    return {int(t) - 65 for t in np.unique(tokens) if t != eod}


def test_validation_is_whole_unseen_documents(corpus, tmp_path):
    prefix, tokenizer = corpus
    train, valid = build_datasets([prefix], "90,10,0", 16, 1, tokenizer, 200, 20, str(tmp_path / "cache"))
    train_docs, valid_docs = documents_seen(train, tokenizer.eod), documents_seen(valid, tokenizer.eod)
    assert valid_docs and not (train_docs & valid_docs)
    assert set(train.indices) == train_docs and set(valid.indices) == valid_docs  # every doc, whole
    assert len(valid_docs) == 4 and len(train_docs) == 36


def test_empty_split_is_an_error_not_a_hang(corpus, tmp_path):
    prefix, tokenizer = corpus
    with pytest.raises(DataError, match=r"data.split '999,1,0' gives the validation split .* no whole document"):
        build_datasets([prefix], "999,1,0", 16, 1, tokenizer, 10, 10, str(tmp_path / "cache"))


def test_missing_prefix_names_the_fix(tmp_path):
    tokenizer = build_tokenizer(TokenizerConfig(type="bytes"))
    with pytest.raises(DataError, match="megatron-gpt preprocess"):
        build_datasets([str(tmp_path / "nope")], "90,10,0", 16, 1, tokenizer, 10, 10, str(tmp_path))


def test_sample_order_partitions_the_global_batch():
    """dp ranks x micro-batches of one step cover the step's global samples exactly once."""
    for dp, micro, accum in [(1, 8, 1), (2, 4, 1), (4, 1, 2), (2, 2, 2)]:
        seen = [i for rank in range(dp) for m in range(accum)
                for i in SampleOrder(micro, accum, dp, rank).micro_batch_indices(3, m)]
        assert sorted(seen) == list(range(3 * dp * micro * accum, 4 * dp * micro * accum))
