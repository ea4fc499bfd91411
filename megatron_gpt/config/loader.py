"""Turn YAML files plus ``--set`` overrides into one validated, frozen :class:`Config`.

Every dotted key remembers where it was set last (``file:line``, ``--set`` or ``default``),
so each error can say where the bad value came from and how to fix it.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from .schema import Config, Section

Origins = dict[str, str]
"""Dotted key -> where it was set last: ``"file.yml:12"``, ``"--set"`` or ``"default"``."""

DEFAULT = "default"
SET = "--set"

# libyaml is ~10x faster; both loaders keep node marks (line numbers).
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the config; ``origin`` is None when it is not known."""

    origin: str | None
    text: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.text}" if self.origin else self.text


class ConfigError(ValueError):
    """A config problem, with the file (and line), dotted key, what is wrong and the fix.

    Several problems found together are reported together, one per line, so a user fixes
    them in one pass instead of one per run.
    """

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[Problem, ...] = tuple(problems) or (Problem(None, message),)

    @classmethod
    def of(cls, problems: Sequence[Problem]) -> ConfigError:
        lines = [str(p) for p in problems]
        if len(lines) == 1:
            return cls(lines[0], problems)
        return cls(f"{len(lines)} problems in the config:\n" + "\n".join(f"  {line}" for line in lines), problems)


# --------------------------------------------------------------------------- reading YAML


def _read_file(path: str) -> tuple[dict[str, Any], Origins]:
    """Parse one YAML file into nested dicts, recording ``file:line`` for every key."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}; fix: check the path (relative paths "
                          f"are taken from the current directory, {os.getcwd()})") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory, not a config file; fix: name a .yml file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None

    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:  # empty file: contributes nothing
            return {}, {}
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"{path}:{node.start_mark.line + 1}: the top level must be a mapping of "
                              f"sections (model:, training:, ...), got {_node_kind(node)}")
        origins: Origins = {}
        return _construct_mapping(loader, node, path, "", origins), origins
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark else path
        context = f" ({e.context}, line {e.context_mark.line + 1})" if e.context and e.context_mark else ""
        raise ConfigError(f"{where}: invalid YAML: {e.problem}{context}; "
                          "fix: check the indentation and quoting on that line") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    finally:
        loader.dispose()


def _node_kind(node: yaml.Node) -> str:
    return "a list" if isinstance(node, yaml.SequenceNode) else f"the value {node.value!r}"


def _construct_mapping(loader: Any, node: yaml.MappingNode, path: str, prefix: str,
                       origins: Origins) -> dict[str, Any]:
    seen: dict[str, int] = {}
    for key_node, _ in node.value:  # duplicates silently override in plain YAML: reject them
        if key_node.tag == _MERGE_TAG:
            continue
        key, line = _key(key_node, path), key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"{path}:{line}: duplicate key '{prefix}{key}' (also on line {seen[key]}); "
                              "fix: keep only one of them")
        seen[key] = line
    loader.flatten_mapping(node)  # resolve `<<: *anchor` merges; explicit keys come last and win
    out: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key = _key(key_node, path)
        dotted = prefix + key
        origins[dotted] = f"{path}:{key_node.start_mark.line + 1}"
        if isinstance(value_node, yaml.MappingNode):
            out[key] = _construct_mapping(loader, value_node, path, dotted + ".", origins)
        else:
            out[key] = loader.construct_object(value_node, deep=True)
    return out


def _key(node: yaml.Node, path: str) -> str:
    # The raw text, so that keys like `on`/`yes` are not turned into booleans.
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"{path}:{node.start_mark.line + 1}: a key must be a plain name, got {_node_kind(node)}")
    return str(node.value)


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key; "
                          "fix: e.g. --set training.train_steps=5")
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({problem}); "
                          f"fix: quote it, e.g. --set '{key.strip()}=\"...\"'") from None
    return parts, value


# --------------------------------------------------------------------------- merging


def _forget(origins: Origins, dotted: str) -> None:
    """Drop the origins of a key and everything under it (its value was replaced wholesale)."""
    for k in [k for k in origins if k == dotted or k.startswith(dotted + ".")]:
        del origins[k]


def _merge(dst: dict[str, Any], src: Mapping[str, Any], origins: Origins, prefix: str = "") -> None:
    """Deep-merge ``src`` into ``dst``: mappings merge key by key, anything else (lists too) replaces."""
    for key, value in src.items():
        dotted = prefix + key
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, origins, dotted + ".")
        else:
            _forget(origins, dotted)
            dst[key] = value


def _empty_sections(data: dict[str, Any]) -> dict[str, Any]:
    # `model:` with every child commented out parses as null; treat it as "no overrides".
    return {k: ({} if v is None and _model_at([k]) is not None else v) for k, v in data.items()}


def _walk_origins(value: Any, dotted: str, origin: str, origins: Origins) -> None:
    origins[dotted] = origin
    if isinstance(value, dict):
        for k, v in value.items():
            _walk_origins(v, f"{dotted}.{k}", origin, origins)


def resolve(files: Sequence[str], overrides: Sequence[str] = ()) -> tuple[Config, Origins]:
    """Merge the files in order, apply overrides, and type-check; no cross-field checks."""
    files = [str(f) for f in files]  # accept Path objects
    data: dict[str, Any] = {}
    origins: Origins = {}
    for path in files:
        file_data, file_origins = _read_file(path)
        _merge(data, _empty_sections(file_data), origins)
        origins.update(file_origins)
    for text in overrides:
        parts, value = _parse_override(text)
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        _merge(data, _empty_sections(nested), origins)
        for i in range(1, len(parts)):  # enclosing sections keep the file they came from
            origins.setdefault(".".join(parts[:i]), SET)
        _walk_origins(value, ".".join(parts), SET, origins)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        problems = [_translate(err, origins) for err in e.errors(include_url=False)]
        raise ConfigError.of(sorted(problems, key=lambda p: _source_order(p.origin, files))) from None
    return cfg, origins


def _source_order(origin: str | None, files: Sequence[str]) -> tuple[int, int]:
    """Sort key: files in the order given, by line; then --set; then defaults."""
    path, _, line = (origin or "").rpartition(":")
    if line.isdigit() and path in files:
        return files.index(path), int(line)
    return (len(files), 0) if origin == SET else (len(files) + 1, 0)


def load_config_with_origins(files: Sequence[str], overrides: Sequence[str] = (),
                             world_size: int | None = None) -> tuple[Config, Origins]:
    """Like :func:`load_config`, also returning where each key was set."""
    cfg, origins = resolve(files, overrides)
    validate(cfg, world_size, origins)
    return cfg, origins


def load_config(files: Sequence[str], overrides: Sequence[str] = (), world_size: int | None = None) -> Config:
    """Load YAML ``files`` (later wins, nested sections merge, lists replace), then apply
    ``overrides`` (``section.key=value``, value parsed as YAML), then validate.

    ``world_size`` overrides ``launcher.nproc_per_node * launcher.num_nodes`` for the
    parallelism and batch-size checks (e.g. the size of the running job).
    """
    return load_config_with_origins(files, overrides, world_size)[0]


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain data (dicts, lists, str, numbers, bool, None) in schema order; loads back equal."""
    return cfg.model_dump(mode="json")


# --------------------------------------------------------------------------- schema lookups


def _unwrap(annotation: Any) -> Any:
    """``Optional[X]`` -> ``X``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _model_at(parts: Sequence[str]) -> type[BaseModel] | None:
    cls: Any = Config
    for part in parts:
        field = cls.model_fields.get(part)
        if field is None:
            return None
        cls = _unwrap(field.annotation)
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
    return cls


def _field_at(parts: Sequence[str]) -> Any:
    parent = _model_at(parts[:-1]) if parts else None
    return parent.model_fields.get(parts[-1]) if parent else None


def _sections() -> list[tuple[str, type[Section]]]:
    return [(name, cls) for name in Config.model_fields if (cls := _model_at([name])) is not None]


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _describe(field: Any) -> str:
    doc = (field.description or "").strip().splitlines()
    return f" -- {doc[0].strip()}" if doc else ""


# --------------------------------------------------------------------------- pydantic errors

_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "a string", "list_type": "a list",
    "model_type": "a mapping of keys", "dict_type": "a mapping of keys",
    "model_attributes_type": "a mapping of keys",
}
_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"),
           "less_than_equal": ("le", "<="), "less_than": ("lt", "<")}


def _got(value: Any) -> str:
    if value is None:
        return "null"
    return f"{value!r} ({type(value).__name__})"


def _origin_of(origins: Mapping[str, str], loc: Sequence[Any]) -> str:
    # List items (int parts) report the line of the list's key.
    return origins.get(".".join(str(p) for p in loc if isinstance(p, str)), DEFAULT)


def _dotted(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _translate(err: Mapping[str, Any], origins: Mapping[str, str]) -> Problem:
    loc = tuple(err["loc"])
    key, origin = _dotted(loc), _origin_of(origins, loc)
    if err["type"] == "extra_forbidden":
        return Problem(origin, f"unknown key '{key}'{_suggest_key([str(p) for p in loc])}")
    parts = [p for p in loc if isinstance(p, str)]
    field = _field_at(parts)
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "literal_error":
        options = [o for o in typing.get_args(_unwrap(field.annotation)) if o is not None] if field else []
        shown = ", ".join(_yaml_value(o) for o in options) or ctx.get("expected", "?")
        close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
        fix = f"did you mean {close[0]!r}?" if close else f"set {key} to one of: {shown}"
        return Problem(origin, f"{key}: expected one of {shown}, got {_got(value)}; fix: {fix}")
    if kind in _BOUNDS:
        name, op = _BOUNDS[kind]
        bound = ctx.get(name)
        return Problem(origin, f"{key}: must be {op} {bound}, got {_got(value)}; "
                               f"fix: set {key} to a value {op} {bound}{_describe(field) if field else ''}")
    if kind in _EXPECTED:
        expected = _EXPECTED[kind]
        fix = _type_fix(key, kind, value, field, expected)
        return Problem(origin, f"{key}: expected {expected}, got {_got(value)}; fix: {fix}")
    return Problem(origin, f"{key}: {err['msg']}, got {_got(value)}")


def _type_fix(key: str, kind: str, value: Any, field: Any, expected: str) -> str:
    if kind == "string_type" and value is not None and not isinstance(value, (dict, list)):
        return f"quote the value, e.g. {key.rsplit('.', 1)[-1]}: \"{value}\""
    if kind == "list_type" and isinstance(value, str):
        return f"write a list, e.g. {key.rsplit('.', 1)[-1]}: [{value}]"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        section = _model_at(key.split("."))
        first = next(iter(section.model_fields), "key") if section else "key"
        return f"write {key} as a section of keys, e.g. '{key}: {{{first}: ...}}'"
    default = None if field is None else field.default
    example = f", e.g. {_yaml_value(default)}" if default is not None and not isinstance(default, BaseModel) else ""
    tail = ", or remove the key to use the default" if value is None else ""
    return f"set {key} to {expected}{example}{tail}{_describe(field) if field else ''}"


def _suggest_key(parts: list[str]) -> str:
    *parent, name = parts
    prefix = ".".join(parent) + "." if parent else ""
    model = _model_at(parent)
    names = list(model.model_fields) if model else []
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    if "." in name and _field_at(name.split(".")) is not None:
        section, rest = name.split(".", 1)
        return f"; dotted keys work only with --set: in YAML nest it, e.g. '{section}: {{{rest}: ...}}'"
    # The right key in the wrong section (or at the top level) is a common slip.
    elsewhere = {f"{s}.{f}": f for s, cls in _sections() for f in cls.model_fields}
    close = difflib.get_close_matches(name, list(elsewhere.values()), n=1, cutoff=0.8)
    if close:
        full = next(k for k, v in elsewhere.items() if v == close[0])
        return f"; did you mean '{full}'? (it belongs to the {full.split('.')[0]} section)"
    where = f" in {'.'.join(parent)}" if parent else ""
    return f"; valid keys{where}: {', '.join(names)}" if names else ""


# --------------------------------------------------------------------------- cross-field checks


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


def _check_layout(c: _Checks, world_size: int | None) -> None:
    """World size vs tensor x pipeline, and the three batch sizes (shared with batch_layout)."""
    cfg = c.cfg
    tp, pp, t = cfg.parallelism.tensor, cfg.parallelism.pipeline, cfg.training
    world = cfg.world_size if world_size is None else world_size
    if world_size is None:
        world_desc = (f"world size {world} (launcher.nproc_per_node {cfg.launcher.nproc_per_node} x "
                      f"launcher.num_nodes {cfg.launcher.num_nodes})")
        world_fix = f"set launcher.nproc_per_node so the world size is a multiple of {tp * pp}"
    else:
        world_desc, world_fix = f"world size {world}", f"run with a world size that is a multiple of {tp * pp}"
    if world < 1 or world % (tp * pp):
        c.fail(c.blame("parallelism.tensor", "parallelism.pipeline", "launcher.nproc_per_node"),
               f"{world_desc} is not divisible by parallelism.tensor {tp} x parallelism.pipeline {pp} = {tp * pp}",
               f"{world_fix} (e.g. {_round_up(max(world, 1), tp * pp)}), or make tensor x pipeline divide {world}")
        return
    dp = world // (tp * pp)
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
    o, s, t = c.cfg.optimizer, c.cfg.schedule, c.cfg.training
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
    _check_layout(c, world_size)
    _check_optim(c)
    _check_data(c)
    _check_launcher(c)
    if c.problems:
        raise ConfigError.of(c.problems)


__all__ = ["ConfigError", "Problem", "Origins", "load_config", "load_config_with_origins", "resolve",
           "validate", "layout_problems", "config_to_dict"]
