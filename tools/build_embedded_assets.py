"""Regenerate the embedded corpus assets deterministically from a shakespeare.jsonl.

    python tools/build_embedded_assets.py --source ../shared/data/shakespeare.jsonl

Writes megatron_gpt/data/assets/shakespeare.jsonl.xz (an xz copy of the source bytes) and
shakespeare-bpe.json (byte-level BPE trained on the `text` fields). Same source, same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
try:
    import megatron_gpt  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

from megatron_gpt.data.reader import JsonlReader  # noqa: E402
from megatron_gpt.data.train_tokenizer import atomic_write_bytes, train_tokenizer  # noqa: E402

ASSETS = REPO_ROOT / "megatron_gpt" / "data" / "assets"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="shakespeare.jsonl (one {title, text} object per line)")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size incl. <|endoftext|>")
    p.add_argument("--name", default="shakespeare", help="asset name: NAME.jsonl.xz and NAME-bpe.json")
    p.add_argument("--out-dir", default=str(ASSETS), help="where the assets go")
    args = p.parse_args(argv)

    out = Path(args.out_dir)
    source = Path(args.source).read_bytes()
    docs = sum(1 for _ in JsonlReader([args.source]))  # validates every line before writing anything
    # Extreme preset: smallest file; xz output has no timestamps, so it is byte-for-byte reproducible.
    corpus = lzma.compress(source, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9 | lzma.PRESET_EXTREME)
    corpus_path = out / f"{args.name}.jsonl.xz"
    atomic_write_bytes(str(corpus_path), corpus)
    tok_path = out / f"{args.name}-bpe.json"
    train_tokenizer([args.source], str(tok_path), args.vocab_size)
    for path in (corpus_path, tok_path):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        print(f"{path}: {path.stat().st_size:,} bytes sha256 {digest}")
    print(f"{docs} documents, {len(source):,} source bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
