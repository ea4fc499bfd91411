"""Data pipeline: tokenizers, reader errors, preprocessing to .bin/.idx, embedded corpus.

Real data throughout: a slice of the bundled Shakespeare corpus, tokenizers trained on it.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import lzma
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from megatron_gpt.config.schema import TokenizerConfig
from megatron_gpt.data.embedded import embedded_corpus_path, prepare_embedded
from megatron_gpt.data.errors import DataError
from megatron_gpt.data.preprocess import preprocess
from megatron_gpt.data.reader import JsonlReader
from megatron_gpt.data.tokenizer import BYTE_TO_UNICODE, Tokenizer, build_tokenizer
from megatron_gpt.data.train_tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_GPT2 = REPO.parent / "shared/tokenizers/gpt2"
EXTRA_DOCS = [
    "naïve café — 日本語 🎭 ünïcödé\n\ttabs  and   spaces ",
    "a literal <|endoftext|> inside a document stays text",
    "x",
]


def indexed_dataset(prefix: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(prefix)


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode()
    path.write_bytes(gzip.compress(lines) if path.name.endswith(".gz") else lines)
    return path


@pytest.fixture(scope="session")
def texts() -> list[str]:
    docs = [json.loads(line) for line in lzma.open(embedded_corpus_path("shakespeare"), "rt", encoding="utf-8")]
    return [d["text"][:12_000] for d in docs[:8]] + EXTRA_DOCS


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, texts) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])


@pytest.fixture(scope="session")
def bpe_json(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_tokenizer([str(corpus)], str(out), vocab_size=600)
    return out


@pytest.fixture(scope="session")
def gpt2_files(tmp_path_factory, bpe_json) -> tuple[Path, Path]:
    """encoder.json + vocab.bpe in GPT-2's own format, derived from the trained byte-level BPE."""
    merges = [m.split(" ") if isinstance(m, str) else m for m in json.loads(bpe_json.read_text())["model"]["merges"]]
    # GPT-2 ranks: printable single bytes first (data-gym order), the rest after, then merges in order.
    order = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    order += [b for b in range(256) if b not in order]
    encoder = {BYTE_TO_UNICODE[b]: i for i, b in enumerate(order)}
    for i, (a, b) in enumerate(merges):
        encoder[a + b] = 256 + i
    encoder["<|endoftext|>"] = 256 + len(merges)
    d = tmp_path_factory.mktemp("gpt2")
    (d / "encoder.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    (d / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return d / "encoder.json", d / "vocab.bpe"


@pytest.fixture(scope="session")
def tokenizers(bpe_json, gpt2_files) -> dict[str, Tokenizer]:
    vocab, merge = gpt2_files
    return {
        "hf": build_tokenizer(TokenizerConfig(type="hf", path=str(bpe_json))),
        "gpt2bpe": build_tokenizer(TokenizerConfig(type="gpt2bpe", vocab_file=str(vocab), merge_file=str(merge))),
        "bytes": build_tokenizer(TokenizerConfig(type="bytes")),
        "embedded": build_tokenizer(TokenizerConfig(type="embedded")),
    }


# --- preprocessing ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,append_eod,gz", [("hf", True, False), ("gpt2bpe", True, True), ("bytes", False, False)])
def test_preprocess_matches_encode(tmp_path, tokenizers, texts, kind, append_eod, gz):
    tok = tokenizers[kind]
    src = write_jsonl(tmp_path / ("in.jsonl.gz" if gz else "in.jsonl"), [{"text": t} for t in texts])
    stats = preprocess([str(src)], str(tmp_path / "out"), tok, append_eod=append_eod, progress=False)
    ds = indexed_dataset(str(tmp_path / "out"))
    assert len(ds) == stats.documents == len(texts)
    assert list(ds.document_indices) == list(range(len(texts) + 1))
    assert ds.index.dtype == np.uint16
    for i, text in enumerate(texts):
        assert ds[i].tolist() == tok.encode(text) + ([tok.eod] if append_eod else []), f"document {i}"
    assert stats.tokens == int(ds.sequence_lengths.sum())
    assert stats.bytes == sum(len(t.encode()) for t in texts)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, "out.bin", "out.idx"])  # no temp files


def test_workers_give_identical_files(tmp_path, tokenizers, corpus):
    for workers in (1, 2):
        preprocess([str(corpus)], str(tmp_path / f"w{workers}"), tokenizers["hf"], workers=workers, progress=False)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()


def test_empty_documents_counted_and_skipped(tmp_path, tokenizers):
    docs = [{"text": "first"}, {"text": ""}, {"text": "second"}, {"text": ""}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs) + "\n")  # trailing blank line is fine
    stats = preprocess([str(src)], str(tmp_path / "out"), tokenizers["bytes"], progress=False)
    assert (stats.documents, stats.skipped_empty) == (2, 2)
    ds = indexed_dataset(str(tmp_path / "out"))
    assert [ds[i].tolist() for i in range(len(ds))] == [list(b"first") + [256], list(b"second") + [256]]


@pytest.mark.parametrize(
    "lines,line_no,words",
    [
        (['{"text": "ok"}', '{"text": "broken'], 2, ["invalid JSON", "fix:"]),
        (['{"text": "ok"}', '{"text": "ok"}', '{"body": "no text"}'], 3, ["missing key 'text'", "--json-key"]),
        (['{"text": 5}'], 1, ["not a string"]),
        (['["a list"]'], 1, ["JSON object"]),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, tokenizers, lines, line_no, words):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    for workers in (1, 2) if line_no == 2 else (1,):
        with pytest.raises(DataError) as err:
            preprocess([str(src)], str(tmp_path / "out"), tokenizers["bytes"], workers=workers, progress=False)
        assert f"{src}:{line_no}:" in str(err.value)
        for w in words:
            assert w in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # nothing half-written left


def test_missing_input_and_bad_suffix(tmp_path):
    with pytest.raises(DataError, match="input file not found"):
        list(JsonlReader([str(tmp_path / "nope.jsonl")]))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported input format"):
        list(JsonlReader([str(tmp_path / "a.txt")]))


# --- tokenizers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hf", "gpt2bpe", "bytes", "embedded"])
def test_token_byte_lengths_sum_to_utf8_bytes(tokenizers, texts, kind):
    tok = tokenizers[kind]
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,) and lengths.dtype == np.int64
    assert lengths[tok.eod] == 0
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert int(lengths[ids].sum()) == len(text.encode())
        assert tok.decode(ids) == text
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    json.dumps(tok.unique_identifiers)  # megatron-core hashes it


def test_gpt2bpe_agrees_with_hf_on_the_same_merges(tokenizers, texts):
    hf, g2 = tokenizers["hf"], tokenizers["gpt2bpe"]
    assert g2.vocab_size == hf.vocab_size and g2.eod == hf.vocab_size - 1
    for text in texts:
        hf_pieces = [hf._tok.id_to_token(i) for i in hf.encode(text)]
        g2_pieces = ["".join(BYTE_TO_UNICODE[b] for b in g2._enc.decode_single_token_bytes(i)) for i in g2.encode(text)]
        assert g2_pieces == hf_pieces


@pytest.mark.skipif(not SHARED_GPT2.is_dir(), reason="GPT-2 files not available")
def test_real_gpt2_encoding():
    tok = build_tokenizer(TokenizerConfig(
        type="gpt2bpe", vocab_file=str(SHARED_GPT2 / "encoder.json"), merge_file=str(SHARED_GPT2 / "vocab.bpe")))
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eod, tok.pad) == (50257, 50256, -1)
    assert tok.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"
    assert int(tok.token_byte_lengths()[tok.encode("Hello world")].sum()) == 11


def test_tokenizer_errors_name_the_config_key(tmp_path, corpus):
    with pytest.raises(DataError, match="tokenizer.path"):
        build_tokenizer(TokenizerConfig(type="hf", path=str(tmp_path / "missing.json")))
    with pytest.raises(DataError, match="tokenizer.path"):
        build_tokenizer(TokenizerConfig(type="hf"))
    (tmp_path / "encoder.json").write_text("{}")
    with pytest.raises(DataError, match="tokenizer.merge_file"):
        build_tokenizer(TokenizerConfig(type="gpt2bpe", vocab_file=str(tmp_path / "encoder.json")))
    from tokenizers import Tokenizer as HFTok, models, pre_tokenizers, trainers

    plain = HFTok(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.train_from_iterator(["to be or not to be"], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    plain.save(str(tmp_path / "no_eod.json"))
    with pytest.raises(DataError, match=r"no <\|endoftext\|> token"):
        build_tokenizer(TokenizerConfig(type="hf", path=str(tmp_path / "no_eod.json")))


def test_train_tokenizer_is_deterministic(tmp_path, corpus, bpe_json):
    train_tokenizer([str(corpus)], str(tmp_path / "again.json"), vocab_size=600)
    assert (tmp_path / "again.json").read_bytes() == bpe_json.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["again.json"]


# --- embedded corpus ----------------------------------------------------------------------------


def test_embedded_assets_load(tokenizers):
    tok = tokenizers["embedded"]
    assert (tok.vocab_size, tok.eod, tok.pad) == (2048, 0, -1)
    docs = list(JsonlReader([str(embedded_corpus_path("shakespeare"))]))
    assert len(docs) == 42
    titles = [json.loads(line)["title"] for line in lzma.open(embedded_corpus_path("shakespeare"), "rt")]
    assert "Hamlet" in " ".join(titles)
    ids = tok.encode(docs[0][:2000])
    assert len(ids) < 2000 / 2.5  # a real BPE, not bytes
    with pytest.raises(DataError, match="unknown embedded corpus"):
        embedded_corpus_path("nope")


def test_prepare_embedded_concurrent(tmp_path):
    script = (
        "import hashlib, sys; from megatron_gpt.data.embedded import prepare_embedded; "
        "p = prepare_embedded('shakespeare', sys.argv[1]); "
        "print(p, hashlib.sha256(open(p + '.bin', 'rb').read() + open(p + '.idx', 'rb').read()).hexdigest())"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    results = {tuple(out.split()) for out, _ in outs}
    assert len(results) == 1, results  # same prefix, same file hashes
    prefix = next(iter(results))[0]
    assert prepare_embedded("shakespeare", str(tmp_path)) == prefix  # cached now
    ds = indexed_dataset(prefix)
    assert len(ds) == 42 and ds.index.dtype == np.uint16 and int(ds[0][-1]) == 0  # ends with EOD
    assert sorted(p.name for p in Path(prefix).parent.iterdir()) == [".lock", "text_document.bin", "text_document.idx"]


# --- command line -------------------------------------------------------------------------------


def test_cli_preprocess_and_errors(tmp_path, corpus, capsys):
    from megatron_gpt.data import commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["preprocess", "--input", str(corpus), "--output-prefix", str(tmp_path / "o"),
                              "--tokenizer-type", "bytes", "--no-append-eod", "--quiet"])
    assert args.func(args) == 0
    assert "tokens/s" in capsys.readouterr().out
    assert len(indexed_dataset(str(tmp_path / "o"))) == 11
    args = parser.parse_args(["preprocess", "--input", str(tmp_path / "missing.jsonl"), "--output-prefix", "x"])
    assert args.func(args) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_neox_wrapper(tmp_path, corpus, gpt2_files, tokenizers):
    spec = importlib.util.spec_from_file_location("neox_preprocess", REPO / "tools/preprocess_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    vocab, merge = gpt2_files
    rc = module.main(["--input", f"{corpus},{corpus}", "--output-prefix", str(tmp_path / "neox"),
                      "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab), "--merge-file", str(merge),
                      "--append-eod", "--dataset-impl", "mmap"])
    assert rc == 0
    ds = indexed_dataset(str(tmp_path / "neox_text_document"))
    assert len(ds) == 22 and int(ds[0][-1]) == tokenizers["gpt2bpe"].eod


def test_commands_import_is_light():
    code = "import sys, megatron_gpt.data.commands; assert not {'torch', 'megatron', 'deepspeed'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_package_never_reads_shared_dir():
    for path in (REPO / "megatron_gpt/data").rglob("*.py"):
        assert "/work/shared" not in path.read_text() and "../shared" not in path.read_text(), path
