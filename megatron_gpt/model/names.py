"""Canonical (layout-independent) parameter names, derived once from the spec order.

The GPT is an ordered list of layers (`spec_order`): [Embedding, Block x num_layers, FinalNorm,
OutputLayer | the tied Embedding's `logits`]. A parameter's canonical name is
`{position}.{name inside the layer}`, or `tied.{key}.{name}` for a layer that several positions
share (tied input/output embeddings). Every layout maps to these names: one GPT module
(`layers.N.*`), DeepSpeed pipeline stages (`{position}.*`, `tied_modules.{key}.*`), checkpoint
files and Hugging Face adapters.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_gpt.config.schema import ModelConfig

EMBEDDING, BLOCK, FINAL_NORM, OUTPUT = "embedding", "block", "final_norm", "output"


@dataclass(frozen=True)
class Slot:
    """One position of the spec list: which layer, the tie key of a shared layer, the method called."""

    kind: str
    tie_key: str | None = None
    method: str = "forward"


def spec_order(cfg: ModelConfig) -> list[Slot]:
    """The layer list every layout is built from (model.gpt.layer_specs gives each slot its class)."""
    tie = "embedding" if cfg.tie_embeddings else None
    last = Slot(EMBEDDING, tie, "logits") if cfg.tie_embeddings else Slot(OUTPUT)
    return [Slot(EMBEDDING, tie), *[Slot(BLOCK)] * cfg.num_layers, Slot(FINAL_NORM), last]


def canonical_prefix(position: int, tie_key: str | None) -> str:
    """The canonical prefix of the layer at `position`: `tied.{key}` if shared, else the position."""
    return f"tied.{tie_key}" if tie_key else str(position)


def from_pipeline_name(name: str) -> str:
    """A DeepSpeed PipelineModule parameter name -> its canonical name: the pipeline names layers by
    spec position already, and shared ones `tied_modules.{key}`."""
    return "tied." + name[len("tied_modules."):] if name.startswith("tied_modules.") else name


def canonical_names(model) -> dict[str, str]:
    """Parameter name -> canonical name for a GPT (its own mapping) or a DeepSpeed pipeline stage."""
    if hasattr(model, "canonical_names"):
        return model.canonical_names()
    return {name: from_pipeline_name(name) for name, _ in model.named_parameters()}


@dataclass(frozen=True)
class Prefixes:
    """Canonical-name prefixes of each part of the model, for adapters that address parts by role."""

    slots: tuple[Slot, ...]

    @classmethod
    def of(cls, cfg: ModelConfig) -> "Prefixes":
        return cls(tuple(spec_order(cfg)))

    def _prefix(self, kind: str, method: str = "forward", nth: int = 0) -> str:
        positions = [p for p, s in enumerate(self.slots) if s.kind == kind and s.method == method]
        return canonical_prefix(positions[nth], self.slots[positions[nth]].tie_key)

    @property
    def embedding(self) -> str:
        """Prefix of the token embedding (`{prefix}.word.weight`)."""
        return self._prefix(EMBEDDING)

    def block(self, index: int) -> str:
        """Prefix of transformer block `index` (0-based)."""
        return self._prefix(BLOCK, nth=index)

    @property
    def final_norm(self) -> str:
        return self._prefix(FINAL_NORM)

    @property
    def tied(self) -> bool:
        return self.slots[-1].kind == EMBEDDING

    @property
    def output(self) -> str:
        """Prefix of the untied output layer (`{prefix}.linear.weight`)."""
        return self._prefix(OUTPUT)

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
