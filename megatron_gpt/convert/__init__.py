"""Checkpoint conversion: Hugging Face export/import and the layout-independent checkpoint format.

- `names`: the canonical (layout-independent) parameter names of our GPT, `{spec position}.{name}`
  or `tied.{key}.{name}`, and where each part of the model sits in the spec list.
- `neox`, `llama`: one state-dict adapter per Hugging Face architecture (GPTNeoXForCausalLM,
  LlamaForCausalLM), torchtitan style: pure functions between our canonical state dict and the HF
  state dict, plus the config mapping; an option the HF class cannot express is an
  :class:`UnsupportedOption` error.
- `universal`: a checkpoint that does not depend on the tensor/pipeline/data layout (full
  tensors under canonical names, optionally with AdamW states), written beside every DeepSpeed
  checkpoint and by `import-hf`; `megatron-gpt train` resumes or initializes from it in any layout.
- `hf`: `export-hf` (any checkpoint -> safetensors, config.json, generation_config.json and the
  tokenizer files) and `import-hf` (an HF folder -> a universal checkpoint plus a config).

transformers and safetensors (the `hf` extra) are imported only by `hf` and the adapters' config
functions, never by training.
"""

from megatron_gpt.convert.adapter import UnsupportedOption

__all__ = ["UnsupportedOption"]
