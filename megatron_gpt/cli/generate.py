"""`megatron-gpt generate CHECKPOINT`: sample from a checkpoint saved under any layout from a prompt,
a file of prompts, or interactively. Argument parsing only; inference.generate completes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _generate(args: argparse.Namespace) -> int:
    from megatron_gpt.checkpoint.reader import load_checkpoint
    from megatron_gpt.inference.generate import Completer, read_prompts
    from megatron_gpt.model.sampling import SamplingOptions

    try:
        prompts = read_prompts(args.prompt_file) if args.prompt_file else []
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from megatron_gpt.checkpoint import CheckpointError

    try:
        loaded = load_checkpoint(args.checkpoint, args.tag, args.tokenizer)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    options = SamplingOptions(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=tuple(args.stop),
        stop_ids=() if args.no_stop_at_eod else (loaded.tokenizer.eod,), seed=args.seed)
    complete = Completer(loaded, options, use_cache=not args.no_cache)

    if args.prompt_file:
        output = Path(args.output or Path(args.prompt_file).with_suffix(".completions.jsonl"))
        complete.write_completions(prompts, output)
        print(f"wrote {len(prompts)} completions to {output}")
    elif args.prompt is not None:
        print(args.prompt + complete(args.prompt))
    else:  # interactive: one prompt per line until end of input
        print(f"step {loaded.step} checkpoint; one prompt per line, Ctrl-D to quit", file=sys.stderr)
        for line in sys.stdin:
            print(line.rstrip("\n") + complete(line.rstrip("\n")), flush=True)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="sample text from a checkpoint (any tp/pp layout)")
    parser.add_argument("checkpoint", help="checkpoint.save_dir of a run (or one global_step* folder in it)")
    parser.add_argument("--tag", default=None, help="which global_stepN to load (default: `latest`)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file to use instead of the copy saved in the checkpoint (gpt2bpe: a folder with encoder.json and vocab.bpe)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", default=None, help="one prompt (default: read prompts from stdin)")
    source.add_argument("--prompt-file", default=None, help=".jsonl with {\"prompt\": ...} lines, or .txt lines")
    parser.add_argument("--output", default=None, help="completions JSONL for --prompt-file")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    parser.add_argument("--top-k", type=int, default=50, help="0 disables")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--no-stop-at-eod", action="store_true", help="keep going past end-of-document")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute the context every step (no KV cache)")
    parser.set_defaults(func=_generate)
