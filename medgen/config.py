"""Configs: YAML files and dotted command-line overrides (`train.lr=1e-4`), checked against a schema.

A schema is a dataclass whose fields are the config's sections; each section is a dataclass
whose fields are its keys (OmegaConf structured configs). Each key is declared once, in its
section, with its type, default and allowed values (`setting(default, ge=..., choices=...)`)
and the comment on its line, which `medgen config show STAGE` prints next to it. Loading a
config (`defaults <- YAML <- overrides`) checks it against the schema, and every problem is one
`ConfigError` (printed by the CLI as one `medgen: error:` line, exit 2):

- an unknown key, in a file or on the command line, names the key and suggests the closest valid one;
- a value of the wrong type, out of range, or not among the choices names the key, the value and
  what is allowed;
- rules between keys live in a section's `validate()` method, which runs after the merge.

The loaded config stays an OmegaConf `DictConfig` (attribute access `cfg.train.max_steps`,
typed: a later assignment of a wrong type fails too). The resolved config is saved into every
run directory as `config.yaml`, so a run can be rebuilt from its folder alone.

Adding a key: one field in its section's dataclass, e.g.
`grad_clip: float | None = setting(None, gt=0)  # clip the gradient norm (null: off)`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import io
import os
import re
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medgen.errors import ConfigError
from medgen.io import atomic_write_text

# ----------------------------------------------------------------------------- declaring a schema


def setting(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, choices: Sequence[Any] | None = None, length: int | Sequence[int] | None = None,
            exists: bool = False, allowed: str | None = None) -> Any:
    """A schema key: its default and what values it allows, checked when a config loads.

    `ge/gt/le/lt` bound a number (each element of a list); `choices` lists the allowed values;
    `length` the allowed list length(s); `exists=True` marks an input path that must exist
    before a run starts (checked by `check_input_paths`); `allowed` describes, in words, what a
    key typed `Any` accepts (its section's `validate()` checks it). Mutable defaults are copied.
    """
    meta = {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": tuple(choices) if choices else None,
                              "length": length, "exists": exists or None, "allowed": allowed}.items() if v is not None}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type) -> Any:
    """A nested section (a dataclass) with its own defaults."""
    return dataclasses.field(default_factory=cls)


def optional_view(cls: type, name: str, doc: str, **checks: Any) -> type:
    """A copy of section `cls` whose every key defaults to null ("not set here").

    For a section that inherits its values from elsewhere (the diffusion stage's `data:` from
    its autoencoder run); nested sections become optional too. Checks and docs are kept, except
    for the keys given as `name=setting(None, ...)`, whose checks replace the original ones.
    """
    hints = typing.get_type_hints(cls)
    fields = [(f.name, hints[f.name] | None,
               dataclasses.field(default=None, metadata=checks[f.name].metadata if f.name in checks else f.metadata))
              for f in dataclasses.fields(cls)]
    view = dataclasses.make_dataclass(name, fields)
    view.__doc__ = doc
    view.docs_from = cls  # `field_docs` reads the comments of the original class
    return view


# ----------------------------------------------------------------------------- schema introspection


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(type without None, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), len(args) < len(typing.get_args(tp))
    return tp, False


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def schema_fields(cls: type) -> list[tuple[dataclasses.Field, Any, bool]]:
    """(field, type without None, nullable) of a section, in declaration order."""
    hints = typing.get_type_hints(cls)
    return [(f, *_unwrap(hints[f.name])) for f in dataclasses.fields(cls)]


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a schema, sections included (`train`, `train.max_steps`, ...)."""
    keys = []
    for f, tp, _ in schema_fields(cls):
        keys.append(prefix + f.name)
        if _is_section(tp):
            keys += schema_keys(tp, f"{prefix}{f.name}.")
    return keys


def field_docs(cls: type) -> dict[str, str]:
    """The comment on each field's line (or the comment lines just above it) in the class source."""
    docs: dict[str, str] = {}
    for klass in reversed(getattr(cls, "docs_from", cls).__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        comments = {tok.start[0]: tok.string.lstrip("#").strip() for tok in
                    tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
        above: list[str] = []
        for lineno, line in enumerate(source.splitlines(), start=1):
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(comments.get(lineno, ""))
                continue
            m = re.match(r"\s+(\w+)\s*:", line)
            if m and m.group(1) in {f.name for f in dataclasses.fields(klass)}:
                text = " ".join([*above, comments.get(lineno, "")]).strip()
                if text:
                    docs[m.group(1)] = text
            above = []
    return docs


def describe(tp: Any, meta: dict | None = None, nullable: bool = False) -> str:
    """What a key allows, in words: 'an integer >= 1', 'one of no, fp16, bf16', 'a list of 2 numbers or null'."""
    meta = meta or {}
    if "allowed" in meta:
        return meta["allowed"] + (" or null" if nullable else "")
    if "choices" in meta:
        text = "one of " + ", ".join(show_value(c) for c in meta["choices"])
    else:
        origin = typing.get_origin(tp)
        if origin in (list, Sequence, tuple) or tp in (list, ListConfig):
            item = (typing.get_args(tp) or (Any,))[0]
            length = meta.get("length")
            n = (f"{length} " if isinstance(length, int) else
                 f"{' or '.join(map(str, length))} " if length else "")
            text = f"a list of {n}{_NOUNS.get(item, ('values',))[-1]}"
        else:
            text = _NOUNS.get(tp, ("a value",))[0]
        bounds = [f"{op} {show_value(meta[k])}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if k in meta]
        if bounds:
            text += " " + " and ".join(bounds)
    if nullable:
        text = text.replace(" or ", ", ") + " or null" if text == "true or false" else text + " or null"
    return text


_NOUNS = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "true/false values"),
          str: ("a string", "strings"), Any: ("any value", "values")}


def show_value(value: Any) -> str:
    """A value as the user would type it: null, true, [1, 2], abc."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show_value(v)}" for k, v in value.items()) + "}"
    return str(value)


# ----------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), schema: type | None = None) -> DictConfig:
    """Merge `schema` defaults <- YAML file <- `key.sub=value` overrides; return a resolved DictConfig.

    Without a schema the merge is untyped (used where only one section is read, e.g. `data:`).
    """
    layers: list[tuple[Any, str]] = []
    if path is not None:
        layers.append((_read_yaml(Path(path)), f"{path}: "))
    if overrides:
        layers.append((parse_overrides(overrides), ""))
    return merge_config(schema, layers)


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """`["train.lr=1e-4", ...]` as a config layer; ConfigError for an item that is not key=value."""
    bad = [item for item in overrides if "=" not in item or item.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key.sub=value")
    for item in overrides:  # one at a time, so that the error names the key
        try:
            OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            key = item.partition("=")[0]
            raise ConfigError(f"{item}: cannot read the value of {key} ({_yaml_problem(e)}); write lists as "
                              f"{key}=[1,2] and quote text with spaces or special characters") from None
    return OmegaConf.from_dotlist(list(overrides))


def merge_config(schema: type | None, layers: Sequence[tuple[Any, str]]) -> DictConfig:
    """`schema` defaults <- each layer (a dict or DictConfig; `where` prefixes its error messages).

    Checks keys per layer and values after the merge (see the module docstring).
    """
    cfg = OmegaConf.structured(schema) if schema is not None else OmegaConf.create({})
    for layer, where in layers:
        layer = layer if isinstance(layer, DictConfig) else OmegaConf.create(layer)
        if schema is not None:
            _check_keys(layer, schema, where)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(where + _merge_message(e, layer, schema)) from None
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"could not resolve the config: {_first_line(e)}") from None
    if schema is not None:
        _check_values(cfg, schema)
    return cfg


def _first_line(e: Exception) -> str:
    msg = getattr(e, "msg", None) or str(e)
    return msg.strip().splitlines()[0] if msg.strip() else type(e).__name__


def _yaml_problem(e: Exception) -> str:
    """What a YAML parser error says, in one line: 'while parsing a flow sequence: did not find expected ...'."""
    parts = [getattr(e, "context", None), getattr(e, "problem", None)]
    return ": ".join(p for p in parts if p) or _first_line(e)


def yaml_error(path: Path, e: yaml.MarkedYAMLError) -> ConfigError:
    """'FILE:LINE:COL: not valid YAML: what the parser says', for any YAML file a user wrote
    (configs, a release's card.yaml); the parser counts lines and columns from 0."""
    mark = e.problem_mark or e.context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    return ConfigError(f"{where}: not valid YAML: {_yaml_problem(e)}")


def _read_yaml(path: Path) -> DictConfig:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass a YAML file (e.g. configs/demo_autoencoder_2d.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except yaml.MarkedYAMLError as e:
        raise yaml_error(path, e) from None
    except Exception as e:  # OmegaConf's own errors, undecodable bytes
        raise ConfigError(f"config file {path} is not valid YAML: {_first_line(e)}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} must hold sections (data:, train:, ...), not a {type(loaded).__name__}")
    return loaded


def _check_keys(node: DictConfig, cls: type, where: str, prefix: str = "", root: type | None = None) -> None:
    """Raise on the first key of `node` that `cls` does not declare, suggesting the closest valid key."""
    root = root or cls
    fields = {f.name: tp for f, tp, _ in schema_fields(cls)}
    for key in node.keys():
        key = str(key)
        full = prefix + key
        if key not in fields:
            leaf = full
            child = node._get_node(key)
            while isinstance(child, DictConfig) and len(child):  # name the first leaf: trian.max_steps
                first = str(next(iter(child.keys())))
                leaf, child = f"{leaf}.{first}", child._get_node(first)
            raise ConfigError(where + _unknown_key_message(leaf, root))
        value = node._get_node(key)
        if _is_section(fields[key]) and isinstance(value, DictConfig):
            _check_keys(value, fields[key], where, full + ".", root)
        elif isinstance(value, DictConfig) and typing.get_origin(fields[key]) is not dict and fields[key] not in (dict, Any):
            tp, meta, nullable = _lookup(root, full)  # a mapping where a value belongs (`data.shape=a: b`)
            raise ConfigError(f"{where}{full}={show_value(value)}: expected {describe(tp, meta, nullable)}")
        elif _is_section(fields[key]) and value._value() is not None:
            first = dataclasses.fields(fields[key])[0].name
            raise ConfigError(f"{where}{full}={show_value(value)}: {full} is a section; set its keys, e.g. {full}.{first}=...")


def _unknown_key_message(key: str, schema: type) -> str:
    known = schema_keys(schema)
    sections = {k for k in known if any(other.startswith(k + ".") for other in known)}
    head, _, leaf = key.rpartition(".")
    if head in sections:  # a typo in the key: compare with its section's keys
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == head]
        close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
        if close:
            return f"unknown config key {key}; did you mean {head}.{close[0]}?"
        return f"unknown config key {key}; {head} holds {', '.join(siblings)}"
    close = difflib.get_close_matches(key, [k for k in known if k not in sections], n=1, cutoff=0.6)
    if close:  # a typo in the section
        return f"unknown config key {key}; did you mean {close[0]}?"
    return f"unknown config key {key}; the sections are {', '.join(k for k in known if '.' not in k)}"


def _lookup(schema: type, key: str) -> tuple[Any, dict, bool] | None:
    """(type, metadata, nullable) of dotted `key` (list indices dropped), or None."""
    cls: Any = schema
    parts = re.sub(r"\[\d+\]", "", key).split(".")
    for i, part in enumerate(parts):
        found = {f.name: (f, tp, nullable) for f, tp, nullable in schema_fields(cls)}.get(part)
        if found is None:
            return None
        f, tp, nullable = found
        if i == len(parts) - 1:
            return tp, dict(f.metadata), nullable
        cls = tp
    return None


def _merge_message(e: OmegaConfBaseException, layer: DictConfig, schema: type | None) -> str:
    key = re.sub(r"\[\d+\]$", "", str(getattr(e, "full_key", "") or ""))
    if not key or schema is None:
        return f"invalid config: {_first_line(e)}"
    value = OmegaConf.select(layer, key, throw_on_missing=False)
    spec = _lookup(schema, key)
    if spec is None:
        return f"{key}={show_value(value)}: {_first_line(e)}"
    tp, meta, nullable = spec
    return f"{key}={show_value(value)}: expected {describe(tp, meta, nullable)}"


def _check_values(cfg: DictConfig, cls: type, prefix: str = "") -> None:
    """Ranges, choices and list lengths of every key, then each section's `validate()`."""
    for f, tp, nullable in schema_fields(cls):
        key, meta = prefix + f.name, dict(f.metadata)
        value = cfg[f.name]
        if value is None:
            continue
        if _is_section(tp):
            _check_values(value, tp, key + ".")
            continue
        if "choices" in meta and isinstance(value, str) and value in ("True", "False") and value not in meta["choices"]:
            # YAML 1.1 reads `no`/`off` as false: `train.mixed_precision=no` means the choice "no"
            alias = {"False": ("no", "off", "none"), "True": ("yes", "on")}[value]
            value = next((c for c in alias if c in meta["choices"]), value)
            cfg[f.name] = value
        if not _allowed(value, meta):
            raise ConfigError(f"{key}={show_value(value)}: expected {describe(tp, meta, nullable)}")
    if callable(getattr(cls, "validate", None)):
        OmegaConf.to_object(cfg).validate()


def _allowed(value: Any, meta: dict) -> bool:
    if "choices" in meta:
        return any(value == c and type(value) is type(c) for c in meta["choices"])
    items = list(value) if isinstance(value, (ListConfig, list, tuple)) else [value]
    if "length" in meta and isinstance(value, (ListConfig, list, tuple)):
        lengths = (meta["length"],) if isinstance(meta["length"], int) else tuple(meta["length"])
        if len(items) not in lengths:
            return False
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if ("ge" in meta and not v >= meta["ge"]) or ("gt" in meta and not v > meta["gt"]) or \
                ("le" in meta and not v <= meta["le"]) or ("lt" in meta and not v < meta["lt"]):
            return False
    return True


def input_paths(cfg: Any, schema: type | None = None, prefix: str = "") -> dict[str, str]:
    """`{"data.path": value, ...}`: every `setting(..., exists=True)` key that is set, in schema order.

    The schema is the config's own structured type when not given; plain dicts have none.
    """
    schema = schema or (OmegaConf.get_type(cfg) if isinstance(cfg, DictConfig) else None)
    if schema is None or not _is_section(schema):
        return {}
    found: dict[str, str] = {}
    for f, tp, _ in schema_fields(schema):
        value = cfg[f.name] if f.name in cfg else None
        if value is None:
            continue
        if _is_section(tp):
            found |= input_paths(value, tp, f"{prefix}{f.name}.")
        elif f.metadata.get("exists"):
            found[f"{prefix}{f.name}"] = str(value)
    return found


def check_counts(options: dict[str, int | None], minimum: int = 1) -> None:
    """Raise `ConfigError` naming the first command-line count (`{"--n": 0, ...}`) below `minimum`
    (None: not given). Called before any work: a 0 must not fall back to a default or fail late."""
    for flag, value in options.items():
        if value is not None and value < minimum:
            raise ConfigError(f"{flag} {value}: expected an integer >= {minimum}")


def check_input_paths(cfg: Any, schema: type | None = None) -> None:
    """Raise `ConfigError` naming the first input path key (`input_paths`) whose path does not exist.

    Called before a run creates its folder.
    """
    for key, value in input_paths(cfg, schema).items():
        if not Path(value).exists():
            raise ConfigError(f"{key}: {value} does not exist")


# ----------------------------------------------------------------------------- saving, reading, showing


def save_config(cfg: DictConfig | dict, path: str | os.PathLike) -> None:
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def to_dict(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg


def select(cfg: DictConfig, key: str, default: Any = None) -> Any:
    """`cfg.a.b` with a default when any part is missing."""
    value = OmegaConf.select(cfg, key, default=default)
    return default if value is None else value


def annotated_yaml(cfg: DictConfig, schema: type) -> str:
    """The config as YAML with, after each key, what it allows and its comment from the schema."""
    lines: list[str] = []

    def walk(node: DictConfig, cls: type, indent: str) -> None:
        docs = field_docs(cls)
        for f, tp, nullable in schema_fields(cls):
            value = node[f.name]
            if _is_section(tp):
                about = docs.get(f.name) or (inspect.getdoc(tp) or "").split("\n\n")[0].replace("\n", " ")
                lines.append(f"{indent}{f.name}:" + (" null" if value is None else "") + (f"  # {about}" if about else ""))
                if value is not None:
                    walk(value, tp, indent + "  ")
                continue
            text = OmegaConf.to_yaml(OmegaConf.create({f.name: _plain(value)})).strip() if value is not None \
                else f"{f.name}: null"
            if "\n" in text:  # lists and dicts in flow style, one line each
                text = f"{f.name}: {show_value(value)}"
            note = describe(tp, dict(f.metadata), nullable)
            doc = docs.get(f.name)
            lines.append(f"{indent}{text}  # {note}" + (f"; {doc}" if doc else ""))

    walk(cfg, schema, "")
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
