"""Config loading: YAML files with `defaults:` inheritance, dot-path overrides, schema validation.

A config file may start with `defaults: base.yaml` (or a list of paths), relative to the file.
Parents are merged depth-first, left to right, and the child wins; mappings merge key by key,
lists and scalars are replaced whole. Command-line overrides (`dpo.sft_loss_weight=0.1`) are
applied last, their values parsed with YAML rules (`null`, `true`, `[1, 2]`, `"text"`).
`${a.b}` interpolations are resolved by OmegaConf after merging.

Every leaf remembers where it was set (a file, or the command line) so that a validation error
can say where to fix it.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import os
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired, Protocol, Required, TypeGuard, Union, cast

import pydantic
import typing_extensions
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

COMMAND_LINE = "the command line"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but `1e-6` is a float (YAML 1.2), not the string YAML 1.1 makes it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class TypedDictClass(Protocol):
    """A TypedDict class used as a schema: its annotations and which of its keys are required."""

    __required_keys__: frozenset[str]


class ConfigError(ValueError):
    """A user mistake in a config file or an override; the message says what and where."""


class ReportedError(Exception):
    """A failure whose message already says everything the user needs (e.g. which worker died,
    where and why): `run_cli_with_config` prints it without the driver's traceback, status 1."""


class LoadedConfig(typing.NamedTuple):
    """The merged config and, for every dotted leaf key, where its value came from."""

    values: dict[str, Any]
    sources: dict[str, str]


def load_config(
    path: str | os.PathLike,
    overrides: Sequence[str] = (),
    schema: TypedDictClass | None = None,
) -> dict[str, Any]:
    """Load a YAML config with its `defaults:` parents, apply overrides, validate, resolve.

    Args:
        path: the YAML file.
        overrides: `dotted.key=value` strings, applied in order after the files.
        schema: a TypedDict the result must match; `None` skips validation.

    Returns:
        The resolved config as plain Python containers.

    Raises:
        ConfigError: a missing or malformed file, a bad override, or a schema violation.
    """
    loaded = load_yaml_with_defaults(path)
    for override in overrides:
        apply_override(loaded, override)
    values = resolve_interpolations(loaded.values)
    if schema is not None:
        validate_config(values, schema, loaded.sources)
    return values


def load_yaml_with_defaults(path: str | os.PathLike) -> LoadedConfig:
    """Read `path` and merge in its `defaults:` parents (depth-first, child wins)."""
    return _load_file(Path(path).resolve(), chain=())


def _load_file(path: Path, chain: tuple[Path, ...]) -> LoadedConfig:
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"Config inheritance cycle: {cycle}")
    data = _read_yaml(path)
    parents = data.pop("defaults", None)
    if parents is None:
        parents = []
    elif isinstance(parents, str):
        parents = [parents]
    elif not (isinstance(parents, list) and all(isinstance(p, str) for p in parents)):
        raise ConfigError(f"{path}: 'defaults' must be a path or a list of paths, got {parents!r}")

    merged = LoadedConfig({}, {})
    for parent in parents:
        parent_path = (path.parent / parent).resolve()
        if not parent_path.is_file():
            raise ConfigError(
                f"{path}: 'defaults' names {parent!r}, but {parent_path} does not exist"
            )
        _merge_into(merged, _load_file(parent_path, (*chain, path)))
    _merge_into(merged, LoadedConfig(data, _leaf_sources(data, str(path))))
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}")
    try:
        data = _yaml_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"Malformed YAML in {where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _leaf_sources(data: Mapping[str, Any], source: str, prefix: str = "") -> dict[str, str]:
    sources = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        sources[dotted] = source
        if isinstance(value, Mapping):
            sources.update(_leaf_sources(value, source, f"{dotted}."))
    return sources


def _merge_into(base: LoadedConfig, top: LoadedConfig) -> None:
    """Merge `top` into `base` in place: mappings recursively, everything else replaced."""
    _merge_dicts(base.values, top.values)
    for key, source in top.sources.items():
        _set_source(base.sources, key, _get(top.values, key), source)


def _set_source(sources: dict[str, str], key: str, value: Any, source: str) -> None:
    if not isinstance(value, Mapping):
        # A non-mapping value replaces the whole subtree that may have been below it.
        for stale in [k for k in sources if k.startswith(f"{key}.")]:
            del sources[stale]
    sources[key] = source


def _merge_dicts(base: dict[str, Any], top: Mapping[str, Any]) -> None:
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge_dicts(base[key], value)
        else:
            base[key] = _copy(value)


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _get(values: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        values = values[part]
    return values


def apply_override(loaded: LoadedConfig, override: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML."""
    key, sep, raw = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"Bad override {override!r}: expected dotted.key=value, e.g. dpo.sft_loss_weight=0.1"
        )
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"Bad override {override!r}: the value is not valid YAML ({e})") from None

    parts = key.split(".")
    node = loaded.values
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:  # a missing or null section becomes a mapping
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            parent = ".".join(parts[: i + 1])
            raise ConfigError(
                f"Bad override {override!r}: {parent!r} is a {type(child).__name__}, not a mapping"
            )
        node = child
    node[parts[-1]] = value
    _set_source(loaded.sources, key, value, COMMAND_LINE)
    loaded.sources.update(
        _leaf_sources(value, COMMAND_LINE, f"{key}.") if isinstance(value, Mapping) else {}
    )


def resolve_interpolations(values: dict[str, Any]) -> dict[str, Any]:
    try:
        # A dict of str keys in, the same out (OmegaConf types it as any container).
        return cast(dict[str, Any], OmegaConf.to_container(OmegaConf.create(values), resolve=True))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"Cannot resolve interpolation at {key!r}: {e.msg}") from None


# ---------------------------------------------------------------------------------------------
# Validation against TypedDict schemas


def validate_config(
    values: Mapping[str, Any], schema: TypedDictClass, sources: Mapping[str, str]
) -> None:
    """Check `values` against the TypedDict `schema`; raise one ConfigError listing every problem.

    Unknown keys (with the closest valid names), missing required keys and values of the wrong
    type are reported with the dotted key and where the value came from.
    """
    errors: list[str] = []
    _check_typed_dict(values, schema, "", sources, errors)
    if len(errors) == 1:
        raise ConfigError(f"Invalid config: {errors[0]}")
    if errors:
        raise ConfigError("\n  ".join(["Invalid config:", *errors]))


def _where(dotted: str, sources: Mapping[str, str]) -> str:
    dotted = re.sub(r"\[\d+\]", "", dotted)  # list entries share their list's source
    if dotted in sources:
        return sources[dotted]
    # A section created by an override of one of its children, e.g. `policy.x=1`.
    children = {v for k, v in sources.items() if k.startswith(f"{dotted}.")}
    if len(children) == 1:
        return children.pop()
    # A key inside a subtree whose own keys were not tracked: the closest ancestor knows.
    parent = dotted.rpartition(".")[0]
    return _where(parent, sources) if parent else "the config"


def _check_typed_dict(
    values: Any, schema: TypedDictClass, prefix: str, sources: Mapping[str, str], errors: list[str]
) -> None:
    name = prefix.rstrip(".") or "the config"
    if not isinstance(values, Mapping):
        errors.append(
            f"{name!r} must be a mapping, got {_describe(values)} (from {_where(name, sources)})"
        )
        return
    hints = typing.get_type_hints(schema, include_extras=True)
    required = schema.__required_keys__
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            errors.append(_unknown_key_message(dotted, list(hints), sources))
            continue
        _check_value(value, _strip_required(hints[key]), dotted, sources, errors)
    for key in hints:
        if key in required and key not in values:
            where = _where(prefix.rstrip("."), sources) if prefix else "any config file"
            errors.append(f"missing required key '{prefix}{key}' (not set in {where})")


def _unknown_key_message(dotted: str, valid: list[str], sources: Mapping[str, str]) -> str:
    prefix, _, key = dotted.rpartition(".")
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    full = [f"{prefix}.{c}" if prefix else c for c in close]
    if full:
        hint = f"did you mean {' or '.join(repr(c) for c in full)}?"
    else:
        hint = f"valid keys here: {', '.join(sorted(valid))}"
    return f"unknown key {dotted!r} (from {_where(dotted, sources)}); {hint}"


def _check_value(
    value: Any, tp: Any, dotted: str, sources: Mapping[str, str], errors: list[str]
) -> None:
    if _is_typed_dict(tp):
        _check_typed_dict(value, tp, f"{dotted}.", sources, errors)
        return
    members = _union_members(tp)
    nested = [m for m in members if _is_typed_dict(m)]
    if nested and isinstance(value, Mapping):
        # A section that may also be null: validate it as the TypedDict it is.
        _check_typed_dict(value, nested[0], f"{dotted}.", sources, errors)
        return
    item_type = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
    if _is_typed_dict(item_type) and isinstance(value, list):
        # A list of sections (e.g. policy.scheduler): check each entry's keys too.
        for i, item in enumerate(value):
            _check_typed_dict(item, item_type, f"{dotted}[{i}].", sources, errors)
        return
    try:
        _adapter(tp).validate_python(value, strict=True)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        inner = "".join(f"[{p}]" for p in first["loc"])
        detail = first["msg"][0].lower() + first["msg"][1:]
        errors.append(
            f"{dotted!r}{inner}: {detail}, got {_describe(first['input'])} "
            f"(expected {_type_name(tp)}; from {_where(dotted, sources)})"
        )


@functools.cache
def _adapter(tp: Any) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(tp)


def _strip_required(tp: Any) -> Any:
    while typing.get_origin(tp) in (NotRequired, Required):
        tp = typing.get_args(tp)[0]
    return tp


def _union_members(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _is_typed_dict(tp: Any) -> TypeGuard[TypedDictClass]:
    return isinstance(tp, type) and typing_extensions.is_typeddict(tp)


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Annotated:  # e.g. Annotated[int, Ge(1)] -> "int >= 1"
        base, *metadata = typing.get_args(tp)
        bounds = [
            f"{symbol} {getattr(bound, name)}"
            for bound in metadata
            for name, symbol in _BOUNDS.items()
            if hasattr(bound, name)
        ]
        return " and ".join([_type_name(base), *bounds]).replace(" and ", " ", 1)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(member) for member in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


# ---------------------------------------------------------------------------------------------
# Writing and the command line


def save_config(values: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (keys in their original order), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(_copy(values), sort_keys=False, default_flow_style=False))
    os.replace(tmp, path)


def parse_cli(
    argv: Sequence[str] | None, default_config: str, description: str
) -> tuple[str, list[str]]:
    """Split a command line into the config path (`--config`) and the dot-path overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--config", default=default_config, help=f"YAML config (default: {default_config})"
    )
    parser.add_argument(
        "overrides", nargs="*", help="dot-path overrides, e.g. dpo.sft_loss_weight=0.1"
    )
    args = parser.parse_args(argv)
    return args.config, args.overrides


def run_cli_with_config(
    main: typing.Callable[[Any], Any],
    argv: Sequence[str] | None,
    default_config: str | os.PathLike,
    description: str,
    schema: TypedDictClass,
    *,
    check: typing.Callable[[Any], None] | None = None,
) -> Any:
    """Parse the command line, load and validate the config, and call `main(config)`.

    Args:
        main: the run; it gets the validated config.
        argv: the command line without the program name.
        default_config: the config file used without `--config`.
        description: the `--help` text.
        schema: the TypedDict the config must match.
        check: called with the config before `main`, for rules beyond the schema (and to
            resolve paths); raises ConfigError.

    A ConfigError (a user mistake), raised while loading, by `check` or by `main`, is printed as
    one message without a traceback and the process exits with status 2; a ReportedError (e.g. a
    worker's failure, which names the worker and the cause) likewise, with status 1. Any other
    exception propagates with its traceback: it is a bug, not a mistake in the input.
    """
    config_path, overrides = parse_cli(argv, str(default_config), description)
    try:
        config = load_config(config_path, overrides, schema)
        if check is not None:
            check(config)
        return main(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except ReportedError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
