"""Data pipeline: tokenizers, input formats, preprocessing to .bin/.idx, bad input, CLI, bench.

Real data throughout: a slice of the bundled Shakespeare corpus, tokenizers trained on it
(byte-level BPE, its GPT-2-format and .tiktoken exports, a SentencePiece model).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import lzma
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from megatron_gpt.config.schema import TokenizerConfig
from megatron_gpt.data.embedded import embedded_corpus_path, prepare_embedded
from megatron_gpt.data.errors import DataError
from megatron_gpt.data.gpt2_files import write_gpt2_files
from megatron_gpt.data.indexed import leftover_temps, merge, open_indexed
from megatron_gpt.data.preprocess import preprocess, preprocess_keys
from megatron_gpt.data.reader import JsonlReader
from megatron_gpt.data.tiktoken_files import cache_name, write_tiktoken_ranks
from megatron_gpt.data.tokenizer import BYTE_TO_UNICODE, Tokenizer, build_tokenizer
from megatron_gpt.data.train_tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_GPT2 = SHARED / "tokenizers/gpt2"
EXTRA_DOCS = [
    "naïve café — 日本語 🎭 ünïcödé\n\ttabs  and   spaces ",
    "a literal <|endoftext|> inside a document stays text",
    "x",
]
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def indexed_dataset(prefix: str):
    """megatron-core's own reader: what training will read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(prefix)


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode()
    if path.name.endswith(".gz"):
        lines = gzip.compress(lines)
    elif path.name.endswith(".xz"):
        lines = lzma.compress(lines)
    elif path.name.endswith(".zst"):
        import zstandard

        lines = zstandard.ZstdCompressor().compress(lines)
    path.write_bytes(lines)
    return path


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_gpt", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=120)


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
    vocab, merges = write_gpt2_files(str(bpe_json), str(tmp_path_factory.mktemp("gpt2")))
    return Path(vocab), Path(merges)


@pytest.fixture(scope="session")
def tiktoken_file(tmp_path_factory, gpt2_files) -> Path:
    """The same BPE as a .tiktoken file (tiktoken's format for named encodings)."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    vocab, merge_file = gpt2_files
    path = tmp_path_factory.mktemp("tiktoken") / "cl100k_base.tiktoken"
    write_tiktoken_ranks(data_gym_to_mergeable_bpe_ranks(str(merge_file), str(vocab)), str(path))
    return path


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, texts) -> Path:
    """A small SentencePiece BPE trained offline on the corpus (byte fallback: every text encodes)."""
    import sentencepiece as spm

    path = tmp_path_factory.mktemp("sp") / "sp.model"
    lines = [line for t in texts for line in t.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(path.with_suffix("")),
                                   vocab_size=500, model_type="bpe", byte_fallback=True, minloglevel=2,
                                   num_threads=1)
    return path


@pytest.fixture(scope="session")
def tokenizers(bpe_json, gpt2_files, tiktoken_file, sp_model) -> dict[str, Tokenizer]:
    vocab, merge_file = gpt2_files
    return {
        "hf": build_tokenizer(TokenizerConfig(type="hf", path=str(bpe_json))),
        "gpt2bpe": build_tokenizer(TokenizerConfig(type="gpt2bpe", vocab_file=str(vocab), merge_file=str(merge_file))),
        "tiktoken": build_tokenizer(TokenizerConfig(type="tiktoken", name="cl100k_base", path=str(tiktoken_file))),
        "sentencepiece": build_tokenizer(TokenizerConfig(type="sentencepiece", path=str(sp_model))),
        "bytes": build_tokenizer(TokenizerConfig(type="bytes")),
        "embedded": build_tokenizer(TokenizerConfig(type="embedded")),
    }


# --- preprocessing: megatron-core reads what we write, ids equal direct encoding -----------------


@pytest.mark.parametrize("kind,append_eod,suffix,workers,dtype", [
    ("hf", True, ".jsonl", 2, np.uint16),
    ("gpt2bpe", True, ".jsonl.gz", 2, np.uint16),
    ("sentencepiece", True, ".jsonl.zst", 2, np.uint16),
    ("tiktoken", True, ".jsonl.xz", 1, np.int32),  # cl100k's special ids sit above 65535
    ("bytes", False, ".jsonl", 1, np.uint16),
])
def test_preprocess_matches_encode(tmp_path, tokenizers, texts, kind, append_eod, suffix, workers, dtype):
    tok = tokenizers[kind]
    src = write_jsonl(tmp_path / f"in{suffix}", [{"text": t} for t in texts])
    stats = preprocess([str(src)], str(tmp_path / "out"), tok, append_eod=append_eod, workers=workers, progress=False)
    ds = indexed_dataset(str(tmp_path / "out"))
    assert len(ds) == stats.documents == len(texts)
    assert list(ds.document_indices) == list(range(len(texts) + 1))
    assert ds.index.dtype == dtype
    for i, text in enumerate(texts):
        assert ds[i].tolist() == tok.encode(text) + ([tok.eod] if append_eod else []), f"document {i}"
    assert stats.tokens == int(ds.sequence_lengths.sum())
    assert stats.bytes == sum(len(t.encode()) for t in texts)
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    assert meta["tokenizer_id"] == tok.unique_identifiers and meta["documents"] == len(texts)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, "out.bin", "out.idx", "out.meta.json"])


def test_every_input_format_gives_the_same_dataset(tmp_path, tokenizers, texts):
    """jsonl / gz / xz / zst / parquet / .txt files (via a glob) all read the same documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [{"text": t} for t in texts]
    for suffix in (".jsonl", ".jsonl.gz", ".jsonl.xz", ".jsonl.zst"):
        write_jsonl(tmp_path / f"c{suffix}", docs)
    pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), tmp_path / "c.parquet", row_group_size=4)
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "txt" / f"doc{i:02d}.txt").write_text(t, encoding="utf-8")
    tok = tokenizers["hf"]
    expected = (tmp_path / "ref.bin")
    preprocess([str(tmp_path / "c.jsonl")], str(tmp_path / "ref"), tok, progress=False)
    for name, inputs in [("gz", ["c.jsonl.gz"]), ("xz", ["c.jsonl.xz"]), ("zst", ["c.jsonl.zst"]),
                         ("parquet", ["c.parquet"]), ("txt", ["txt/doc*.txt"])]:
        preprocess([str(tmp_path / p) for p in inputs], str(tmp_path / name), tok, progress=False)
        assert (tmp_path / f"{name}.bin").read_bytes() == expected.read_bytes(), name
        assert (tmp_path / f"{name}.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes(), name
    # several files and globs concatenate in the order given
    stats = preprocess([str(tmp_path / "c.jsonl"), str(tmp_path / "c.*.gz")], str(tmp_path / "two"), tok, progress=False)
    assert stats.documents == 2 * len(texts)


def test_json_keys_each_dataset_from_its_own_text(tmp_path, tokenizers, texts):
    docs = [{"text": t, "title": f"title {i}: {t[:40]}", "note": "" if i % 3 else f"n{i}"} for i, t in enumerate(texts)]
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    tok = tokenizers["gpt2bpe"]
    outputs = {k: str(tmp_path / k) for k in ("text", "title", "note")}
    stats = preprocess_keys([str(src)], outputs, tok, append_eod=True, workers=2, progress=False)
    for key in outputs:
        ds = indexed_dataset(outputs[key])
        want = [d[key] for d in docs if d[key]]
        assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) + [tok.eod] for t in want], key
        assert stats[key].skipped_empty == len(docs) - len(want)
    assert stats["note"].documents == 4 and stats["title"].documents == len(docs)


def test_workers_give_identical_files(tmp_path, tokenizers, corpus, texts):
    """In-line (1), forked processes (3), and threads (3, when the caller runs a Python thread)."""
    import threading

    many = write_jsonl(tmp_path / "many.jsonl", [{"text": t} for t in texts * 120])  # several batches
    for workers in (1, 3):
        preprocess([str(many)], str(tmp_path / f"w{workers}"), tokenizers["gpt2bpe"], workers=workers, progress=False)
    done = threading.Event()
    busy = threading.Thread(target=done.wait)
    busy.start()
    try:
        preprocess([str(many)], str(tmp_path / "threads"), tokenizers["gpt2bpe"], workers=3, progress=False)
    finally:
        done.set()
        busy.join()
    for name in ("w3", "threads"):
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"{name}{ext}").read_bytes(), name


# --- bad input: one clear DataError naming file and line --------------------------------------------


def test_empty_documents_counted_and_skipped(tmp_path, tokenizers):
    docs = [{"text": "first"}, {"text": ""}, {"text": "second"}, {"text": ""}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs) + "\n")  # trailing blank line is fine
    stats = preprocess([str(src)], str(tmp_path / "out"), tokenizers["bytes"], progress=False)
    assert (stats.documents, stats.skipped_empty) == (2, 2)
    ds = indexed_dataset(str(tmp_path / "out"))
    assert [ds[i].tolist() for i in range(len(ds))] == [list(b"first") + [256], list(b"second") + [256]]


@pytest.mark.parametrize("raw,line_no,words", [
    (b'{"text": "ok"}\n{"text": "broken\n', 2, ["invalid JSON", "fix:"]),
    (b'{"text": "ok"}\n{"text": "ok"}\n{"body": "no text"}\n', 3, ["missing key 'text'", "keys: body", "--json-keys"]),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, ["invalid UTF-8", "re-encode"]),
    (b'{"text": "ok"}\n\n{"text": "\\ud800 lone"}\n', 3, ["lone surrogate", "\\ud800"]),
    (b'{"text": 5}\n', 1, ["not a string"]),
    (b'["a list"]\n', 1, ["JSON object"]),
])
def test_bad_lines_name_file_and_line(tmp_path, tokenizers, raw, line_no, words):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(raw * 1)
    for workers in (1, 2):
        with pytest.raises(DataError) as err:
            preprocess([str(src)], str(tmp_path / "out"), tokenizers["bytes"], workers=workers, progress=False)
        assert f"{src}:{line_no}:" in str(err.value)
        for w in words:
            assert w in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # nothing half-written left


def test_bad_txt_parquet_and_compressed_inputs(tmp_path, tokenizers):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = tokenizers["bytes"]
    (tmp_path / "a.txt").write_bytes(b"line one\nline two\nbad \xff byte\n")
    with pytest.raises(DataError, match=rf"{tmp_path}/a.txt:3: invalid UTF-8"):
        preprocess([str(tmp_path / "a.txt")], str(tmp_path / "o"), tok, progress=False)
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=rf"{tmp_path}/n.parquet:row 2: 'text' is null"):
        preprocess([str(tmp_path / "n.parquet")], str(tmp_path / "o"), tok, progress=False)
    with pytest.raises(DataError, match=r"no column 'body' \(columns: text\)"):
        preprocess([str(tmp_path / "n.parquet")], str(tmp_path / "o"), tok, json_key="body", progress=False)
    whole = gzip.compress(b'{"text": "abc"}\n' * 5000)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut.jsonl.gz:\d+: the compressed stream is damaged or cut short"):
        preprocess([str(tmp_path / "cut.jsonl.gz")], str(tmp_path / "o"), tok, progress=False)
    with pytest.raises(DataError, match="input file not found"):
        list(JsonlReader([str(tmp_path / "nope.jsonl")]))
    with pytest.raises(DataError, match="matches no file"):
        list(JsonlReader([str(tmp_path / "none-*.jsonl")]))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match="unsupported input format"):
        list(JsonlReader([str(tmp_path / "a.csv")]))
    assert not list(tmp_path.glob("o.*"))


def test_truncated_bin_is_detected_on_load(tmp_path, tokenizers, corpus):
    prefix = str(tmp_path / "t")
    preprocess([str(corpus)], prefix, tokenizers["hf"], progress=False)
    full = open_indexed(prefix)
    size = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(DataError) as err:
        open_indexed(prefix)
    bad_doc = int(np.searchsorted(full.sequence_pointers + full.sequence_lengths * 2, size - 1000, side="right"))
    assert f"{prefix}.bin: is {size - 1000:,} bytes but {prefix}.idx describes {size:,} bytes" in str(err.value)
    assert f"truncated from document {bad_doc}" in str(err.value) and "fix: rerun" in str(err.value)
    assert 0 < bad_doc < full.documents
    result = run_cli("data", "inspect", prefix)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {prefix}.bin: is ")
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(40)
    with pytest.raises(DataError, match=r"t.idx: truncated"):
        open_indexed(prefix)


KILL_SCRIPT = """
import sys
from megatron_gpt.config.schema import TokenizerConfig
from megatron_gpt.data.preprocess import preprocess
from megatron_gpt.data.tokenizer import build_tokenizer
preprocess([sys.argv[1]], sys.argv[2], build_tokenizer(TokenizerConfig(type="hf", path=sys.argv[3])), progress=False)
"""


def test_preprocess_killed_midway_leaves_no_complete_looking_index(tmp_path, tokenizers, texts, bpe_json):
    prefix = str(tmp_path / "out")
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": "the old dataset"}])
    preprocess([str(small)], prefix, tokenizers["hf"], progress=False)
    old = {ext: Path(prefix + ext).read_bytes() for ext in (".bin", ".idx")}
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": t} for t in texts * 60])  # ~6 MB: seconds of work
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(big), prefix, str(bpe_json)], env=ENV, cwd=REPO)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        temps = [t for t in leftover_temps(prefix) if ".bin.tmp-" in t]
        if temps and os.path.getsize(temps[0]) > 0:  # it is writing tokens: kill it mid-stream
            break
        time.sleep(0.005)
    assert proc.poll() is None, "preprocess finished before it could be killed; use a bigger corpus"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert {ext: Path(prefix + ext).read_bytes() for ext in (".bin", ".idx")} == old  # old pair untouched, whole
    assert open_indexed(prefix).documents == 1
    leftovers = leftover_temps(prefix)
    assert leftovers and not any(t.endswith(".idx") for t in leftovers)
    for ext in (".bin", ".idx", ".meta.json"):
        os.unlink(prefix + ext)
    with pytest.raises(DataError, match="leftover temp files .* show an interrupted preprocess"):
        open_indexed(prefix)


# --- tokenizers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hf", "gpt2bpe", "tiktoken", "bytes", "embedded"])
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
    assert [list(map(int, ids)) for ids in tok.encode_in_thread(texts)] == [tok.encode(t) for t in texts]
    json.dumps(tok.unique_identifiers)  # megatron-core hashes it


def test_sentencepiece(tokenizers, texts, sp_model):
    sp = tokenizers["sentencepiece"]
    assert (sp.vocab_size, sp.eod, sp.pad) == (500, 2, -1)  # eos </s> ends documents
    for text in texts[:3]:
        ids = sp.encode(text)
        assert ids and all(0 <= i < sp.vocab_size for i in ids) and sp.eod not in ids
        assert sp.decode(ids).split() == text.split()  # SentencePiece normalizes whitespace runs
    assert sp.encode_batch(texts) == [sp.encode(t) for t in texts]
    assert len(sp.encode(texts[0])) < len(texts[0].encode()) / 1.5  # a real subword model, not bytes
    lengths = sp.token_byte_lengths()
    # Whitespace normalization drops bytes, so bits per byte is approximate for SentencePiece.
    assert lengths[sp.eod] == 0 and abs(int(lengths[sp.encode(texts[0])].sum()) / len(texts[0].encode()) - 1) < 0.01


def test_tiktoken_by_name_from_local_files(tmp_path, tokenizers, tiktoken_file, texts):
    g2, tk = tokenizers["gpt2bpe"], tokenizers["tiktoken"]
    assert (tk.eod, tk.vocab_size) == (100257, 100277)  # cl100k_base's specials, from tiktoken itself
    # The same ranks under GPT-2's name (r50k pattern) encode exactly like the gpt2bpe files.
    same = build_tokenizer(TokenizerConfig(type="tiktoken", name="gpt2", path=str(tiktoken_file)))
    assert all(same.encode(t) == g2.encode(t) for t in texts)
    # A directory holding the file under its original name works too.
    assert build_tokenizer(TokenizerConfig(type="tiktoken", name="cl100k_base", path=str(tiktoken_file.parent))
                           ).encode(texts[0]) == tk.encode(texts[0])
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    with pytest.raises(DataError) as err:  # offline and nothing local: say exactly what to provide
        build_tokenizer(TokenizerConfig(type="tiktoken", name="cl100k_base", cache_dir=str(tmp_path)))
    message = str(err.value)
    for words in (url, "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7", "tokenizer.path",
                  f"in {tmp_path} as {cache_name(url)}", "nothing is downloaded"):
        assert words in message
    shutil.copy(tiktoken_file, tmp_path / cache_name(url))  # in the cache but not the real file
    with pytest.raises(DataError, match="cached copy of .* has sha256 .* not the expected"):
        build_tokenizer(TokenizerConfig(type="tiktoken", name="cl100k_base", cache_dir=str(tmp_path)))
    with pytest.raises(DataError, match="not a tiktoken encoding; fix: use one of gpt2, r50k_base"):
        build_tokenizer(TokenizerConfig(type="tiktoken", name="cl200k"))


@pytest.mark.skipif(not SHARED_GPT2.is_dir(), reason="the real GPT-2 files (../shared/tokenizers/gpt2) are absent")
def test_real_gpt2_files_by_type_and_from_a_tiktoken_cache(tmp_path):
    tok = build_tokenizer(TokenizerConfig(
        type="gpt2bpe", vocab_file=str(SHARED_GPT2 / "encoder.json"), merge_file=str(SHARED_GPT2 / "vocab.bpe")))
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eod, tok.pad) == (50257, 50256, -1)
    assert tok.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"
    assert int(tok.token_byte_lengths()[tok.encode("Hello world")].sum()) == 11
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in ("vocab.bpe", "encoder.json"):  # a pre-filled TIKTOKEN_CACHE_DIR, hashes checked
        shutil.copy(SHARED_GPT2 / name, tmp_path / cache_name(base + name))
    by_name = build_tokenizer(TokenizerConfig(type="tiktoken", name="gpt2", cache_dir=str(tmp_path)))
    assert (by_name.encode("Hello world"), by_name.eod, by_name.vocab_size) == ([15496, 995], 50256, 50257)


def test_gpt2bpe_agrees_with_hf_on_the_same_merges(tokenizers, texts):
    hf, g2 = tokenizers["hf"], tokenizers["gpt2bpe"]
    assert g2.vocab_size == hf.vocab_size and g2.eod == hf.vocab_size - 1
    for text in texts:
        hf_pieces = [hf._tok.id_to_token(i) for i in hf.encode(text)]
        g2_pieces = ["".join(BYTE_TO_UNICODE[b] for b in g2._enc.decode_single_token_bytes(i)) for i in g2.encode(text)]
        assert g2_pieces == hf_pieces


def test_tokenizer_errors_name_the_config_key(tmp_path):
    with pytest.raises(DataError, match="tokenizer.path"):
        build_tokenizer(TokenizerConfig(type="hf", path=str(tmp_path / "missing.json")))
    with pytest.raises(DataError, match="tokenizer.path"):
        build_tokenizer(TokenizerConfig(type="sentencepiece"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        build_tokenizer(TokenizerConfig(type="sentencepiece", path=str(tmp_path / "junk.model")))
    (tmp_path / "encoder.json").write_text("{}")
    with pytest.raises(DataError, match="tokenizer.merge_file"):
        build_tokenizer(TokenizerConfig(type="gpt2bpe", vocab_file=str(tmp_path / "encoder.json")))
    with pytest.raises(DataError, match="tokenizer.name is not set"):
        build_tokenizer(TokenizerConfig(type="tiktoken"))
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
    assert sorted(p.name for p in Path(prefix).parent.iterdir()) == [
        ".lock", "text_document.bin", "text_document.idx", "text_document.meta.json"]


# --- command line -------------------------------------------------------------------------------


def test_cli_preprocess_inspect_merge(tmp_path, corpus, tokenizers, capsys):
    from megatron_gpt.cli import data as commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["preprocess", "--input", str(corpus), "--output-prefix", str(tmp_path / "o"),
                              "--tokenizer-type", "bytes", "--no-append-eod", "--quiet", "--json-keys", "text"])
    assert args.func(args) == 0
    assert "tokens/s" in capsys.readouterr().out
    assert len(indexed_dataset(str(tmp_path / "o"))) == 11
    args = parser.parse_args(["preprocess", "--input", str(tmp_path / "missing.jsonl"), "--output-prefix", "x"])
    assert args.func(args) == 2
    assert capsys.readouterr().err.startswith("error: ")

    hf = tokenizers["hf"]
    a, b = tmp_path / "a", tmp_path / "b"
    preprocess([str(corpus)], str(a), hf, progress=False)
    preprocess([str(write_jsonl(tmp_path / "b.jsonl", [{"text": "second part"}, {"text": "and more"}]))],
               str(b), hf, progress=False)
    result = run_cli("data", "inspect", str(a), "--document", "1", "--tokens", "12")
    assert result.returncode == 0, result.stderr
    assert f"{a}: 11 documents, 11 sequences, {open_indexed(str(a)).tokens:,} tokens, dtype uint16" in result.stdout
    assert repr(hf.decode(hf.encode(json.loads(corpus.read_text().splitlines()[1])["text"])[:12])) in result.stdout

    args = parser.parse_args(["data", "merge", str(tmp_path / "m"), str(a), str(b)])
    assert args.func(args) == 0 and "13 documents" in capsys.readouterr().out
    merged, parts = indexed_dataset(str(tmp_path / "m")), [indexed_dataset(str(a)), indexed_dataset(str(b))]
    assert [merged[i].tolist() for i in range(13)] == [p[i].tolist() for p in parts for i in range(len(p))]
    assert list(merged.document_indices) == list(range(14))
    c = tmp_path / "c"
    preprocess([str(tmp_path / "b.jsonl")], str(c), tokenizers["tiktoken"], progress=False)
    with pytest.raises(DataError, match="dtype int32 differs"):
        merge(str(tmp_path / "bad"), [str(a), str(c)])
    preprocess([str(tmp_path / "b.jsonl")], str(c), tokenizers["bytes"], progress=False)
    with pytest.raises(DataError, match="fix: merge only datasets preprocessed with the same tokenizer"):
        merge(str(tmp_path / "bad"), [str(a), str(c)])


def test_neox_wrapper(tmp_path, gpt2_files, tokenizers, texts):
    spec = importlib.util.spec_from_file_location("neox_preprocess", REPO / "tools/preprocess_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    vocab, merge_file = gpt2_files
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t, "title": t[:30]} for t in texts])
    rc = module.main(["--input", f"{src},{src}", "--output-prefix", str(tmp_path / "neox"), "--jsonl-keys", "text",
                      "title", "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab),
                      "--merge-file", str(merge_file), "--append-eod", "--dataset-impl", "mmap", "--quiet"])
    assert rc == 0
    tok = tokenizers["gpt2bpe"]
    for key, cut in (("text", None), ("title", 30)):
        ds = indexed_dataset(str(tmp_path / f"neox_{key}_document"))
        assert len(ds) == 22 and ds[1].tolist() == tok.encode(texts[1][:cut]) + [tok.eod]


def test_commands_import_is_light():
    code = "import sys, megatron_gpt.cli.data; assert not {'torch', 'megatron', 'deepspeed'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    from megatron_gpt.cli import data as commands
    from megatron_gpt.data import tokenizer

    assert commands.TOKENIZER_TYPES == tokenizer.TOKENIZER_TYPES


def test_preprocess_does_not_import_torch_or_megatron(tmp_path, corpus):
    """Start-up is part of preprocessing's speed: torch + megatron-core take seconds to import."""
    code = ("import sys; from megatron_gpt.cli.data import run_preprocess; from megatron_gpt.cli import main; "
            f"main(['preprocess', '--input', {str(corpus)!r}, '--output-prefix', {str(tmp_path / 'o')!r}, "
            "'--tokenizer-type', 'embedded', '--quiet']); "
            "assert not {'torch', 'megatron'} & set(sys.modules), 'heavy import'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env=ENV, capture_output=True)
    assert open_indexed(str(tmp_path / "o")).documents == 11


def test_package_never_reads_shared_dir():
    for path in (REPO / "megatron_gpt/data").rglob("*.py"):
        assert "/work/shared" not in path.read_text() and "../shared" not in path.read_text(), path


def test_bench_smoke(tmp_path):
    """bench/preprocess.py end to end on a 1 MB corpus: one summary line with both rates."""
    result = subprocess.run([sys.executable, str(REPO / "bench/preprocess.py"), "--size-mb", "1", "--runs", "1",
                             "--workdir", str(tmp_path)], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("preprocess bench:") and "tokens/s end to end" in summary and "x the baseline" in summary
    digest = hashlib.sha256((tmp_path / "out.bin").read_bytes()).hexdigest()
    assert digest == hashlib.sha256((tmp_path / "baseline.bin").read_bytes()).hexdigest()  # same tokens


def test_files_are_byte_identical_to_megatron_cores_writer(tmp_path, tokenizers, corpus):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    preprocess([str(corpus)], str(tmp_path / "ours"), tokenizers["hf"], progress=False)
    ours = indexed_dataset(str(tmp_path / "ours"))
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for i in range(len(ours)):
        builder.add_document(torch.from_numpy(ours[i].astype(np.int64)), [len(ours[i])])
    builder.finalize(str(tmp_path / "theirs.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes(), ext


@pytest.mark.parametrize("eod", ["<|end_of_text|>", "</s>"])
def test_hf_tokenizer_without_endoftext_ends_documents_with_its_own_eod(tmp_path, eod):
    """Llama 3's tokenizer.json has <|end_of_text|> (no <|endoftext|>); Llama 2's and Mistral's </s>."""
    from tokenizers import Tokenizer as HFTok, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["to be or not to be"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", eod], show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    built = build_tokenizer(TokenizerConfig(type="hf", path=str(tmp_path / "tokenizer.json")))
    assert built.eod == tok.token_to_id(eod) == 1
    assert 1 not in built.encode(f"a literal {eod} inside a document stays text")
