"""`megatron-gpt export-hf` and `megatron-gpt import-hf`."""

from __future__ import annotations

import argparse
import os

from megatron_gpt.cli.guard import expected
from megatron_gpt.data.errors import DataError


# Expected failures: unsupported options, missing files, bad checkpoints (CheckpointError is a ValueError).
@expected(ValueError, FileNotFoundError, DataError)
def run_export(args: argparse.Namespace) -> int:
    from megatron_gpt.convert.hf import export_hf

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach for the hub
    export_hf(args.checkpoint, args.out, arch=args.arch, dtype=args.dtype, tag=args.tag,
              max_shard_size=args.max_shard_size, vocab_size=args.vocab_size, tokenizer=not args.no_tokenizer,
              tokenizer_file=args.tokenizer)
    return 0


@expected(ValueError, FileNotFoundError, DataError)
def run_import(args: argparse.Namespace) -> int:
    from megatron_gpt.convert.hf import import_hf

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import_hf(args.hf_dir, args.out, tensor=args.tensor, pipeline=args.pipeline, tokenizer=args.tokenizer)
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint.save_dir (uses `latest`), a global_step* folder, or an "
                                           "import-hf / layout-independent folder")
    parser.add_argument("out", help="folder to write the Hugging Face model into")
    parser.add_argument("--arch", choices=["neox", "llama", "gpt2"], default=None,
                        help="GPTNeoXForCausalLM, LlamaForCausalLM or GPT2LMHeadModel (default: from "
                             "model.norm/activation/position_embedding)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weight dtype (default fp32)")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step1000 (default: `latest`)")
    parser.add_argument("--max-shard-size", default="5GB", help="split safetensors above this size (default 5GB)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="embedding rows to keep (default: the tokenizer's vocabulary; the rest is padding)")
    parser.add_argument("--no-tokenizer", action="store_true", help="do not write tokenizer files")
    parser.add_argument("--tokenizer", default=None, help="tokenizer file to use instead of the copy saved in the checkpoint (gpt2bpe: a folder with encoder.json and vocab.bpe)")


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="a GPTNeoX, Llama or GPT-2 folder (config.json, safetensors or pytorch_model.bin)")
    parser.add_argument("out", help="folder for the layout-independent checkpoint and config.yml")
    parser.add_argument("--tensor", type=int, default=1, help="tensor-parallel size written into config.yml")
    parser.add_argument("--pipeline", type=int, default=1, help="pipeline-parallel size written into config.yml")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json, or a folder with tokenizer.json or vocab.json + merges.txt "
                             "(default: HF_DIR)")


def register(subparsers) -> None:
    export = subparsers.add_parser("export-hf", help="write a checkpoint (any layout) as a Hugging Face model")
    add_export_arguments(export)
    export.set_defaults(func=run_export)
    imp = subparsers.add_parser("import-hf", help="turn a Hugging Face GPTNeoX/Llama/GPT-2 model into a checkpoint to train")
    add_import_arguments(imp)
    imp.set_defaults(func=run_import)
