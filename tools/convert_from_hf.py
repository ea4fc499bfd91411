"""Import a Hugging Face GPTNeoX or Llama model as a checkpoint `megatron-gpt train` starts from.

    python tools/convert_from_hf.py hf/llama imported/llama --tensor 2 --pipeline 2
    megatron-gpt train imported/llama/config.yml my-data.yml --set launcher.nproc_per_node=4

Writes a layout-independent checkpoint (loaded into any tensor/pipeline layout through
`checkpoint.init_from`), the tokenizer.json and config.yml. The same feature is `megatron-gpt import-hf`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import megatron_gpt  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_gpt.cli import convert as commands  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands.add_import_arguments(parser)
    return commands.run_import(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
