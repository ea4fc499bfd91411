"""`megatron-gpt eval CHECKPOINT --tasks ...`: argument parsing; the scoring is
inference.lm_eval_adapter's."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_gpt.inference.eval_tasks import BUNDLED_TASKS


def _parse_limit(text: str | None) -> int | float | None:
    if text is None:
        return None
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value


def _run(args: argparse.Namespace) -> int:
    import warnings

    warnings.filterwarnings("ignore", module="megatron")  # import-time notices about optional deps
    from megatron_gpt.checkpoint.reader import CheckpointError

    try:
        from megatron_gpt.inference.lm_eval_adapter import UnknownTaskError, evaluate_checkpoint, write_json_atomic
    except ImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    for path in args.include_path:
        if not Path(path).is_dir():
            print(f"error: --include-path {path}: not a directory of lm-eval task YAMLs", file=sys.stderr)
            return 2
    try:
        results = evaluate_checkpoint(
            args.checkpoint, tasks, args.include_path, tag=args.tag, limit=_parse_limit(args.limit),
            batch_size=args.batch_size, num_fewshot=args.num_fewshot, bootstrap_iters=args.bootstrap_iters,
            log_samples=args.log_samples, tokenizer=args.tokenizer)
    except (CheckpointError, UnknownTaskError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from lm_eval.utils import make_table

    print(make_table(results))
    if args.output:
        write_json_atomic(Path(args.output), results)
        print(f"results: {args.output}")
    return 0


def register(subparsers) -> None:
    """Add `megatron-gpt eval` to the CLI."""
    parser = subparsers.add_parser(
        "eval", help="score a checkpoint on lm-eval-harness tasks (needs the eval extra)",
        description="Load a checkpoint saved under any layout as one model and run lm-eval-harness tasks on it. "
                    f"Bundled tasks ({BUNDLED_TASKS}): shakespeare_next_line (multiple choice), "
                    "shakespeare_ppl (perplexity), shakespeare_complete (generation).")
    parser.add_argument("checkpoint", help="checkpoint.save_dir of a run (uses `latest`) or one global_step* folder")
    parser.add_argument("--tag", help="checkpoint tag to load, e.g. global_step1000 (default: `latest`)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file to use instead of the copy saved in the checkpoint (gpt2bpe: a folder with encoder.json and vocab.bpe)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task (or group) names")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="a folder of lm-eval task YAMLs to add (repeatable)")
    parser.add_argument("--limit", help="score only the first N documents of each task (a fraction < 1: that "
                                         "share); default: every document")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    parser.add_argument("--bootstrap-iters", type=int, default=1000,
                        help="bootstrap resamples for the standard errors of non-mean metrics (default 1000)")
    parser.add_argument("--log-samples", action="store_true", help="include every scored document in the output")
    parser.add_argument("--output", help="write the results as JSON to this file (written atomically)")
    parser.set_defaults(func=_run)
