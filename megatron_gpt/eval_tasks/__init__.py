"""lm-eval-harness task YAMLs and their small local data, bundled for `megatron-gpt eval`."""
