"""Preprocessing throughput: end-to-end tokens/s of `megatron-gpt preprocess` with GPT-2 BPE.

    python bench/preprocess.py                 # 20 MB corpus, 2 workers, best and first of 3 runs
    python bench/preprocess.py --size-mb 1 --runs 1

Builds a JSONL corpus from ../shared/data/shakespeare.jsonl (the embedded corpus when ../shared
is absent): Shakespeare cut into ~2 KB documents, repeated until --size-mb (20 MB = 4 copies).
Each measurement is a fresh `python -m megatron_gpt preprocess` process, so interpreter start-up,
imports and tokenizer loading count. The baseline, measured in the same run on the same corpus
and tokenizer, is the naive loop: one process, one document at a time (json.loads, tiktoken
encode_ordinary, write), also a fresh process. Both write the same tokens (checked). Prints
one summary line last.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}

BASELINE = r"""
import json, sys
import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str
corpus, vocab, merges, out = sys.argv[1:5]
encoder = json.load(open(vocab, encoding="utf-8"))
ranks = data_gym_to_mergeable_bpe_ranks(merges, vocab)
eod = encoder["<|endoftext|>"]
enc = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": eod})
tokens = 0
with open(corpus, encoding="utf-8") as f, open(out, "wb") as o:
    for line in f:
        ids = enc.encode_ordinary(json.loads(line)["text"]) + [eod]
        o.write(np.array(ids, dtype=np.uint16).tobytes())
        tokens += len(ids)
print(tokens)
"""


def source_texts() -> tuple[list[str], str]:
    shared = SHARED / "data" / "shakespeare.jsonl"
    if shared.is_file():
        with open(shared, encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f], str(shared)
    sys.path.insert(0, str(REPO))
    from megatron_gpt.data.embedded import embedded_corpus_path

    path = embedded_corpus_path("shakespeare")
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f], f"{path} (../shared absent)"


def build_corpus(path: Path, size_mb: float) -> int:
    """~2 KB documents of the source, repeated until `size_mb`; returns the document count."""
    texts, _ = source_texts()
    chunks = [t[i:i + 2000] for t in texts for i in range(0, len(t), 2000)]
    target, written, documents = int(size_mb * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            for chunk in chunks:
                line = json.dumps({"text": chunk}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode())
                documents += 1
                if written >= target:
                    break
    return documents


def gpt2_files(workdir: Path) -> tuple[str, str, str]:
    """(encoder.json, vocab.bpe, where from): the real GPT-2 files, else ones exported from the
    embedded BPE (a smaller vocabulary, so more tokens per byte)."""
    shared = SHARED / "tokenizers" / "gpt2"
    if (shared / "encoder.json").is_file():
        return str(shared / "encoder.json"), str(shared / "vocab.bpe"), str(shared)
    sys.path.insert(0, str(REPO))
    from megatron_gpt.data.gpt2_files import write_gpt2_files
    from megatron_gpt.data.tokenizer import EMBEDDED_TOKENIZER_PATH

    vocab, merges = write_gpt2_files(str(EMBEDDED_TOKENIZER_PATH), str(workdir / "gpt2"))
    return vocab, merges, "the embedded BPE exported as GPT-2 files (../shared absent)"


def timed(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the child, its stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stdout}{done.stderr}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return seconds, cpu, done.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=20.0, help="corpus size (default: 20)")
    p.add_argument("--workers", type=int, default=2, help="preprocess --workers (default: 2)")
    p.add_argument("--runs", type=int, default=3, help="preprocess runs; best and first are reported (default: 3)")
    p.add_argument("--workdir", help="keep the corpus and outputs here (default: a temp dir)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus = work / "corpus.jsonl"
        documents = build_corpus(corpus, args.size_mb)
        vocab, merges, tokenizer_source = gpt2_files(work)
        mb = corpus.stat().st_size / 1e6
        command = [sys.executable, "-m", "megatron_gpt", "preprocess", "--input", str(corpus),
                   "--output-prefix", str(work / "out"), "--tokenizer-type", "gpt2bpe", "--vocab-file", vocab,
                   "--merge-file", merges, "--workers", str(args.workers), "--quiet"]
        load = os.getloadavg()[0]
        runs = [timed(command) for _ in range(args.runs)]
        tokens = int(runs[0][2].split(" documents, ")[1].split(" tokens")[0].replace(",", ""))
        base_seconds, base_cpu, base_out = timed([sys.executable, "-c", BASELINE, str(corpus), vocab, merges,
                                                  str(work / "baseline.bin")])
        if int(base_out) != tokens or (work / "baseline.bin").read_bytes() != (work / "out.bin").read_bytes():
            sys.exit("the baseline and preprocess wrote different tokens")
        seconds = [s for s, _, _ in runs]
        best, median = min(seconds), statistics.median(seconds)
        rate, baseline = tokens / median, tokens / base_seconds
        print(f"corpus: {mb:.1f} MB, {documents:,} documents of ~2 KB from {source_texts()[1]}; "
              f"tokenizer: {tokenizer_source}; load average before: {load:.2f}; runs: "
              + ", ".join(f"{s:.2f} s ({c:.2f} CPU-s)" for s, c, _ in runs)
              + f"; baseline {base_seconds:.2f} s ({base_cpu:.2f} CPU-s)")
        print(f"preprocess bench: {tokens:,} tokens, {args.workers} workers: {rate:,.0f} tokens/s end to end "
              f"(median of {len(seconds)}, start-up included; best {tokens / best:,.0f}, first {tokens / seconds[0]:,.0f}, "
              f"{mb / median:.1f} MB/s) vs baseline naive one-document loop {baseline:,.0f} tokens/s: "
              f"{rate / baseline:.2f}x the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
