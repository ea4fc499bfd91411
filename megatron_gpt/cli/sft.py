"""`megatron-gpt preprocess-sft`: conversations and prompt/completion pairs -> an indexed dataset
plus its per-token loss mask (megatron_gpt.data.sft)."""

from __future__ import annotations

import argparse
import os
import time

from megatron_gpt.cli.data import add_tokenizer_args, tokenizer_from_args
from megatron_gpt.cli.guard import expected
from megatron_gpt.data.errors import DataError


@expected(DataError, FileNotFoundError)
def run_preprocess_sft(args: argparse.Namespace) -> int:
    """Tokenize SFT JSONL (`messages` through the chat template, or `prompt`/`completion`) into
    PREFIX.bin/.idx and PREFIX.loss_mask.bin/.idx (1 on the tokens trained: assistant turns, completions)."""
    from megatron_gpt.data.sft import ChatTemplate, mask_prefix, preprocess_sft

    started = time.perf_counter()
    tokenizer = tokenizer_from_args(args)
    config = args.tokenizer_config
    if config is None and args.tokenizer_path:
        config = os.path.join(os.path.dirname(os.path.abspath(args.tokenizer_path)), "tokenizer_config.json")
    template = ChatTemplate.load(args.chat_template, config)
    counts = preprocess_sft(args.input, args.output_prefix, tokenizer, template, append_eod=args.append_eod)
    print(f"{args.output_prefix}.{{bin,idx}} + {mask_prefix(args.output_prefix)}.{{bin,idx}}: {counts['examples']:,} "
          f"examples, {counts['tokens']:,} tokens, {counts['trained_tokens']:,} trained "
          f"({100 * counts['trained_tokens'] / max(counts['tokens'], 1):.1f}%), {time.perf_counter() - started:.1f} s")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("preprocess-sft", help="tokenize SFT conversations / prompt-completion pairs with a loss mask",
                              description=run_preprocess_sft.__doc__)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help='.jsonl(.gz/.xz/.zst) files or globs: {"messages": [{"role", "content"}...]} or '
                        '{"prompt", "completion"} per line')
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx, PREFIX.loss_mask.bin/.idx, PREFIX.meta.json")
    p.add_argument("--chat-template", default=None, metavar="FILE.jinja",
                   help="Jinja chat template (default: chat_template of --tokenizer-config)")
    p.add_argument("--tokenizer-config", default=None, metavar="JSON",
                   help="tokenizer_config.json holding chat_template, bos/eos (default: beside --tokenizer-path)")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="end every example with the end-of-document token (default: on)")
    add_tokenizer_args(p)
    p.set_defaults(func=run_preprocess_sft)
