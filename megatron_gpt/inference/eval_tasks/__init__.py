"""lm-eval-harness task YAMLs and their small local data, bundled for `megatron-gpt eval`."""

from pathlib import Path

BUNDLED_TASKS = Path(__file__).resolve().parent
