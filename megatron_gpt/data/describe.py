"""`megatron-gpt data inspect PREFIX`: what an indexed dataset holds, with a decoded sample."""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from megatron_gpt.data.errors import DataError
from megatron_gpt.data.indexed import META_SUFFIX, open_indexed, read_meta


def _tokenizer(meta: Optional[dict[str, Any]], config: Any) -> tuple[Any, str]:
    """(tokenizer or None, where it came from / why there is none)."""
    from megatron_gpt.config.schema import TokenizerConfig
    from megatron_gpt.data.tokenizer import build_tokenizer

    if config is None and (meta is None or "tokenizer" not in meta):
        return None, f"no {META_SUFFIX} and no --tokenizer-type given, so ids are shown undecoded"
    source = "--tokenizer-* arguments" if config is not None else META_SUFFIX
    try:
        return build_tokenizer(config if config is not None else TokenizerConfig(**meta["tokenizer"])), source
    except (DataError, ValueError) as e:
        return None, f"the tokenizer from {source} does not load ({e})"


def describe(prefix: str, document: int = 0, tokens: int = 64, tokenizer_config: Any = None) -> str:
    """A few lines: counts, dtype, sizes, the tokenizer, and document `document` decoded."""
    index = open_indexed(prefix, key="PREFIX")
    meta = read_meta(prefix)
    lengths = np.asarray(index.sequence_lengths)
    doc_lengths = np.add.reduceat(lengths, index.document_indices[:-1]) if len(lengths) else lengths
    lines = [
        f"{prefix}: {index.documents:,} documents, {len(lengths):,} sequences, {index.tokens:,} tokens, "
        f"dtype {index.dtype}",
        f"files: {os.path.getsize(prefix + '.bin') / 1e6:,.1f} MB .bin, {os.path.getsize(prefix + '.idx') / 1e6:,.1f} MB .idx",
    ]
    if len(doc_lengths):
        lines.append(f"tokens per document: min {doc_lengths.min():,}, mean {doc_lengths.mean():,.1f}, "
                     f"max {doc_lengths.max():,}")
    if meta is not None:
        lines.append(f"made by: {meta.get('format', '?')} from {len(meta.get('inputs', meta.get('merged_from', [])))} "
                     f"input(s), key {meta.get('json_key', '-')!r}, append_eod {meta.get('append_eod')}, "
                     f"{meta.get('skipped_empty', 0):,} empty skipped")
    if not 0 <= document < index.documents:
        raise DataError(f"{prefix}.idx: --document {document} is outside 0..{index.documents - 1}; "
                        "fix: pick an existing document")
    ids = index.document(document)
    tokenizer, source = _tokenizer(meta, tokenizer_config)
    shown = ids[:tokens]
    more = f" (first {len(shown)} of {len(ids):,})" if len(ids) > len(shown) else ""
    lines.append(f"document {document}{more}: ids {shown.tolist()}")
    if tokenizer is None:
        lines.append(f"(not decoded: {source})")
    else:
        lines.append(f"decoded with the tokenizer from {source}:")
        lines.append(repr(tokenizer.decode(shown)))
    return "\n".join(lines)
