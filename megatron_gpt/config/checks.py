"""Cross-field checks of a resolved Config: each failure names the key, where it was set, and
the fix; all failures of one config are reported together."""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from .dims import ParallelDims
from .errors import DEFAULT, ConfigError, Problem, yaml_value as _yaml_value
from .passthrough import passthrough_problems
from .schema import Config

def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


class _Checks:
    """Collects cross-field problems; each names the key to change, its origin and the fix."""

    def __init__(self, cfg: Config, origins: Mapping[str, str] | None) -> None:
        self.cfg, self.origins = cfg, origins
        self.problems: list[Problem] = []

    def origin(self, key: str) -> str | None:
        return None if self.origins is None else self.origins.get(key, DEFAULT)

    def value(self, key: str) -> Any:
        obj: Any = self.cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    def ref(self, key: str) -> str:
        """``key=value (origin)`` for a key mentioned besides the one blamed."""
        origin = self.origin(key)
        return f"{key}={_yaml_value(self.value(key))}" + (f" ({origin})" if origin else "")

    def blame(self, *keys: str) -> str:
        """The first key the user actually set: that is the one they are likely to change."""
        return next((k for k in keys if self.origin(k) not in (None, DEFAULT)), keys[0])

    def indivisible(self, key: str, num_key: str, den_key: str, note: str = "") -> str:
        """Say "num is not divisible by den" from the point of view of the blamed ``key``."""
        if key == num_key:
            return f"{_yaml_value(self.value(num_key))} is not divisible by {self.ref(den_key)}{note}"
        return f"{_yaml_value(self.value(den_key))} does not divide {self.ref(num_key)}{note}"

    def fail(self, key: str, what: str, fix: str) -> None:
        what = what.removeprefix(key + " ")  # "a.b: a.b 3 is ..." reads as "a.b: 3 is ..."
        self.problems.append(Problem(self.origin(key), f"{key}: {what}; fix: {fix}"))


def _check_model(c: _Checks) -> None:
    m, tp, pp = c.cfg.model, c.cfg.parallelism.tensor, c.cfg.parallelism.pipeline
    h, heads = m.hidden_size, m.num_attention_heads
    if h % heads:
        key = c.blame("model.hidden_size", "model.num_attention_heads")
        c.fail(key, c.indivisible(key, "model.hidden_size", "model.num_attention_heads"),
               f"set model.hidden_size to a multiple of {heads}, e.g. {_round_up(h, heads)}, "
               f"or model.num_attention_heads to a divisor of {h}, e.g. {_largest_divisor(h, heads)}")
    kv = m.num_kv_heads
    if kv is not None and heads % kv:
        key = c.blame("model.num_kv_heads", "model.num_attention_heads")
        c.fail(key, c.indivisible(key, "model.num_attention_heads", "model.num_kv_heads"),
               f"set model.num_kv_heads to a divisor of {heads}, e.g. {_largest_divisor(heads, kv)}, "
               "or null for one per query head")
    for key, n in (("model.num_attention_heads", heads), ("model.num_kv_heads", kv)):
        if n is not None and n % tp:
            blamed = c.blame("parallelism.tensor", key)
            c.fail(blamed, c.indivisible(blamed, key, "parallelism.tensor", " (each tensor rank holds whole heads)"),
                   f"set parallelism.tensor to a divisor of {n}, e.g. {_largest_divisor(n, tp)}, "
                   f"or {key} to a multiple of {tp}")
    if m.ffn_hidden_size is not None and m.ffn_hidden_size % tp:
        key = c.blame("model.ffn_hidden_size", "parallelism.tensor")
        c.fail(key, c.indivisible(key, "model.ffn_hidden_size", "parallelism.tensor"),
               f"set model.ffn_hidden_size to a multiple of {tp}, e.g. {_round_up(m.ffn_hidden_size, tp)}")
    if c.cfg.parallelism.sequence_parallel and tp == 1:
        c.fail(c.blame("parallelism.sequence_parallel", "parallelism.tensor"),
               "parallelism.sequence_parallel needs tensor parallelism (it splits the tensor ranks' replicated "
               f"norms and dropout along the sequence), but {c.ref('parallelism.tensor')}",
               "set parallelism.tensor to 2 or more, or parallelism.sequence_parallel to false")
    elif c.cfg.parallelism.sequence_parallel and m.seq_length % tp:
        key = c.blame("model.seq_length", "parallelism.tensor")
        c.fail(key, c.indivisible(key, "model.seq_length", "parallelism.tensor",
                                  " (parallelism.sequence_parallel gives each tensor rank an equal slice)"),
               f"set model.seq_length to a multiple of {tp}, e.g. {_round_up(m.seq_length, tp)}, "
               "or parallelism.sequence_parallel to false")
    if m.num_layers < pp:
        c.fail(c.blame("parallelism.pipeline", "model.num_layers"),
               f"parallelism.pipeline {pp} is larger than {c.ref('model.num_layers')} "
               "(every pipeline stage needs at least one block)",
               f"set parallelism.pipeline to at most {m.num_layers}, or model.num_layers to at least {pp}")
    if m.position_embedding == "rotary" and h % heads == 0:
        head_dim = h // heads
        dims = head_dim * m.rotary_pct
        if abs(dims - round(dims)) > 1e-6 or round(dims) % 2 or round(dims) < 2:
            options = [k / head_dim for k in range(2, head_dim + 1, 2)]
            fix = (f"set model.rotary_pct so that head_dim {head_dim} x rotary_pct is even, e.g. "
                   f"{min(options, key=lambda o: abs(o - m.rotary_pct)):g}" if options else
                   "use model.position_embedding: learned, or a head dim of at least 2")
            c.fail(c.blame("model.rotary_pct", "model.hidden_size", "model.num_attention_heads"),
                   f"rotary_pct {m.rotary_pct:g} x head_dim {head_dim} (hidden_size {h} / heads {heads}) = "
                   f"{dims:g} rotary dims; rotary needs a positive even number", fix)


def _check_recompute(c: _Checks) -> None:
    m = c.cfg.model
    if m.recompute != "full" and m.recompute_num_layers != 1:
        c.fail(c.blame("model.recompute_num_layers", "model.recompute"),
               f"model.recompute_num_layers {m.recompute_num_layers} applies only to full recompute, "
               f"but {c.ref('model.recompute')}",
               "set model.recompute: full, or drop model.recompute_num_layers (as Megatron, chunks of "
               "blocks exist only in full recompute)")
    elif m.recompute_num_layers > m.num_layers:
        c.fail("model.recompute_num_layers",
               f"{m.recompute_num_layers} blocks per chunk is more than {c.ref('model.num_layers')}",
               f"set model.recompute_num_layers to at most {m.num_layers}")


def _check_layout(c: _Checks, world_size: int | None) -> None:
    """World size vs tensor x pipeline, and the three batch sizes (shared with batch_layout)."""
    cfg = c.cfg
    tp, pp, t = cfg.parallelism.tensor, cfg.parallelism.pipeline, cfg.training
    world = cfg.world_size if world_size is None else world_size
    dims = ParallelDims(world, tp, pp)
    if world_size is None:
        world_desc = (f"world size {world} (launcher.nproc_per_node {cfg.launcher.nproc_per_node} x "
                      f"launcher.num_nodes {cfg.launcher.num_nodes})")
        world_fix = f"set launcher.nproc_per_node so the world size is a multiple of {tp * pp}"
    else:
        world_desc, world_fix = f"world size {world}", f"run with a world size that is a multiple of {tp * pp}"
    if not dims.valid:
        c.fail(c.blame("parallelism.tensor", "parallelism.pipeline", "launcher.nproc_per_node"),
               f"{world_desc} is not divisible by parallelism.tensor {tp} x parallelism.pipeline {pp} = {tp * pp}",
               f"{world_fix} (e.g. {_round_up(max(world, 1), tp * pp)}), or make tensor x pipeline divide {world}")
        return
    dp = dims.data
    unit = t.micro_batch_size * dp
    dp_desc = f"data-parallel {dp} ({world_desc} / (tensor {tp} x pipeline {pp})) = {unit}"
    gbs, ga = t.global_batch_size, t.gradient_accumulation_steps
    if gbs is not None and gbs % unit:
        c.fail(c.blame("training.global_batch_size", "training.micro_batch_size"),
               f"{gbs} is not divisible by training.micro_batch_size {t.micro_batch_size} x {dp_desc}",
               f"set training.global_batch_size to a multiple of {unit} (micro_batch_size "
               f"{t.micro_batch_size} x data-parallel {dp}), e.g. {_round_up(gbs, unit)}")
    elif gbs is not None and ga is not None and ga != gbs // unit:
        c.fail(c.blame("training.gradient_accumulation_steps", "training.global_batch_size"),
               f"{ga} disagrees with training.global_batch_size {gbs} / (micro_batch_size "
               f"{t.micro_batch_size} x data-parallel {dp}) = {gbs // unit}",
               f"set training.gradient_accumulation_steps to {gbs // unit}, or set only one of the two "
               "(the other is derived)")
    z = cfg.parallelism.zero_stage
    if z >= 2 and pp > 1:
        c.fail(c.blame("parallelism.zero_stage", "parallelism.pipeline"),
               f"ZeRO stage {z} cannot be combined with parallelism.pipeline {pp}: DeepSpeed's pipeline "
               "engine supports only ZeRO stages 0 and 1",
               "set parallelism.zero_stage to 1 (or 0), or parallelism.pipeline to 1")


def _check_optim(c: _Checks) -> None:
    o, s = c.cfg.optimizer, c.cfg.schedule
    if o.min_lr > o.lr:
        key = c.blame("optimizer.min_lr", "optimizer.lr")
        c.fail(key, f"optimizer.min_lr {o.min_lr:g} is above the peak {c.ref('optimizer.lr')}"
               if key == "optimizer.min_lr" else f"{o.lr:g} is below {c.ref('optimizer.min_lr')}",
               f"set optimizer.min_lr to at most {o.lr:g}, e.g. {o.lr / 10:g}")
    # A run shorter than its warmup (a smoke test with --set training.train_steps=5) just warms
    # up; only an explicit decay_steps that ends before the warmup is a contradiction.
    if s.decay_steps is not None and s.warmup_steps > s.decay_steps:
        key = c.blame("schedule.warmup_steps", "schedule.decay_steps")
        c.fail(key, f"{s.warmup_steps} is longer than the decay, {c.ref('schedule.decay_steps')}"
               if key == "schedule.warmup_steps"
               else f"{s.decay_steps} is shorter than the warmup, {c.ref('schedule.warmup_steps')}",
               f"set schedule.warmup_steps to at most {s.decay_steps}, e.g. {s.decay_steps // 10}, "
               "or raise schedule.decay_steps")


def _check_data(c: _Checks) -> None:
    d = c.cfg.data
    sources = [k for k, on in (("data.embedded", d.embedded is not None), ("data.paths", bool(d.paths)),
                               ("data.train_paths", bool(d.train_paths))) if on]
    if not sources:
        c.fail("data.paths", "no training data: none of data.embedded, data.paths, data.train_paths is set",
               "set data.embedded: shakespeare (the bundled corpus), data.paths to preprocessed dataset "
               "prefixes (PREFIX.bin/.idx), or data.train_paths + data.valid_paths")
    elif len(sources) > 1:
        key = c.blame(*reversed(sources))
        others = " and ".join(c.ref(k) for k in sources if k != key)
        c.fail(key, f"set together with {others}; exactly one data source is used",
               f"remove one of them (to drop an inherited value: --set {sources[0]}=null or "
               f"--set {sources[-1]}=[])".replace("data.paths=null", "data.paths=[]"))
    for split in ("valid", "test"):
        if getattr(d, f"{split}_paths") and not d.train_paths:
            c.fail(f"data.{split}_paths", "is a per-split list but data.train_paths is empty",
                   "set data.train_paths too, or put every prefix in data.paths and cut it with data.split")
    if d.train_paths and not d.valid_paths:
        c.fail("data.valid_paths", "is empty, but data.train_paths needs a validation set (evaluation "
               "runs every training.eval_interval steps and at the end)",
               "set data.valid_paths to held-out prefixes, or use data.paths with data.split")
    for paths, weights in (("paths", "weights"), ("train_paths", "train_weights"),
                           ("valid_paths", "valid_weights"), ("test_paths", "test_weights")):
        w, p = getattr(d, weights), getattr(d, paths)
        if w is None:
            continue
        if len(w) != len(p):
            c.fail(f"data.{weights}", f"has {len(w)} weights for {len(p)} prefixes in data.{paths}",
                   f"give one weight per prefix of data.{paths}, in the same order (or null for size-proportional)")
        elif not all(math.isfinite(x) and x > 0 for x in w):
            c.fail(f"data.{weights}", f"{w} has a weight that is not a positive number",
                   f"use positive weights (drop a prefix from data.{paths} instead of weighting it 0)")
    if not d.train_paths and _split_weights(d.split) is None:
        c.fail("data.split", f"{d.split!r} is not 1-3 comma-separated non-negative numbers with a positive first one",
               "write train,validation,test weights, e.g. \"969,30,1\"")
    _check_tokenizer(c)


def _check_tokenizer(c: _Checks) -> None:
    d, tok = c.cfg.data, c.cfg.tokenizer
    if tok.type == "embedded" and d.embedded is None and (d.paths or d.train_paths):
        key = "data.paths" if d.paths else "data.train_paths"
        c.fail(c.blame("tokenizer.type", key),
               f"{key} needs its own tokenizer: {c.ref('tokenizer.type')} ships with the bundled corpus "
               "and works only with data.embedded",
               f"set tokenizer.type to the tokenizer {key} was preprocessed with: "
               "hf, gpt2bpe, tiktoken, sentencepiece or bytes")
    needs = {"hf": [("tokenizer.path", "a tokenizer.json")],
             "sentencepiece": [("tokenizer.path", "a SentencePiece .model file")],
             "gpt2bpe": [("tokenizer.vocab_file", "GPT-2's encoder.json"), ("tokenizer.merge_file", "GPT-2's vocab.bpe")],
             "tiktoken": [("tokenizer.name", "an encoding name such as cl100k_base")]}
    for key, what in needs.get(tok.type, []):
        if not c.value(key):
            c.fail(c.blame(key, "tokenizer.type"), f"tokenizer.type {tok.type} needs {key}", f"set {key} to {what}")
    used = {"hf": {"path"}, "sentencepiece": {"path"}, "gpt2bpe": {"vocab_file", "merge_file"},
            "tiktoken": {"name", "path", "cache_dir"}}.get(tok.type, set())
    for field in ("path", "vocab_file", "merge_file", "name", "cache_dir"):
        if field not in used and getattr(tok, field) is not None:
            key = f"tokenizer.{field}"
            c.fail(c.blame(key, "tokenizer.type"), f"is set but {c.ref('tokenizer.type')} does not use it",
                   f"remove {key} (--set {key}=null), or set tokenizer.type to the tokenizer it belongs to")


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check_launcher(c: _Checks) -> None:
    """The launcher keys each launcher.type needs, and those it would silently ignore."""
    la = c.cfg.launcher
    kind = la.type
    if kind in ("pdsh", "openmpi", "mvapich") and not la.hostfile:
        c.fail(c.blame("launcher.hostfile", "launcher.type"), f"launcher.type {kind} needs launcher.hostfile",
               "set launcher.hostfile to a file with one `HOST slots=N` line per node (see launch/hostfile.example)")
    uses = {"pdsh": {"hostfile", "include", "exclude"}, "openmpi": {"hostfile"}, "mvapich": {"hostfile"},
            "mpirun": {"hostfile"}}.get(kind, set())
    for field in ("hostfile", "include", "exclude"):
        if field not in uses and getattr(la, field) is not None:
            key = f"launcher.{field}"
            c.fail(c.blame(key, "launcher.type"), f"is set but {c.ref('launcher.type')} does not use it",
                   f"remove {key} (--set {key}=null), or set launcher.type to "
                   + ("pdsh" if field != "hostfile" else "pdsh, openmpi, mvapich or mpirun"))
    if la.include is not None and la.exclude is not None:
        c.fail(c.blame("launcher.exclude", "launcher.include"), f"set together with {c.ref('launcher.include')}",
               "use only one of launcher.include and launcher.exclude")
    for name in la.env:
        if not _ENV_NAME.fullmatch(name):
            c.fail("launcher.env", f"{name!r} is not an environment variable name",
                   "use letters, digits and underscores, not starting with a digit")
    for pattern in la.forward_env:
        if not _ENV_NAME.fullmatch(pattern.removesuffix("*")):
            c.fail("launcher.forward_env", f"{pattern!r} is not a variable name or a PREFIX*",
                   "list names like PYTHONPATH or prefixes like NCCL_*")


def _check_compile(c: _Checks) -> None:
    """training.compile compiles each transformer block (training/compiling.py). Tensor parallelism
    and ZeRO-3 train right compiled but break every block into pieces (measured), so compiling them
    buys nothing; recompute and sequence parallelism are not yet verified compiled."""
    cfg = c.cfg
    if not cfg.training.compile:
        return
    refused = [
        ("parallelism.tensor", cfg.parallelism.tensor > 1, "torch.compile cannot trace megatron-core's "
         "async all-reduce in the tensor-parallel layers, so each block breaks into 7 graphs",
         "set parallelism.tensor to 1"),
        ("parallelism.zero_stage", cfg.parallelism.zero_stage == 3, "ZeRO-3 gathers parameters in a hook on every "
         "layer that torch.compile must skip, so each block breaks into a graph per layer",
         "set parallelism.zero_stage to 1 or 2"),
        ("model.recompute", cfg.model.recompute != "none", "recomputed blocks are not verified compiled",
         "set model.recompute to none"),
        ("parallelism.sequence_parallel", cfg.parallelism.sequence_parallel, "sequence-parallel blocks are not "
         "verified compiled", "set parallelism.sequence_parallel to false"),
    ]
    for key, on, why, fix in refused:
        if on:
            c.fail(c.blame("training.compile", key), f"training.compile cannot be combined with {c.ref(key)}: {why}",
                   f"{fix}, or set training.compile to false")


def _split_weights(split: str) -> list[float] | None:
    try:
        weights = [float(w) for w in split.split(",")]
    except ValueError:
        return None
    ok = 1 <= len(weights) <= 3 and all(math.isfinite(w) and w >= 0 for w in weights) and weights[0] > 0
    return weights if ok else None


def layout_problems(cfg: Config, world_size: int | None = None,
                    origins: Mapping[str, str] | None = None) -> list[Problem]:
    c = _Checks(cfg, origins)
    _check_layout(c, world_size)
    return c.problems


def validate(cfg: Config, world_size: int | None = None, origins: Mapping[str, str] | None = None) -> None:
    """Cross-field checks; raises one :class:`ConfigError` listing every problem found.

    ``origins`` (from :func:`resolve`) lets each message name the file and line to edit.
    """
    c = _Checks(cfg, origins)
    _check_model(c)
    _check_recompute(c)
    _check_layout(c, world_size)
    _check_optim(c)
    _check_data(c)
    _check_launcher(c)
    _check_compile(c)
    c.problems += passthrough_problems(cfg.deepspeed, c.origin, cfg.parallelism.zero_stage,
                                       cfg.parallelism.sequence_parallel)
    if c.problems:
        raise ConfigError.of(c.problems)
