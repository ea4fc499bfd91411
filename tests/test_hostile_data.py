"""Damaged and careless data input (issue 17): preprocess workers die with their parent, one huge
document preprocesses in bounded memory (and to the same tokens as in one piece), an empty corpus
is an error, and every damaged .idx is one error naming the file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = Path("/work/shared/data/shakespeare.jsonl")


def corpus_text() -> str:
    if SHAKESPEARE.exists():
        return "\n".join(json.loads(line)["text"] for line in SHAKESPEARE.read_text().splitlines())
    from megatron_gpt.data.embedded import prepare_embedded  # noqa: F401 (the corpus ships with the package)

    pytest.skip("no corpus")


def preprocess_cmd(inputs: list[Path], prefix: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_gpt", "preprocess", "--input", *map(str, inputs),
            "--output-prefix", str(prefix), "--tokenizer-type", "embedded", "--quiet", *extra]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_preprocess_workers_die_with_their_parent(tmp_path, sig):
    text = corpus_text()
    big = tmp_path / "big.jsonl"
    with big.open("w") as f:
        for i in range(12):
            f.write(json.dumps({"text": text}) + "\n")
    child = subprocess.Popen(preprocess_cmd([big], tmp_path / "out", "--workers", "2"), env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(child.pid)
    deadline = time.time() + 60
    while len(parent.children(recursive=True)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    workers = parent.children(recursive=True)
    assert len(workers) >= 2, "the pool never started"
    child.send_signal(sig)
    child.wait(timeout=10)
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, f"left behind after {sig.name}: {[p.pid for p in alive]}"
    if sig == signal.SIGTERM:  # a clean stop: nothing half-written left behind
        assert not list(tmp_path.glob("out*")), list(tmp_path.glob("out*"))


def peak_tree_rss(process: subprocess.Popen) -> int:
    """Peak of the summed resident memory of a process and its children, polled every 50 ms."""
    peak, root = 0, psutil.Process(process.pid)
    while process.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs))
        except psutil.Error:
            pass
        time.sleep(0.05)
    return peak


@pytest.mark.slow
def test_a_200_mb_single_document_stays_within_the_memory_bound(tmp_path):
    text = corpus_text()
    big = tmp_path / "one.txt"
    with big.open("w") as f:
        while f.tell() < 200_000_000:
            f.write(text)
    size = big.stat().st_size
    started = time.time()
    child = subprocess.Popen(preprocess_cmd([big], tmp_path / "out", "--workers", "2"), env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = peak_tree_rss(child)
    out, err = child.communicate()
    assert child.returncode == 0, err[-3000:]
    print(f"{size / 1e6:.0f} MB single document: peak RSS (all processes) {peak / 2**30:.2f} GiB, "
          f"{time.time() - started:.0f} s; {out.strip()}")
    assert peak < 2 * 2**30
    from megatron_gpt.data.indexed import open_indexed

    index = open_indexed(str(tmp_path / "out"))
    assert index.documents == 1 and index.tokens > size / 8


def test_pieces_give_the_same_tokens_as_one_document(tmp_path, monkeypatch):
    from megatron_gpt.config.schema import TokenizerConfig
    from megatron_gpt.data import preprocess as pre, reader
    from megatron_gpt.data.tokenizer import build_tokenizer

    text = corpus_text()[:3_000_000]
    doc = tmp_path / "doc.txt"
    doc.write_text(text)
    jsonl = tmp_path / "doc.jsonl"
    jsonl.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "short one"}) + "\n")
    tokenizer = build_tokenizer(TokenizerConfig(type="embedded"))
    pre.preprocess([str(doc)], str(tmp_path / "whole"), tokenizer, progress=False)
    pre.preprocess([str(jsonl)], str(tmp_path / "whole_jsonl"), tokenizer, progress=False)
    monkeypatch.setattr(reader, "PIECE_CHARS", 20_000)
    monkeypatch.setattr(pre, "PIECE_CHARS", 20_000)
    for workers in (1, 2):
        pre.preprocess([str(doc)], str(tmp_path / f"pieces{workers}"), tokenizer, progress=False, workers=workers)
        pre.preprocess([str(jsonl)], str(tmp_path / f"pieces_jsonl{workers}"), tokenizer, progress=False,
                       workers=workers)
        for whole, pieces in (("whole", f"pieces{workers}"), ("whole_jsonl", f"pieces_jsonl{workers}")):
            for suffix in (".bin", ".idx"):
                assert (tmp_path / (whole + suffix)).read_bytes() == (tmp_path / (pieces + suffix)).read_bytes()


def test_an_empty_corpus_is_an_error_unless_allowed(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    done = subprocess.run(preprocess_cmd([empty], tmp_path / "out"), env=env(), capture_output=True, text=True)
    assert done.returncode != 0 and "no non-empty document" in done.stderr and "--allow-empty" in done.stderr
    assert not list(tmp_path.glob("out*")), "something was written"
    done = subprocess.run(preprocess_cmd([empty], tmp_path / "out", "--allow-empty"), env=env(), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr


def test_each_damaged_index_is_one_error_naming_the_file(tmp_path):
    from megatron_gpt.data.errors import DataError
    from megatron_gpt.data.indexed import HEADER_BYTES, open_indexed

    docs = tmp_path / "d.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document number {i} " * (i + 1)}) + "\n" for i in range(6)))
    done = subprocess.run(preprocess_cmd([docs], tmp_path / "good"), env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    good = tmp_path / "good"
    raw = (good.with_suffix(".idx")).read_bytes()
    sequences = struct.unpack("<Q", raw[HEADER_BYTES - 16:HEADER_BYTES - 8])[0]
    lengths_at, pointers_at = HEADER_BYTES, HEADER_BYTES + 4 * sequences
    docs_at = pointers_at + 8 * sequences

    def damaged(name: str, offset: int, value: bytes) -> Path:
        prefix = tmp_path / name
        shutil.copy(good.with_suffix(".bin"), prefix.with_suffix(".bin"))
        data = bytearray(raw)
        data[offset:offset + len(value)] = value
        prefix.with_suffix(".idx").write_bytes(bytes(data))
        return prefix

    cases = {
        "negative_length": (lengths_at + 4 * 2, struct.pack("<i", -5), "negative length"),
        "pointer_past_end": (pointers_at + 8 * 3, struct.pack("<q", 10**9), "points at byte 1,000,000,000"),
        "pointer_backwards": (pointers_at + 8 * 4, struct.pack("<q", 2), "pointers out of order"),
        "documents_backwards": (docs_at + 8 * 3, struct.pack("<q", 1), "goes backwards"),
    }
    for name, (offset, value, message) in cases.items():
        prefix = damaged(name, offset, value)
        with pytest.raises(DataError) as caught:
            open_indexed(str(prefix))
        assert f"{prefix}.idx" in str(caught.value) and message in str(caught.value), (name, str(caught.value))
        done = subprocess.run([sys.executable, "-m", "megatron_gpt", "data", "inspect", str(prefix)], env=env(),
                              capture_output=True, text=True)
        assert done.returncode != 0 and done.stderr.strip().count("\n") == 0 and f"{prefix}.idx" in done.stderr, (
            name, done.stderr)
    assert open_indexed(str(good)).documents == 6 and np.all(open_indexed(str(good)).sequence_lengths > 0)
