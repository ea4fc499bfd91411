"""The interface every Hugging Face architecture adapter implements (neox, llama, gpt2), torchtitan style:
pure functions between our canonical state dict and the HF one, plus the config mapping."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from megatron_gpt.config.schema import ModelConfig


class UnsupportedOption(ValueError):
    """A model option the target architecture cannot express (never exported silently wrong)."""


def refuse_export(architecture: str, problems: list[str], fix: str) -> None:
    """An adapter's `check` verdict: one UnsupportedOption naming every option of ours that
    `architecture` cannot express, and the fix; nothing when `problems` is empty."""
    if problems:
        raise UnsupportedOption(f"{architecture} cannot express " + "; ".join(problems) + f"; fix: {fix}")


def refuse_import(architecture: str, problems: list[str]) -> None:
    """An adapter's `model_config` verdict on an HF config: one UnsupportedOption naming every
    setting our model cannot express; nothing when `problems` is empty."""
    if problems:
        raise UnsupportedOption(f"this {architecture} checkpoint has " + "; ".join(problems)
                                + "; our model cannot express it, so it is not imported")


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
