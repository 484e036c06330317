"""One plugin style for every pluggable kind: a registry of name -> factory, resolved once.

A config names a plugin by its kind and the kind's parameters. These spellings are the same
plugin (`kind` is `mode` in the server section and `dataset` in the task section):

    topology: random_regular                         a name alone (default parameters)
    topology: {kind: random_regular, degree: 4}      the kind and its parameters
    aggregation: {trimmed_mean: {trim: 0.2}}         {name: {parameters}}

Parameters of other kinds may sit under those kinds' names; they are checked, and kept for
when that kind is chosen (this is how a sweep over kinds gives each kind its parameters):

    topology: {kind: ring, random_regular: {degree: 4}, small_world: {k: 4, beta: 0.2}}

A parameter the chosen kind does not take is an error naming it. A factory's signature is
its parameters: annotations and defaults are the schema, checked with pydantic. Parameters
annotated with a registry (`Annotated[Distribution, DISTRIBUTIONS]`) are plugins themselves,
resolved through that registry. Names the engine fills (the population size, a seed from the
run's seed tree) are not the config's to set. `"package.module:attr"` names an out-of-tree
factory of any kind.

This module knows no registry: policies/ and scenarios/ define theirs, and the wiring
(engine/resolve.py) turns a config into objects with them, once.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import ConfigDict, ValidationError, create_model

from engine.core.errors import ConfigError, shown

T = TypeVar("T")

SIMPLE = (bool, int, float, str, type(None))  # defaults worth writing into the resolved config


@dataclass(frozen=True)
class PluginSpec:
    """A plugin as the config names it: its kind, that kind's parameters, and parameters kept
    for other kinds (under their names). `where` is the config path of its parameters (an
    error names `where.param`), `kind_where` that of its name."""

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)
    others: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    where: str = ""
    kind_where: str = ""


def _is_import_path(name: str) -> bool:
    return ":" in name


class Registry(Generic[T]):
    """name -> factory for one pluggable kind.

    `runtime`: the factory's leading parameters that its caller supplies each time (a
    topology's number of peers and generator): `build` then returns the factory with the
    config's parameters bound (functools.partial). `engine`: parameters the engine fills at
    build time, never the config. `check(factory)` returns why an out-of-tree factory is not
    a plugin of this kind (None if it is)."""

    def __init__(self, noun: str, entries: Mapping[str, Callable[..., T]], *,
                 runtime: tuple[str, ...] = (), engine: tuple[str, ...] = (),
                 check: Callable[[Callable], str | None] | None = None) -> None:
        self.noun, self.entries = noun, dict(entries)
        self.runtime, self.engine, self._check = runtime, engine, check

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> Callable[..., T]:
        return self.entries[name]

    def __iter__(self):
        return iter(sorted(self.entries))

    def names(self) -> list[str]:
        return sorted(self.entries)

    # -- names -> factories ----------------------------------------------------------------

    def factory(self, name: str, where: str) -> Callable[..., T]:
        """The factory registered as `name`, or imported from "package.module:attr"."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: a {self.noun} is named by a string (got {shown(name)})")
        if not _is_import_path(name):
            if name in self.entries:
                return self.entries[name]
            raise ConfigError(f"{where}: unknown {self.noun} {shown(name)}; allowed: "
                              f"{', '.join(self.names())} or package.module:attr")
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError):
            raise ConfigError(f"{where}: cannot import {shown(name)}") from None
        problem = self._check(factory) if self._check else None
        if problem:
            raise ConfigError(f"{where}: {shown(name)} {problem}")
        return factory

    def parameters(self, factory: Callable) -> dict[str, inspect.Parameter]:
        """The factory's parameters a config may set (not its runtime or engine ones)."""
        skip = set(self.runtime) | set(self.engine)
        return {name: p for name, p in inspect.signature(factory).parameters.items()
                if name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    # -- config values -> specs ------------------------------------------------------------

    def spec(self, value: Any, where: str, kind_key: str = "kind",
             default: str | None = None) -> PluginSpec:
        """A config value as a PluginSpec: a name; a mapping with `kind_key`; a one-key
        mapping {name: {params}} (errors then name `where.name.param`); or, with a
        `default`, a mapping of that kind's parameters."""
        if value is None and default is not None:
            value = {}
        if isinstance(value, str):
            return self.section(value, {}, where, where)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: a {self.noun} is a name or a mapping (got "
                              f"{shown(value)})")
        items = dict(value)
        if kind_key in items:
            return self.section(items.pop(kind_key), items, where, f"{where}.{kind_key}")
        named = [k for k in items if k in self.entries or _is_import_path(str(k))]
        if len(items) == 1 and named:
            (name,) = named
            return self.section(name, {name: items[name]}, where, where)
        if default is None:
            raise ConfigError(f"{where}: name the {self.noun} with `{kind_key}` or as "
                              "{name: {param: value}}")
        return self.section(default, items, where, f"{where}.{kind_key}")

    def section(self, kind: str, items: Mapping[str, Any], where: str,
                kind_where: str) -> PluginSpec:
        """A config section's plugin items split: the chosen kind's parameters (flat, or
        under its own name), and the parameters kept for other kinds under theirs."""
        factory = self.factory(kind, kind_where)
        taken = self.parameters(factory)
        params, others, own = {}, {}, False
        for key, value in items.items():
            if key == kind and key not in taken and isinstance(value, Mapping | None):
                params, own = {**dict(value or {}), **params}, True
            elif key not in taken and (key in self.entries or _is_import_path(str(key))):
                if not isinstance(value, Mapping | None):
                    raise ConfigError(f"{where}.{key}: parameters of the {self.noun} "
                                      f"{key!r} are a mapping (got {shown(value)})")
                others[key] = dict(value or {})
            else:
                params[key] = value
        flat = any(k in taken for k in items)
        return PluginSpec(kind, params, others, f"{where}.{kind}" if own and not flat else where,
                          kind_where)

    # -- specs -> objects ------------------------------------------------------------------

    def make(self, kind: str, where: str | None = None, engine: Mapping[str, Any] | None = None,
             /, **params: Any) -> T:
        """The plugin `kind` with `params`, checked as a config's would be (errors name
        `where`, default: the registry's noun), the engine's values in `engine`; for tests,
        benchmarks and plugin authors."""
        where = where or self.noun.replace(" ", "_")
        return self.build(self.section(kind, params, where, f"{where}.kind"), **(engine or {}))

    def build(self, spec: PluginSpec, **engine: Any) -> T:
        """The plugin: its factory called with the checked parameters (and the engine's
        values for those of `engine` it takes); with runtime parameters, the factory with
        these bound. The parameters kept for other kinds are checked too."""
        for kind, params in spec.others.items():
            self.validated(kind, params, f"{spec.where}.{kind}")
        factory = self.factory(spec.kind, spec.kind_where)
        kwargs = self.validated(spec.kind, spec.params, spec.where)
        signature = inspect.signature(factory).parameters
        kwargs.update({k: v for k, v in engine.items() if k in signature and k in self.engine})
        if self.runtime:
            return functools.partial(factory, **kwargs)
        try:
            return factory(**kwargs)
        except ValueError as err:  # ConfigError too: a factory's own check of its values
            raise ConfigError(_located(str(err), spec.where, self.parameters(factory))) from None

    def validated(self, kind: str, params: Mapping[str, Any], where: str) -> dict[str, Any]:
        """`params` checked against the factory's signature (nested plugins built); the
        first problem is a ConfigError naming `where.param`."""
        factory = self.factory(kind, where)
        taken = self.parameters(factory)
        for name in params:
            if name in self.engine:
                raise ConfigError(f"{where}.{name}: set by the engine, not in the config")
            if name not in taken:
                allowed = ", ".join(taken) or "none"
                raise ConfigError(f"{where}.{name}: {self.noun} {kind!r} takes no parameter "
                                  f"{name!r} (its parameters: {allowed})")
        hints = typing.get_type_hints(factory, include_extras=True)
        fields, values = {}, {}
        for name, parameter in taken.items():
            hint = hints.get(name, Any)
            nested = _registry_of(hint)
            default = ... if parameter.default is parameter.empty else parameter.default
            if nested is not None:
                fields[name] = (Any, default)
                if name in params:
                    values[name] = nested.build(nested.spec(params[name], f"{where}.{name}"))
            else:
                fields[name] = (hint, default)
                if name in params:
                    values[name] = params[name]
        model = create_model(f"{kind}_parameters", __config__=_STRICT, **fields)
        try:
            checked = model(**values)
        except ValidationError as err:
            raise ConfigError(_error_line(err, where)) from None
        return {name: getattr(checked, name) for name in values}

    def describe(self, spec: PluginSpec, kind_key: str = "kind") -> dict[str, Any]:
        """The spec as the resolved config records it: the kind, its parameters with the
        factory's plain defaults filled in, and the parameters kept for other kinds."""
        factory = self.factory(spec.kind, spec.kind_where)
        defaults = {name: _plain(p.default) for name, p in self.parameters(factory).items()
                    if p.default is not p.empty and _plain(p.default) is not _NOT_PLAIN}
        return {kind_key: spec.kind, **defaults, **dict(spec.params), **dict(spec.others)}

    def checked_names(self, names: Iterable[str]) -> None:
        for name in names:
            self.factory(name, self.noun)


def describe_registry(registry: Registry) -> list[str]:
    """One line per entry: its name and parameters with defaults, e.g. `krum(f=None)`."""
    lines = []
    for name in registry.names():
        params = []
        for pname, p in registry.parameters(registry[name]).items():
            default = "" if p.default is p.empty else f"={_shown_default(p.default)}"
            params.append(f"{pname}{default}")
        lines.append(f"{name}({', '.join(params)})" if params else name)
    return lines


def _shown_default(value: Any) -> str:
    plain = _plain(value)
    if plain is not _NOT_PLAIN:
        return repr(plain)
    return getattr(value, "__name__", type(value).__name__)  # a plugin: its name


_NOT_PLAIN = object()


def _plain(value: Any) -> Any:
    """A default as a config value (lists for tuples), or _NOT_PLAIN for objects."""
    if isinstance(value, SIMPLE):
        return value
    if isinstance(value, tuple | list) and all(isinstance(v, SIMPLE) for v in value):
        return list(value)
    return _NOT_PLAIN


_STRICT = ConfigDict(extra="forbid", arbitrary_types_allowed=True)  # lax, as validate_call


def _located(message: str, where: str, params: Mapping[str, Any]) -> str:
    """A factory's error message with the config path in front: `where.param: ...` when it
    starts with one of its parameters, as it is when it names a config path already."""
    head = message.split(":", 1)[0]
    if head in params:
        return f"{where}.{message}"
    if "." in head and " " not in head:  # names a config path of its own
        return message
    if head.split(".")[0] == where.split(".")[0] or head.startswith(where):
        return message
    return f"{where}: {message}"


def _registry_of(hint: Any) -> Registry | None:
    """The registry in an `Annotated[..., registry]` hint (a nested plugin), if any."""
    for extra in getattr(hint, "__metadata__", ()):
        if isinstance(extra, Registry):
            return extra
    for arg in typing.get_args(hint):  # Optional[Annotated[...]]
        found = _registry_of(arg) if arg is not type(None) else None
        if found is not None:
            return found
    return None


def _error_line(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    got = "" if first["type"] == "missing" else f" (got {shown(first.get('input'))})"
    return f"{where}.{key}: {msg}{got}"
