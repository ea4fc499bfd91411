"""Hugging Face conversion: state-dict adapters and the export/import commands' domain code.

- `adapter`: the interface every architecture adapter implements (a typing.Protocol) and
  :class:`UnsupportedOption`, raised for an option the HF class cannot express.
- `neox`, `llama`, `gpt2`: one adapter per Hugging Face architecture (GPTNeoXForCausalLM,
  LlamaForCausalLM, GPT2LMHeadModel),
  torchtitan style: pure functions between our canonical state dict (model.names) and the HF state
  dict, plus the config mapping.
- `hf`: `export-hf` (any checkpoint, read by checkpoint.reader -> safetensors, config.json,
  generation_config.json and the tokenizer files) and `import-hf` (an HF folder -> a one-shard
  checkpoint in megatron_gpt.checkpoint's sharded format plus a config; `megatron-gpt train`
  initializes from it in any layout).

transformers and safetensors (the `hf` extra) are imported only by `hf` and the adapters' config
functions, never by training.
"""

from megatron_gpt.convert.adapter import UnsupportedOption

__all__ = ["UnsupportedOption"]
