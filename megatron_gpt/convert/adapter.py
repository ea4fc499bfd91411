"""The interface every Hugging Face architecture adapter implements (neox, llama, gpt2), torchtitan style:
pure functions between our canonical state dict and the HF one, plus the config mapping."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from megatron_gpt.config.schema import ModelConfig


class UnsupportedOption(ValueError):
    """A model option the target architecture cannot express (never exported silently wrong)."""


class Adapter(Protocol):
    """One HF architecture, implemented as a module (convert.neox, convert.llama, convert.gpt2):
    `to_hf` and `from_hf` map state dicts (canonical names <-> HF names); `check` raises
    UnsupportedOption for an option the HF class cannot express. Optional: CONFIG_CLASS (the
    transformers config class when it is not ARCHITECTURE with ForCausalLM -> Config), ROTARY
    (False: no rotary settings to check) and normalize_keys(hf_state) (other spellings of the names)."""

    ARCHITECTURE: str
    """The transformers class, e.g. GPTNeoXForCausalLM."""
    MODEL_TYPE: str
    """config.json's model_type, e.g. gpt_neox."""
    FAMILY: str
    """The --arch name, e.g. neox."""

    def check(self, cfg: ModelConfig) -> None: ...

    def hf_config_kwargs(self, cfg: ModelConfig, vocab_size: int, ffn_hidden_size: int) -> dict[str, Any]: ...

    def to_hf(self, state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]: ...

    def model_config(self, hf: Any, rope: dict[str, Any]) -> dict[str, Any]: ...

    def from_hf(self, hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]: ...

    def used_keys(self, cfg: ModelConfig) -> set[str]: ...
