"""Activation memory per rank: the bytes autograd keeps between a micro-batch's forward and its
backward, derived term by term from OUR model code (model/layers.py, model/gpt.py), not copied
from a paper. Megatron's accounting (Korthikanti et al. 2022: sbh(34 + 5as/h) bytes per layer,
sbh(34/t) with tensor and sequence parallelism, sbh(10 + 24/t) with tensor parallelism alone)
assumes stored s x s scores, GELU and a sequential block; ours differs in that:

- attention runs in a fused kernel (flash-attn, or SDPA's flash kernel on CPU and GPU) that never
  stores the s x s scores or their dropout mask: it keeps q, k, v, its output and one fp32
  log-sum-exp per query head and token (not modelled: on CPU with model.dropout > 0 SDPA falls
  back to its math path, which keeps three fp32 [s, s] tensors per head, 12 a s / t bytes per
  token; there selective recompute saves those);
- v (and, without rotary, k, and q when each kv head has one query head) is a view of the fused
  QKV output, so that whole output stays alive; rotary makes new q and k tensors, and so does the
  reshape of q under grouped-query attention;
- a parallel-residual block (NeoX) feeds both norms the same input, stored once;
- SwiGLU keeps gate, silu(gate), up and their product (4 x ffn), GELU its input and output (2 x ffn);
- LayerNorm keeps its input and two fp32 statistics; RMSNorm on CUDA (fused) its input and one fp32
  statistic, on CPU (torch's composite) an fp32 copy of its input, the fp32 normalized tensor
  and the statistic.

Per block and token, with b micro-batch, s sequence, h hidden, a heads, g kv heads, d = h/a, f
FFN width, t tensor size, B bytes per activation (2 in bf16/fp16, 4 in fp32):

    replicated (divided by t under sequence parallelism):
        norm inputs   B h x (1 parallel residual | 2 sequential)     (+ norm-specific extras)
        norm outputs  2 B h                                           (inputs of QKV and MLP)
        dropout masks 2 h (1 byte each, only when model.dropout > 0)
    split over tensor ranks:
        QKV output    B (a + 2g) d / t
        new q, k      B a d / t (rotary or grouped-query), B g d / t (rotary)
        attention out B a d / t, log-sum-exp 4 a / t
        MLP           B f / t x (4 SwiGLU | 2 GELU)

recompute=selective reruns only the attention core: with a fused kernel its q, k, v and output are
the tensors stored anyway, so it saves only the log-sum-exp (it saves the 5as/t scores term of
Megatron's formula where scores would be stored). recompute=full stores one B h (/t under sequence
parallelism) per chunk of recompute_num_layers blocks, and while a chunk's backward runs its
blocks' activations of one micro-batch live again (the working set).

Outside the blocks: the embedding keeps the token ids (8 bytes per token); the last stage keeps the
final norm's input and output and the fp32 log-softmax of the logits (4 V/t bytes per token, the
largest single tensor at large vocabularies) with the int64 labels. A pipeline stage that sends
its output keeps it (B h per token) for the backward. DeepSpeed's 1F1B schedule holds up to
pipeline - stage micro-batches in flight on a stage (the first holds `pipeline`), at most the
gradient accumulation steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_gpt.config.schema import Config

FP32 = 4
INT64 = 8


def activation_width(precision: str) -> int:
    return FP32 if precision == "fp32" else 2


def _dims(cfg: Config) -> tuple[int, int, int, int, int]:
    from megatron_gpt.model.layers import ffn_size

    m = cfg.model
    heads = m.num_attention_heads
    return m.hidden_size, heads, m.num_kv_heads or heads, m.hidden_size // heads, ffn_size(m)


def _norm_bytes(cfg: Config, norms: int, inputs: int, device: str) -> float:
    """Per token: what `norms` norms reading `inputs` distinct tensors keep (their outputs are
    counted by the layers that consume them)."""
    m, width = cfg.model, activation_width(cfg.training.precision)
    h = m.hidden_size
    if m.norm == "layernorm":
        return inputs * width * h + norms * 2 * FP32
    if device == "cuda":  # torch's fused RMSNorm kernel: the input and one fp32 statistic
        return inputs * width * h + norms * FP32
    # CPU composite: x.float() (the input itself in fp32, a new copy per norm otherwise), x * rstd, rstd.
    copies = inputs if width == FP32 else norms
    return copies * FP32 * h + norms * (FP32 * h + FP32)


def block_bytes_per_token(cfg: Config, device: str = "cuda", mode: str | None = None) -> float:
    """Bytes one transformer block stores per token of a micro-batch on one tensor rank
    (mode: model.recompute unless given; full counts the block as part of a chunk, see chunk_input)."""
    m, width, t = cfg.model, activation_width(cfg.training.precision), cfg.parallelism.tensor
    mode = mode or m.recompute
    h, heads, kv, d, ffn = _dims(cfg)
    split = t if cfg.parallelism.sequence_parallel else 1
    rotary = m.position_embedding == "rotary"
    replicated = _norm_bytes(cfg, 2, 1 if m.parallel_residual else 2, device) + 2 * width * h + (2 * h if m.dropout > 0 else 0)
    attention = width * (heads + 2 * kv) * d + width * heads * d  # QKV output (v is a view) + output
    if rotary or heads != kv:
        attention += width * heads * d  # q: rotary output, or the reshape copy under grouped-query
    if rotary:
        attention += width * kv * d
    if mode != "selective":
        attention += FP32 * heads  # log-sum-exp: the only tensor the rerun core does not keep
    mlp = width * ffn * (4 if m.activation == "swiglu" else 2)
    return replicated / split + (attention + mlp) / t


def _rotary_bytes(cfg: Config, blocks: int, mode: str) -> float:
    """Per micro-batch (not per token): the cos/sin tables rotary multiplies by. fp32 uses the one
    cached pair; other precisions cast a pair per q and per k in every block."""
    from megatron_gpt.model.layers import rotary_dims

    m = cfg.model
    if m.position_embedding != "rotary" or mode == "full" or not blocks:
        return 0.0
    table = m.seq_length * rotary_dims(m)
    width = activation_width(cfg.training.precision)
    return 2 * table * FP32 if width == FP32 else blocks * 4 * table * width


@dataclass(frozen=True)
class StageActivations:
    """One rank's activation bytes: `stored` per micro-batch by term, held for `in_flight`
    micro-batches, plus the recompute working set (one chunk of one micro-batch, during backward)."""

    blocks: float
    embedding: float
    head: float  # final norm, logits and loss
    pipeline_output: float
    in_flight: int
    working_set: float

    @property
    def per_micro_batch(self) -> float:
        return self.blocks + self.embedding + self.head + self.pipeline_output

    @property
    def stored(self) -> float:
        return self.per_micro_batch * self.in_flight

    @property
    def total(self) -> float:
        return self.stored + self.working_set


def in_flight_micro_batches(cfg: Config, stage: int, micro_batches: int) -> int:
    """Micro-batches whose activations a stage holds at once: 1 without a pipeline (each backward
    follows its forward); under DeepSpeed's 1F1B schedule pipeline - stage, at most micro_batches."""
    return max(1, min(cfg.parallelism.pipeline - stage, micro_batches))


def stage_activations(cfg: Config, vocab_size: int, blocks: int, first: bool, last: bool, stage: int = 0,
                      micro_batches: int = 1, device: str = "cuda") -> StageActivations:
    """Activation bytes of a rank holding `blocks` blocks (plus the embedding when `first`, the final
    norm and output when `last`) at micro batch training.micro_batch_size."""
    m, t = cfg.model, cfg.parallelism.tensor
    width = activation_width(cfg.training.precision)
    tokens = cfg.training.micro_batch_size * m.seq_length
    split = t if cfg.parallelism.sequence_parallel else 1
    h = m.hidden_size
    mode = m.recompute
    full_block = block_bytes_per_token(cfg, device, "none") * tokens
    if mode == "full":
        chunks = -(-blocks // m.recompute_num_layers)
        stored_blocks = chunks * width * h / split * tokens
        working = min(blocks, m.recompute_num_layers) * full_block
    else:
        stored_blocks, working = blocks * block_bytes_per_token(cfg, device) * tokens, 0.0
    stored_blocks += _rotary_bytes(cfg, blocks, mode)
    embedding = (INT64 + (h / split if m.dropout > 0 else 0)) * tokens if first else 0.0
    head = 0.0
    if last:
        head = (_norm_bytes(cfg, 1, 1, device) + width * h) / split * tokens  # final norm, output-layer input
        head += (FP32 * vocab_size / t + INT64) * tokens  # fp32 log-softmax (or softmax at t > 1), labels
    output = width * h / split * tokens if not last else 0.0
    return StageActivations(stored_blocks, embedding, head, output,
                            in_flight_micro_batches(cfg, stage, micro_batches), working)


def model_activation_bytes(cfg: Config, vocab_size: int, device: str = "cuda") -> float:
    """Stored bytes of one micro-batch through the whole model on one tensor rank (no pipeline):
    what tests/activation_bytes.py measures from autograd's saved tensors."""
    return stage_activations(cfg, vocab_size, cfg.model.num_layers, True, True, device=device).per_micro_batch


_UNITS = {"": None, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a memory size such as 80GB (decimal), 40GiB (binary) or 141gb; a unit is required."""
    import re

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if unit is None:
        raise ValueError(f"memory size {text!r} is not a number with a unit; write e.g. 80GB, 40GiB or 141GB")
    return int(float(match.group(1)) * unit)


GIB = 2**30


def human(size: float) -> str:
    """GiB from 1 GiB on, MiB below."""
    return f"{size / GIB:,.1f} GiB" if abs(size) >= GIB else f"{size / 2**20:,.1f} MiB"


def verdict(terms: dict[str, float], capacity: int, rank: int) -> str:
    """The one-line answer for the rank that needs the most: `terms` (name -> bytes) against
    `capacity` bytes per GPU, naming the largest term."""
    need = sum(terms.values())
    largest = max(terms, key=terms.get)
    spare = capacity - need
    head = (f"fits: rank {rank} needs {human(need)} of {human(capacity)} per GPU, {human(spare)} to spare"
            if spare >= 0 else f"does not fit: rank {rank} needs {human(need)} of {human(capacity)} per GPU, "
            f"{human(-spare)} too much")
    return f"{head}; largest term: {largest} ({human(terms[largest])})"
