"""Checkpoint conversion: Hugging Face export and import.

- `names`: the canonical (layout-independent) parameter names of our GPT, `{spec position}.{name}`
  or `tied.{key}.{name}`, and where each part of the model sits in the spec list.
- `neox`, `llama`: one state-dict adapter per Hugging Face architecture (GPTNeoXForCausalLM,
  LlamaForCausalLM), torchtitan style: pure functions between our canonical state dict and the HF
  state dict, plus the config mapping; an option the HF class cannot express is an
  :class:`UnsupportedOption` error.
- `hf`: `export-hf` (any checkpoint -> safetensors, config.json, generation_config.json and the
  tokenizer files) and `import-hf` (an HF folder -> a one-shard checkpoint in megatron_gpt.checkpoint's sharded format plus a
  config; `megatron-gpt train` initializes from it in any layout).

transformers and safetensors (the `hf` extra) are imported only by `hf` and the adapters' config
functions, never by training.
"""

from megatron_gpt.convert.adapter import UnsupportedOption

__all__ = ["UnsupportedOption"]
