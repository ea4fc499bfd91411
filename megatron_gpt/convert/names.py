"""Where each part of our GPT sits in its spec list, under the canonical parameter names.

The spec list is [Embedding, Block x num_layers, FinalNorm, OutputLayer | tied Embedding.logits],
so a canonical name is `{position}.{name inside the layer}`, and a tied embedding (input and
output share one table) is `tied.embedding.{name}` (see `GPT.canonical_names`).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_gpt.config.schema import ModelConfig


class UnsupportedOption(ValueError):
    """A model option the target architecture cannot express (never exported silently wrong)."""


@dataclass(frozen=True)
class Layout:
    """Canonical-name prefixes for a model config."""

    num_layers: int
    tied: bool

    @classmethod
    def of(cls, cfg: ModelConfig) -> "Layout":
        return cls(cfg.num_layers, cfg.tie_embeddings)

    @property
    def embedding(self) -> str:
        """Prefix of the token embedding (`{prefix}.word.weight`)."""
        return "tied.embedding" if self.tied else "0"

    def block(self, index: int) -> str:
        """Prefix of transformer block `index` (0-based)."""
        return str(index + 1)

    @property
    def final_norm(self) -> str:
        return str(self.num_layers + 1)

    @property
    def output(self) -> str:
        """Prefix of the untied output layer (`{prefix}.linear.weight`)."""
        return str(self.num_layers + 2)

    def vocab_names(self) -> set[str]:
        """Parameters with one row per (padded) vocabulary entry."""
        names = {f"{self.embedding}.word.weight"}
        if not self.tied:
            names.add(f"{self.output}.linear.weight")
        return names


def fit_rows(tensor, rows: int):
    """`tensor` with exactly `rows` rows along dim 0: extra rows cut, missing rows zero."""
    import torch

    if tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] > rows:
        return tensor[:rows]
    pad = torch.zeros((rows - tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], dim=0)
