"""Transformer building blocks: norms, rotary positions, attention, MLP and the block.

Every tensor is batch-first: hidden states are [batch, seq, hidden], except between the layers of
a sequence-parallel model: [seq/tp, batch, hidden] (see sequence_parallel.py). Linear layers are
megatron-core's column/row-parallel layers, so the same code runs at any tensor-parallel size:
a column-parallel layer holds this rank's slice of the output features, a row-parallel layer
consumes such a slice and all-reduces its output.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from megatron_gpt.config.schema import ModelConfig
from megatron_gpt.model import sequence_parallel as sp


def normal_init(std: float):
    """Init function megatron-core layers call on the full (unsharded) weight."""
    return lambda weight: nn.init.normal_(weight, mean=0.0, std=std)


def output_init(cfg: ModelConfig):
    """GPT-2's scaled init for the projections that write into the residual stream."""
    return normal_init(cfg.init_std / math.sqrt(2.0 * cfg.num_layers))


def make_norm(cfg: ModelConfig, sequence_parallel: bool = False) -> nn.Module:
    """The model's norm; under sequence parallelism one whose parameter gradients are summed over
    the tensor ranks (each sees its slice of the sequence)."""
    if cfg.norm == "rmsnorm":
        norm = (sp.RMSNorm if sequence_parallel else nn.RMSNorm)(cfg.hidden_size, eps=cfg.norm_eps)
    else:
        norm = (sp.LayerNorm if sequence_parallel else nn.LayerNorm)(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.bias)
    return sp.mark_sequence_parallel(norm) if sequence_parallel else norm


def make_dropout(p: float, sequence_parallel: bool = False) -> nn.Module:
    """Dropout; under sequence parallelism with a stream per tensor rank (sequence_parallel.Dropout)."""
    return sp.Dropout(p) if sequence_parallel else nn.Dropout(p)


def ffn_size(cfg: ModelConfig) -> int:
    if cfg.ffn_hidden_size is not None:
        return cfg.ffn_hidden_size
    if cfg.activation == "swiglu":
        return 64 * math.ceil(8 * cfg.hidden_size / 3 / 64)
    return 4 * cfg.hidden_size


def _plain_at_tp1(layer: nn.Module, unsplit: bool) -> bool:
    """Whether a megatron-core linear layer is an ordinary linear layer: its weight not split over
    tensor ranks, no sequence parallelism, no fused or deferred weight-gradient tricks."""
    config = layer.config
    return (unsplit and not config.sequence_parallel
            and not layer.gradient_accumulation_fusion and not config.defer_embedding_wgrad_compute
            and not getattr(layer, "explicit_expert_comm", False))


class ColumnLinear(ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear; at tensor-parallel size 1 its forward is one F.linear.

    megatron-core's path at tp=1 is the same product (matmul, then the bias added) through its
    own autograd Function with identity communication Functions around it: that Python work per
    call, a separate bias pass and a contiguous copy per weight gradient made a small model's
    forward 7-20% slower on CPU than nn.Linear's. F.linear (addmm) is what nn.Linear runs; results
    differ only in rounding (the bias is added inside the GEMM). Still a submodule call, so
    ZeRO-3's parameter hooks fire as before; at tp>1 nothing changes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plain = _plain_at_tp1(self, self.output_size_per_partition == self.output_size)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if self.plain and weight is None:
            if self.skip_bias_add:
                return F.linear(input_, self.weight), self.bias
            return F.linear(input_, self.weight, self.bias), None
        if self.sequence_parallel and weight is None and not input_.is_cuda:  # megatron-core's needs CUDA
            bias = None if self.skip_bias_add else self.bias
            return sp.gathered_linear(input_, self.weight, bias), (self.bias if self.skip_bias_add else None)
        return super().forward(input_, weight, runtime_gather_output)


class RowLinear(RowParallelLinear):
    """megatron-core's RowParallelLinear; at tensor-parallel size 1 one F.linear (see ColumnLinear).
    Under sequence parallelism: the product, reduce-scattered along the sequence, plus the bias
    with its gradient summed over the tensor ranks (megatron-core leaves that sum to its own
    optimizer; here DeepSpeed owns the gradients)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plain = _plain_at_tp1(self, self.input_size_per_partition == self.input_size)

    def forward(self, input_, batch_first: bool = False):
        """batch_first: under sequence parallelism, an input [b, s, ...] whose product is turned
        sequence-first for the reduce-scatter (a temporary copy; turning the input would be a copy
        that the backward keeps)."""
        if self.plain:
            if self.skip_bias_add:
                return F.linear(input_, self.weight), self.bias
            return F.linear(input_, self.weight, self.bias), None
        if self.sequence_parallel:
            product = F.linear(input_, self.weight)
            output = sp.reduce_scatter_to_sequence(product.transpose(0, 1) if batch_first else product)
            if self.bias is None or self.skip_bias_add:
                return output, self.bias
            return output + sp.tp_summed(self.bias), None
        return super().forward(input_)


def rotary_dims(cfg: ModelConfig) -> int:
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return int(head_dim * cfg.rotary_pct)


@lru_cache(maxsize=16)
def _rotary_tables(dims: int, base: float, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.float32, device=device) / dims))
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # [seq, dims], half-split (GPT-NeoX / HF) layout
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, dims: int, base: float, offset: int = 0,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate the first `dims` features of each head of x [batch, seq, heads, head_dim], at
    positions offset.. or, when given, at `positions` [batch, seq] (restarting per document)."""
    seq = x.shape[1]
    if positions is None:
        cos, sin = _rotary_tables(dims, base, offset + seq, x.device)
        cos = cos[offset:, None, :].to(x.dtype)  # [seq, 1, dims] broadcasts over heads
        sin = sin[offset:, None, :].to(x.dtype)
    else:
        cos, sin = _rotary_tables(dims, base, seq, x.device)
        cos = cos[positions][:, :, None, :].to(x.dtype)  # [batch, seq, 1, dims]
        sin = sin[positions][:, :, None, :].to(x.dtype)
    x_rot, x_pass = x[..., :dims], x[..., dims:]
    half = dims // 2
    rotated_half = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos + rotated_half * sin, x_pass], dim=-1)


def split_positions(inputs):
    """(tensor, position ids or None) of a layer input: a tensor, or (tensor, position ids) when
    packed documents are masked from each other (the pair travels between pipeline stages)."""
    return inputs if isinstance(inputs, tuple) else (inputs, None)


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """[batch, 1, seq, seq] boolean mask: causal, and only within a document (a document starts
    where its position is 0)."""
    documents = (positions == 0).cumsum(dim=1)  # [b, s]
    same = documents[:, :, None] == documents[:, None, :]
    return (same & torch.ones_like(same[0]).tril())[:, None]


def _flash_varlen(flash_varlen, query, key, value, positions, dropout: float) -> torch.Tensor:
    """flash-attn's variable-length kernel over the documents of every row, end to end."""
    batch, seq = positions.shape
    starts = torch.nonzero(positions.flatten() == 0).flatten().to(torch.int32)
    cu_seqlens = torch.cat([starts, starts.new_tensor([batch * seq])])
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out = flash_varlen(query.flatten(0, 1), key.flatten(0, 1), value.flatten(0, 1), cu_seqlens, cu_seqlens,
                       longest, longest, dropout_p=dropout, causal=True)
    return out.view(batch, seq, *out.shape[1:])


def _flash_varlen_func():
    """flash-attn's varlen kernel when it is installed, else None."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _flash_attn_func():
    """flash-attn's kernel when it is installed, else None (it is an optional GPU extra)."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


class KVCache:
    """Keys and values of the tokens seen so far, per attention layer, for incremental decoding.
    Every tensor rank caches its own heads; `length` is the number of cached positions."""

    def __init__(self):
        self.length = 0
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def extend(self, layer: nn.Module, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's [b, s, kv_heads, d] keys/values; returns the full ones."""
        past = self.layers.get(id(layer))
        if past is not None:
            key, value = torch.cat([past[0], key], dim=1), torch.cat([past[1], value], dim=1)
        self.layers[id(layer)] = (key, value)
        return key, value


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads.

    The fused QKV projection is laid out per key/value group — [q x (heads/kv_heads), k, v] —
    so that a column-parallel split over tensor ranks hands each rank whole groups.
    """

    def __init__(self, cfg: ModelConfig, parallel: ModelParallelConfig):
        super().__init__()
        tp = parallel.tensor_model_parallel_size
        kv_heads = cfg.num_kv_heads or cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.q_per_kv = cfg.num_attention_heads // kv_heads
        self.local_kv_heads = kv_heads // tp
        self.local_heads = cfg.num_attention_heads // tp
        self.rotary_dims = rotary_dims(cfg) if cfg.position_embedding == "rotary" else 0
        self.rotary_base = cfg.rotary_base
        self.dropout = cfg.dropout
        self.backend = cfg.attention_backend
        self.sequence_first = parallel.sequence_parallel  # [s/tp, b, h] in (see sequence_parallel.py)
        self.qkv = ColumnLinear(
            cfg.hidden_size, (cfg.num_attention_heads + 2 * kv_heads) * self.head_dim,
            config=parallel, init_method=normal_init(cfg.init_std), bias=cfg.bias, gather_output=False,
        )
        self.dense = RowLinear(
            cfg.num_attention_heads * self.head_dim, cfg.hidden_size, config=parallel,
            init_method=output_init(cfg), bias=cfg.bias, input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, hidden: torch.Tensor, cache: KVCache | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """positions [batch, seq]: per-document positions of packed documents, which then attend
        only within themselves (data.document_masking); None: one sequence."""
        offset = cache.length if cache is not None else 0
        qkv, _ = self.qkv(hidden)
        if self.sequence_first:  # the gathered [s, b, ...]: a batch-first view for the attention math
            qkv = qkv.transpose(0, 1)
        batch, seq, _ = qkv.shape
        qkv = qkv.view(batch, seq, self.local_kv_heads, self.q_per_kv + 2, self.head_dim)
        query = qkv[:, :, :, : self.q_per_kv].reshape(batch, seq, self.local_heads, self.head_dim)
        key, value = qkv[:, :, :, self.q_per_kv], qkv[:, :, :, self.q_per_kv + 1]
        if self.rotary_dims:
            query = apply_rotary(query, self.rotary_dims, self.rotary_base, offset, positions)
            key = apply_rotary(key, self.rotary_dims, self.rotary_base, offset, positions)
        if cache is not None:
            key, value = cache.extend(self, key, value)
        context = self._attend(query, key, value, positions)  # [batch, seq, local_heads, head_dim]
        context = context.reshape(batch, seq, self.local_heads * self.head_dim)
        # under sequence parallelism the reduce-scatter along the sequence turns the product sequence-first
        output, _ = self.dense(context, batch_first=self.sequence_first)
        return output

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of the last query.shape[1] positions over all key positions (within
        each document when `positions` are given)."""
        dropout = self.dropout if self.training else 0.0
        use_flash = self.backend != "sdpa" and query.is_cuda
        flash = (_flash_attn_func() if positions is None else _flash_varlen_func()) if use_flash else None
        if self.backend == "flash" and flash is None:
            raise RuntimeError("model.attention_backend=flash needs flash-attn on a CUDA device; "
                               "install the 'gpu' extra or set model.attention_backend=auto")
        if flash is not None and query.dtype in (torch.float16, torch.bfloat16):
            if positions is not None:  # documents as cu_seqlens: no [s, s] mask is built
                return _flash_varlen(flash, query, key, value, positions, dropout)
            # GQA handled natively; causal aligns to the bottom right when keys outnumber queries.
            return flash(query, key, value, dropout_p=dropout, causal=True)
        queries, keys = query.shape[1], key.shape[1]
        mask = None
        if positions is not None:
            mask = document_mask(positions)
        elif queries not in (1, keys):  # a chunk after cached tokens: SDPA's is_causal is top-left aligned
            mask = torch.ones(queries, keys, dtype=torch.bool, device=query.device).tril(keys - queries)
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask,
            dropout_p=dropout, is_causal=mask is None and queries == keys, enable_gqa=self.q_per_kv > 1,
        )
        return out.transpose(1, 2)


class MLP(nn.Module):
    """GELU MLP (GPT-2/NeoX) or SwiGLU (Llama): column-parallel in, row-parallel out."""

    def __init__(self, cfg: ModelConfig, parallel: ModelParallelConfig):
        super().__init__()
        inner = ffn_size(cfg)
        column = dict(config=parallel, init_method=normal_init(cfg.init_std), bias=cfg.bias, gather_output=False)
        self.gated = cfg.activation == "swiglu"
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
        # Gate and up are separate layers so a column split keeps matching slices of both.
        self.gate = ColumnLinear(cfg.hidden_size, inner, **column) if self.gated else None
        self.up = ColumnLinear(cfg.hidden_size, inner, **column)
        self.down = RowLinear(
            inner, cfg.hidden_size, config=parallel, init_method=output_init(cfg), bias=cfg.bias,
            input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        up, _ = self.up(hidden)
        if self.gated:
            gate, _ = self.gate(hidden)
            inner = F.silu(gate) * up
        else:
            inner = F.gelu(up, approximate=self.approximate)
        output, _ = self.down(inner)
        return output


class Block(nn.Module):
    """Pre-norm transformer block, sequential (GPT-2/Llama) or parallel-residual (NeoX)."""

    def __init__(self, cfg: ModelConfig, parallel: ModelParallelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg, parallel.sequence_parallel)
        self.attention = Attention(cfg, parallel)
        self.mlp_norm = make_norm(cfg, parallel.sequence_parallel)
        self.mlp = MLP(cfg, parallel)
        self.parallel_residual = cfg.parallel_residual
        self.dropout = make_dropout(cfg.dropout, parallel.sequence_parallel)

    def forward(self, inputs, cache: KVCache | None = None):
        """hidden [b, s, h] ([s/tp, b, h] under sequence parallelism) -> hidden; (hidden, positions)
        -> (hidden, positions) (split_positions)."""
        hidden, positions = split_positions(inputs)
        if self.parallel_residual:
            attn = self.attention(self.attn_norm(hidden), cache, positions)
            mlp = self.mlp(self.mlp_norm(hidden))
            hidden = hidden + self.dropout(attn) + self.dropout(mlp)
        else:
            hidden = hidden + self.dropout(self.attention(self.attn_norm(hidden), cache, positions))
            hidden = hidden + self.dropout(self.mlp(self.mlp_norm(hidden)))
        return hidden if positions is None else (hidden, positions)
