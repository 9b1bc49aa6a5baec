"""Plugin discovery through versioned entry-point groups, with failure isolation.

Built-in commands, merge methods, quantisation schemes and formats register in mlc's own
pyproject.toml exactly as a third-party package would. Listing plugins never imports them; a plugin
that fails to import is reported in one line and skipped, and the others keep working.

MLC_LOAD_PLUGINS limits which packages' plugins load: a comma-separated list of distribution names
(the built-ins of the `mlc` distribution always load). Set it empty to load only the built-ins.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any

GROUPS = {
    "commands": "mlc.commands.v1",
    "merge_methods": "mlc.merge_methods.v1",
    "quant_schemes": "mlc.quant_schemes.v1",
    "formats": "mlc.formats.v1",
}
BUILTIN_DIST = "mlc"
ENV_ALLOW = "MLC_LOAD_PLUGINS"


@dataclass
class Plugin:
    kind: str  # a key of GROUPS
    name: str
    value: str  # "module:attr"
    package: str
    version: str
    error: str | None = None
    _loaded: Any = field(default=None, repr=False)

    @property
    def module(self) -> str:
        return self.value.split(":", 1)[0]

    @property
    def builtin(self) -> bool:
        return self.package == BUILTIN_DIST

    def load(self) -> Any:
        """Import and return the plugin object, or raise PluginLoadError (also recorded in .error).

        An object that does not implement its kind's contract (mlc.contracts) counts as broken too.
        """
        if self._loaded is None:
            if self.error:
                raise PluginLoadError(self)
            from importlib.metadata import EntryPoint

            from mlc.contracts import plugin_problem

            try:
                obj = EntryPoint(self.name, self.value, GROUPS[self.kind]).load()
            except Exception as e:  # a broken plugin must never take the others down
                self.error = f"{e.__class__.__name__}: {e}".splitlines()[0]
                raise PluginLoadError(self) from e
            if (why := plugin_problem(self.kind, obj)) is not None:
                self.error = f"TypeError: {why}"
                raise PluginLoadError(self)
            self._loaded = obj
        return self._loaded

    def help_line(self) -> str:
        """The first docstring line of the plugin's module, read from source without importing it."""
        path = module_file(self.module)
        if path is None:
            return ""
        try:
            with open(path, encoding="utf-8") as f:
                doc = ast.get_docstring(ast.parse(f.read()))
        except (OSError, SyntaxError, ValueError):
            return ""
        return (doc or "").strip().splitlines()[0] if doc else ""

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "object": self.value,
            "package": self.package,
            "version": self.version,
            "builtin": self.builtin,
            "status": "failed" if self.error else "ok",
            "error": self.error,
        }


class PluginLoadError(Exception):
    def __init__(self, plugin: Plugin):
        self.plugin = plugin
        super().__init__(f"plugin {plugin.name!r} from {plugin.package} {plugin.version} failed to load: {plugin.error}")


def module_file(module: str) -> str | None:
    """Locate a module's source file without executing it or its parent packages.

    Only the top-level package is looked up through the import system (editable installs map it there);
    below it, packages are plain directories, with or without __init__.py (namespace packages).
    """
    if module in sys.modules:
        return getattr(sys.modules[module], "__file__", None)
    top, *rest = module.split(".")
    try:
        spec = sys.modules[top].__spec__ if top in sys.modules else importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        return spec.origin if spec.has_location else None
    locations = list(spec.submodule_search_locations or [])
    for i, part in enumerate(rest):
        if i == len(rest) - 1:
            for loc in locations:
                for candidate in (os.path.join(loc, part + ".py"), os.path.join(loc, part, "__init__.py")):
                    if os.path.isfile(candidate):
                        return candidate
            return None
        locations = [os.path.join(loc, part) for loc in locations if os.path.isdir(os.path.join(loc, part))]
    return None


def allowed_packages() -> set[str] | None:
    raw = os.environ.get(ENV_ALLOW)
    if raw is None:
        return None
    return {p.strip().lower().replace("_", "-") for p in raw.split(",") if p.strip()} | {BUILTIN_DIST}


_cache: dict[str, list[Plugin]] = {}


def discover(kind: str) -> list[Plugin]:
    """Every plugin of one kind, allowed by MLC_LOAD_PLUGINS; built-ins first, duplicates marked failed."""
    if kind in _cache:
        return _cache[kind]
    group = GROUPS[kind]
    allowed = allowed_packages()
    found = [
        Plugin(kind, name, value, dist, version)
        for dist, version, groups in installed_entry_points()
        if allowed is None or dist in allowed
        for name, value in groups.get(group, [])
    ]
    found.sort(key=lambda p: (not p.builtin, p.package, p.name))
    owners: dict[str, Plugin] = {}
    for p in found:
        if p.name in owners:
            p.error = f"name {p.name!r} is already provided by {owners[p.name].package}"
        elif module_file(p.module) is None:
            p.error = f"module {p.module!r} not found"
        else:
            owners[p.name] = p
    _cache[kind] = found
    return found


_scan: list[tuple[str, str, dict[str, list[tuple[str, str]]]]] | None = None


def installed_entry_points() -> list[tuple[str, str, dict[str, list[tuple[str, str]]]]]:
    """(distribution, version, {group: [(name, value)]}) for each installed distribution with entry points.

    Reads the *.dist-info/entry_points.txt files on sys.path directly: parsing every package's METADATA
    through importlib.metadata costs tens of milliseconds that `mlc --help` cannot spare.
    """
    global _scan
    if _scan is not None:
        return _scan
    _scan = []
    seen: set[str] = set()
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if not name.endswith(".dist-info"):
                continue
            dist, _, version = name[: -len(".dist-info")].partition("-")
            dist = dist.lower().replace("_", "-")
            if dist in seen:  # the first one on sys.path wins, as for imports
                continue
            seen.add(dist)
            try:
                with open(os.path.join(entry or ".", name, "entry_points.txt"), encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            groups = _parse_entry_points(text)
            if any(g in groups for g in GROUPS.values()):
                _scan.append((dist, version, groups))
    return _scan


def _parse_entry_points(text: str) -> dict[str, list[tuple[str, str]]]:
    groups: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = groups.setdefault(line[1:-1].strip(), [])
        elif current is not None and "=" in line:
            name, value = line.split("=", 1)
            current.append((name.strip(), value.strip()))
    return groups


def available(kind: str) -> dict[str, Plugin]:
    """Plugins of one kind by name, without the ones that failed discovery."""
    return {p.name: p for p in discover(kind) if not p.error}


def load_all(kind: str, on_error: Any = None) -> dict[str, Any]:
    """Load every plugin of a kind; each failure is passed to on_error(plugin) and skipped."""
    loaded = {}
    for name, plugin in available(kind).items():
        try:
            loaded[name] = plugin.load()
        except PluginLoadError:
            if on_error is not None:
                on_error(plugin)
    return loaded


def load_one(kind: str, name: str) -> Any:
    """Load one plugin by name; raise MlcError naming the available ones if it is unknown or broken."""
    from mlc.errors import MlcError

    plugins = available(kind)
    if name not in plugins:
        names = ", ".join(sorted(plugins)) or "none"
        raise MlcError(f"unknown {kind.replace('_', ' ')[:-1]} {name!r}", f"available: {names}")
    try:
        return plugins[name].load()
    except PluginLoadError as e:
        raise MlcError(str(e), "reinstall the plugin's package or unset it with MLC_LOAD_PLUGINS") from None


def reset_cache() -> None:
    global _scan
    _cache.clear()
    _scan = None
