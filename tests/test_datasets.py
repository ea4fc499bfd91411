"""Datasets over megatron-core's GPTDataset: whole-document splits, blending, exact resume, and
index maps built by several processes at once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_gpt.config.schema import DataConfig, TokenizerConfig
from megatron_gpt.data.datasets import SampleOrder, build_datasets, collate
from megatron_gpt.data.errors import DataError
from megatron_gpt.data.preprocess import preprocess
from megatron_gpt.data.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def letters(tmp_path: Path, name: str, first: int, count: int, base: int = 50) -> str:
    """`count` documents; document d is made only of the letter chr(first + d), so every token
    tells which document (and dataset) it came from (byte tokenizer: token id = byte value)."""
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": chr(first + d) * (base + 7 * d)}) + "\n" for d in range(count)))
    preprocess([str(path)], str(tmp_path / name), build_tokenizer(TokenizerConfig(type="bytes")), progress=False)
    return str(tmp_path / name)


@pytest.fixture
def tokenizer():
    return build_tokenizer(TokenizerConfig(type="bytes"))


@pytest.fixture
def corpus(tmp_path):
    """40 documents of letters A.. (uppercase)."""
    return letters(tmp_path, "upper", 65, 40)


def documents_seen(dataset, eod: int) -> set[int]:
    tokens = np.concatenate([dataset[i]["tokens"].numpy() for i in range(len(dataset))])
    return {int(t) - 65 for t in np.unique(tokens) if t != eod}


def samples(dataset, indices) -> list[list[int]]:
    return [dataset[i]["tokens"].tolist() for i in indices]


def test_validation_is_whole_unseen_documents(corpus, tmp_path, tokenizer):
    data = DataConfig(paths=[corpus], split="90,10,0")
    train, valid = build_datasets(data, 16, 1, tokenizer, 200, 20, str(tmp_path / "cache"))
    train_docs, valid_docs = documents_seen(train, tokenizer.eod), documents_seen(valid, tokenizer.eod)
    assert valid_docs and not (train_docs & valid_docs)
    assert set(train.datasets[0].indices) == train_docs and set(valid.datasets[0].indices) == valid_docs  # whole
    assert len(valid_docs) == 4 and len(train_docs) == 36


def test_split_and_prefix_errors_name_the_fix(corpus, tmp_path, tokenizer):
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match=r"data.split '999,1,0' gives the validation split .* no whole document"):
        build_datasets(DataConfig(paths=[corpus], split="999,1,0"), 16, 1, tokenizer, 10, 10, cache)
    with pytest.raises(DataError, match=r"data.split '1' leaves no validation split"):
        build_datasets(DataConfig(paths=[corpus], split="1"), 16, 1, tokenizer, 10, 10, cache)
    with pytest.raises(DataError, match=r"nope.bin: does not exist \(from data.paths\).*megatron-gpt preprocess"):
        build_datasets(DataConfig(paths=[str(tmp_path / "nope")]), 16, 1, tokenizer, 10, 10, cache)
    with pytest.raises(DataError, match=r"the validation split of .* holds [\d,]+ tokens, fewer than one sample"):
        build_datasets(DataConfig(paths=[corpus], split="90,10,0"), 4096, 1, tokenizer, 10, 10, cache)


def test_wrong_tokenizer_and_truncated_bin_are_refused(corpus, tmp_path, tokenizer):
    embedded = build_tokenizer(TokenizerConfig(type="embedded"))
    with pytest.raises(DataError, match=r"upper.meta.json: .* was preprocessed with tokenizer .*bytes.* not the configured"):
        build_datasets(DataConfig(paths=[corpus]), 16, 1, embedded, 10, 10, str(tmp_path / "cache"))
    with open(corpus + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(corpus + ".bin") - 10)
    with pytest.raises(DataError, match=r"upper.bin: is \d[\d,]* bytes but .* it is truncated from document 39"):
        build_datasets(DataConfig(paths=[corpus]), 16, 1, tokenizer, 10, 10, str(tmp_path / "cache"))


def test_blend_shares_follow_the_weights(tmp_path, tokenizer):
    upper, lower = letters(tmp_path, "upper", 65, 26), letters(tmp_path, "lower", 97, 26, base=30)
    data = DataConfig(paths=[upper, lower], weights=[0.7, 0.3], split="98,2,0")
    train, _ = build_datasets(data, 32, 5, tokenizer, 10_000, 10, str(tmp_path / "cache"))
    source = [("upper", "lower")[int(train.dataset_index[i])] for i in range(len(train))]
    drawn = [s[: 2] for s in samples(train, range(0, 10_000, 97))]  # the tokens agree with the index
    assert all((t[0] < 97) == (source[i * 97] == "upper") for i, t in enumerate(drawn) if t[0] != tokenizer.eod)
    share = source.count("upper") / len(source)
    print(f"upper share over 10,000 samples: {share:.4f} (weight 0.7)")
    assert abs(share - 0.7) <= 0.01 and abs(source[:1000].count("upper") / 1000 - 0.7) <= 0.01
    # lower holds far fewer samples than 3,000: it is repeated epoch after epoch, each reshuffled
    lower_set = train.datasets[1]
    assert len(lower_set) < 3000 / 5
    picks = [train.locate(i)[1] for i in range(len(train)) if source[i] == "lower"]
    n = len(lower_set)
    assert sorted(picks[:n]) == list(range(n)) and sorted(picks[n:2 * n]) == list(range(n))
    assert picks[:n] != picks[n:2 * n]


def test_batched_collation_equals_megatron_cores_samples(tmp_path, tokenizer):
    """Blend.batch (what training reads) gives exactly the stacked GPTDataset.__getitem__ samples,
    across components, later reshuffled epochs and padding (pad id set to a real letter so that
    both paths have padding to mask)."""
    upper, lower = letters(tmp_path, "upper", 65, 12), letters(tmp_path, "lower", 97, 12, base=30)
    data = DataConfig(paths=[upper, lower], weights=[0.6, 0.4], split="90,10,0")
    train, valid = build_datasets(data, 20, 2, tokenizer, 600, 30, str(tmp_path / "cache"))
    assert len(train) > 2 * sum(len(d) for d in train.datasets)  # several epochs of each

    def check(blend, batches):
        for indices in batches:
            batched = collate(blend, indices, torch.device("cpu"))
            one_by_one = [blend[i] for i in indices]
            for key in ("tokens", "labels", "loss_mask"):
                expected = torch.stack([sample[key] for sample in one_by_one])
                assert batched[key].dtype == expected.dtype and torch.equal(batched[key], expected), key

    check(train, [range(i, min(i + 7, 600)) for i in range(0, 600, 7)])
    check(valid, [range(0, 30)])
    for dataset in train.datasets:
        dataset._pad_token_id = 65
    check(train, [range(0, 40), [599, 3, 3, 311]])
    assert collate(train, range(0, 40), torch.device("cpu"))["loss_mask"].min() == 0
    with pytest.raises(IndexError, match="outside"):
        train.batch([600])


def test_per_split_lists_blend_whole_datasets(tmp_path, tokenizer):
    a, b = letters(tmp_path, "a", 65, 20), letters(tmp_path, "b", 97, 20)
    valid = letters(tmp_path, "v", 48, 8, base=40)
    data = DataConfig(train_paths=[a, b], train_weights=[1, 3], valid_paths=[valid])
    train, val = build_datasets(data, 16, 3, tokenizer, 4000, 40, str(tmp_path / "cache"))
    shares = np.bincount(train.dataset_index, minlength=2) / len(train)
    assert abs(shares[1] - 0.75) <= 0.01
    assert {len(d.indices) for d in train.datasets} == {20} and len(val.datasets[0].indices) == 8
    assert all(48 <= t < 56 or t == tokenizer.eod for s in samples(val, range(40)) for t in s)


def test_resume_draws_exactly_the_next_samples(tmp_path, tokenizer):
    """Stopped after step k and rebuilt (fresh process state, its own cache, the shorter run's
    size), the data continues with the samples of step k+1 of an uninterrupted run."""
    upper, lower = letters(tmp_path, "upper", 65, 26), letters(tmp_path, "lower", 97, 26, base=30)
    data = DataConfig(paths=[upper, lower], weights=[0.7, 0.3], split="95,5,0")
    order = SampleOrder(micro_batch_size=4, gradient_accumulation_steps=2, data_parallel_size=2, data_parallel_rank=1)
    steps, k, g = 60, 25, order.global_batch_size  # 60 x 16 samples: several epochs of each dataset

    def drawn(dataset, first, last):
        return [samples(dataset, order.micro_batch_indices(s, m)) for s in range(first, last) for m in range(2)]

    straight, _ = build_datasets(data, 24, 9, tokenizer, steps * g, 8, str(tmp_path / "a"))
    first_run, _ = build_datasets(data, 24, 9, tokenizer, k * g, 8, str(tmp_path / "b"))
    assert drawn(first_run, 0, k) == drawn(straight, 0, k)
    resumed, _ = build_datasets(data, 24, 9, tokenizer, steps * g, 8, str(tmp_path / "b"))  # cached maps
    assert drawn(resumed, k, steps) == drawn(straight, k, steps)
    other_seed, _ = build_datasets(data, 24, 10, tokenizer, steps * g, 8, str(tmp_path / "b"))
    assert drawn(other_seed, 0, 3) != drawn(straight, 0, 3)


def test_index_maps_equal_megatron_cores_own(corpus, tmp_path, tokenizer):
    """The one-epoch maps are exactly what megatron-core's GPTDataset builds itself."""
    from megatron.core.datasets.gpt_dataset import GPTDataset

    train, _ = build_datasets(DataConfig(paths=[corpus], split="80,20,0"), 16, 7, tokenizer, 100, 10,
                              str(tmp_path / "cache"))
    ours = train.datasets[0]
    theirs = GPTDataset(ours.dataset, corpus, ours.indices, None, ours.index_split, ours.config)
    for name in ("document_index", "sample_index", "shuffle_index"):
        assert np.array_equal(getattr(ours, name), getattr(theirs, name)), name


RANKS = """
import json, os, sys
import numpy as np
import torch.distributed as dist
from megatron_gpt.config.schema import DataConfig, TokenizerConfig
from megatron_gpt.data import datasets
from megatron_gpt.data.index_maps import barrier, filesystem_leader
from megatron_gpt.data.tokenizer import build_tokenizer

rank, port, prefix, root = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
tok = build_tokenizer(TokenizerConfig(type="bytes"))
data = DataConfig(paths=[prefix], split="90,10,0")
out = {}

def build(cache):
    train, valid = datasets.build_datasets(data, 16, 3, tok, 500, 20, cache)
    return [d.built_index_maps for d in train.datasets + valid.datasets], [train[i]["tokens"].tolist() for i in range(0, 500, 7)]

# 1. one shared filesystem: one leader builds, the other waits and loads
out["leaders_shared"] = filesystem_leader(os.path.join(root, "shared"))
out["shared"] = build(os.path.join(root, "shared"))
# 2. a filesystem per rank (as on nodes without a shared one): each is its own leader
out["leaders_own"] = filesystem_leader(os.path.join(root, f"own{rank}"))
out["own"] = build(os.path.join(root, f"own{rank}"))
# 3. two separate jobs (no process group, so no election) build the same maps at the same moment
barrier()
dist.destroy_process_group()
out["race"] = build(os.path.join(root, "race"))
print(json.dumps(out))
"""


def test_two_ranks_building_the_same_index_maps(corpus, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in ("shared", "race"):
        (tmp_path / name).mkdir()
    for rank in range(2):
        (tmp_path / f"own{rank}").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", RANKS, str(rank), str(port), corpus, str(tmp_path)], cwd=REPO,
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
    r0, r1 = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    assert (r0["leaders_shared"], r1["leaders_shared"]) == (True, False)
    assert (r0["leaders_own"], r1["leaders_own"]) == (True, True)
    for case in ("shared", "own", "race"):
        assert r0[case][1] == r1[case][1], case  # same samples on both ranks
    assert r0["own"][1] == r0["shared"][1] == r0["race"][1]
    assert r0["shared"][0] == [True, True] and r1["shared"][0] == [False, False]  # built once, then loaded
    assert r0["own"][0] == r1["own"][0] == [True, True]
    built = [a or b for a, b in zip(r0["race"][0], r1["race"][0])]
    assert built == [True, True] and not any(a and b for a, b in zip(r0["race"][0], r1["race"][0]))  # lock: once
    for case in ("shared", "race", "own0"):
        names = sorted(p.name for p in (tmp_path / case / "index-maps").iterdir())
        assert len([n for n in names if n.endswith(".npy")]) == 6 and not [n for n in names if ".tmp-" in n]
        assert not [p for p in (tmp_path / case).iterdir() if p.name.startswith(".probe")]
    for name in (p.name for p in (tmp_path / "shared" / "index-maps").glob("*.npy")):
        arrays = [np.load(tmp_path / case / "index-maps" / name) for case in ("shared", "race", "own0", "own1")]
        assert all(np.array_equal(arrays[0], a) for a in arrays[1:]), name


def test_sample_order_partitions_the_global_batch():
    """dp ranks x micro-batches of one step cover the step's global samples exactly once."""
    for dp, micro, accum in [(1, 8, 1), (2, 4, 1), (4, 1, 2), (2, 2, 2)]:
        seen = [i for rank in range(dp) for m in range(accum)
                for i in SampleOrder(micro, accum, dp, rank).micro_batch_indices(3, m)]
        assert sorted(seen) == list(range(3 * dp * micro * accum, 4 * dp * micro * accum))
