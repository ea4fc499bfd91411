"""Turn YAML files plus ``--set`` overrides into one validated, frozen :class:`Config`.

Every dotted key remembers where it was set last (``file:line``, ``--set`` or ``default``),
so each error can say where the bad value came from and how to fix it.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from typing import Any, Mapping, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from .secrets import MASK, URL_CREDENTIALS
from .schema import Config, Section

from .checks import layout_problems, validate
from .errors import DEFAULT, SET, ConfigError, Origins, Problem, yaml_value as _yaml_value

# libyaml is ~10x faster; both loaders keep node marks (line numbers).
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


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
        if key.strip().startswith("launcher") or URL_CREDENTIALS.search(raw):  # may hold a secret: not echoed
            text = f"{key}={MASK}"
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


__all__ = ["ConfigError", "Problem", "Origins", "load_config", "load_config_with_origins", "resolve",
           "validate", "layout_problems", "config_to_dict"]
