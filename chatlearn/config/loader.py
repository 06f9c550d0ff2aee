"""Reading config files the ChatLearn way: YAML, `${NAME:default}`, `includes:`, model files.

`load_tree(path)` returns the merged mapping of a main config file plus, for every key, where it
came from ("file:line"), so that later checks can name the exact place to change.

Rules (ChatLearn's, with its rough edges made into errors):
- A string value that starts with `${` is `${NAME}` or `${NAME:default}` as a whole value. An
  environment variable that is set wins over the default; either is read as a Python literal
  (`"8"` → 8, `"True"` → True, `"null"`/`"None"` → None, anything else stays the string). Unset
  without a default → None with a warning. Mappings and lists are processed recursively. A value
  that starts with `${` but is not a whole placeholder (`${A}/x`) is an error, not a silent mess.
- `includes:` (a list, in the main file or a model file): paths are resolved against the main
  config's directory, recursively (as ChatLearn does; a path not found there, against the
  directory of the file that includes it); later includes override earlier ones, the file's own
  keys override its includes, nested mappings merge key by key. A cycle is an error.
- Numbers as ChatLearn reads them: YAML 1.1 (PyYAML) leaves `5e-3`, `1e5`, `-1E-4` and `1.0e5`
  strings (its floats need a dot and a signed exponent); here they are floats, so an optimizer gets
  `learning_rate: 5e-3` as a number. Only this module's Loader subclass has the rule, never
  PyYAML's global loaders. (`.5`, `1_000` and `0x10` are numbers in YAML 1.1 already.) A number
  in quotes stays a string here; the keys that take a number read it as one
  (`schema.read_quoted_number`), as ChatLearn, which reads every such string as a number, does.
- Duplicate keys in one mapping keep the last value, as ChatLearn (PyYAML) does, with a warning
  naming both places; with `CHATLEARN_STRICT_CONFIG=1` in the environment they are an error.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, logger

Origins = dict[str, str]  # dotted key path -> "file:line"

STRICT_ENV = "CHATLEARN_STRICT_CONFIG"

_PLACEHOLDER = re.compile(r"\$\{([^:}]*)(?::(.*))?\}", re.DOTALL)
_MERGE_TAG = "tag:yaml.org,2002:merge"
# Values a config may hold once its aliases are expanded: far beyond any real config.
MAX_EXPANDED_VALUES = 1_000_000
# A mantissa (digits with an optional fraction, or a bare fraction) and an exponent whose sign
# may be left out: the scientific forms YAML 1.1 does not read as floats but Python does.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus `_EXPONENT_FLOAT` as floats (a class-local resolver)."""


# add_implicit_resolver copies the resolver table into the subclass first, so SafeLoader (and
# every other user of PyYAML in the process) is unchanged.
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789.")
)


def strict_config() -> bool:
    """Whether duplicate keys are errors (`CHATLEARN_STRICT_CONFIG=1`), not warnings."""
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def read_yaml(path: Path, display: str) -> tuple[Any, Origins]:
    """Parse one YAML file; return its data and the line of every mapping key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read the file ({exc.strerror or exc})",
            where=display,
            fix="check that the path names a readable YAML file",
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(
            "the file is not UTF-8 text", where=display, fix="save the config as UTF-8 YAML"
        ) from None
    loader = ConfigLoader(text)
    origins: Origins = {}
    try:
        node = loader.get_single_node()
        if node is None:
            return None, origins
        _check_aliases(node, display)
        _record_keys(node, "", display, origins)
        return loader.construct_document(node), origins
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{display}:{mark.line + 1}" if mark is not None else display
        problem = exc.problem or exc.context or str(exc)
        if exc.context and exc.problem:
            started = exc.context_mark
            at = f" at line {started.line + 1}" if started is not None else ""
            problem = f"{problem} ({exc.context}{at})"
        raise ConfigError(
            f"invalid YAML: {problem}",
            where=where,
            fix="fix the YAML syntax at that line (indentation, ': ' after keys, quotes)",
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"invalid YAML: {exc}", where=display, fix="fix the YAML syntax"
        ) from None
    finally:
        loader.dispose()


def _check_aliases(root: yaml.Node, display: str) -> None:
    """Refuse a document whose aliases refer to a node containing them (it never ends) or expand
    to more than MAX_EXPANDED_VALUES values (a few lines of nested aliases, each repeating the
    one before, make billions). Walks the node graph once, each shared node once, without
    recursion."""

    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.MappingNode):
            return [part for pair in node.value for part in pair]
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        return []

    sizes: dict[int, int] = {}  # expanded values under each node done
    on_path = {id(root)}
    kids = children(root)
    stack = [(root, kids, iter(kids))]
    while stack:
        node, kids, pending = stack[-1]
        child = next(pending, None)
        if child is None:
            stack.pop()
            on_path.discard(id(node))
            size = sizes[id(node)] = 1 + sum(sizes[id(c)] for c in kids)
            if size > MAX_EXPANDED_VALUES:
                raise ConfigError(
                    f"the YAML's anchors and aliases expand to more than "
                    f"{MAX_EXPANDED_VALUES:,} values",
                    where=f"{display}:{node.start_mark.line + 1}",
                    fix="write the values out or use fewer nested aliases",
                )
        elif id(child) in on_path:
            raise ConfigError(
                "the node anchored here holds an alias of itself (its value would never end)",
                where=f"{display}:{child.start_mark.line + 1}",
                fix="remove the alias or point it at a node outside the one it is in",
            )
        elif id(child) not in sizes:
            on_path.add(id(child))
            grandchildren = children(child)
            stack.append((child, grandchildren, iter(grandchildren)))


def _record_keys(node: yaml.Node, prefix: str, display: str, origins: Origins) -> None:
    """Record "file:line" for every key path; warn about duplicate keys (strict: reject them)."""
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
            continue  # `<<: *anchor` keys take the location of the mapping that merges them
        key, line = key_node.value, key_node.start_mark.line + 1
        path = f"{prefix}.{key}" if prefix else key
        if key in first_line:
            _duplicate_key(path, f"{display}:{first_line[key]}", f"{display}:{line}")
        first_line[key] = line
        origins[path] = f"{display}:{line}"
        _record_keys(value_node, path, display, origins)


def _duplicate_key(path: str, first: str, last: str) -> None:
    if strict_config():
        raise ConfigError(
            f"duplicate key (first set at {first})",
            where=last,
            key=path,
            fix=f"keep one of the two entries ({STRICT_ENV} is set; without it the last one wins "
            "with a warning)",
        )
    logger.warning(
        "%s: duplicate key %s (also set at %s); using the last value, as ChatLearn does "
        "(set %s=1 to make this an error)",
        last,
        path,
        first,
        STRICT_ENV,
    )


def literal(text: str) -> Any:
    """Read a substituted value as a Python literal, as ChatLearn does; else keep the string."""
    if text.strip() == "null":
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def substitute(value: Any, path: str, origins: Origins, display: str) -> Any:
    """Replace `${NAME}` / `${NAME:default}` whole values, recursively."""
    if isinstance(value, Mapping):
        return {
            k: substitute(v, f"{path}.{k}" if path else str(k), origins, display)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [substitute(v, path, origins, display) for v in value]
    if not isinstance(value, str):
        return value
    if not value.strip().startswith("${"):
        if _PLACEHOLDER.search(value):
            # ChatLearn keeps it as written too; said, so that a path is not silently literal
            logger.warning(
                "%s: %s: %r holds a placeholder inside the value, which is not substituted "
                "(only a whole value ${NAME} or ${NAME:default} is); kept as written",
                origins.get(path, display),
                path,
                value,
            )
        return value
    match = _PLACEHOLDER.fullmatch(value.strip())
    if match is None or not match.group(1).strip():
        raise ConfigError(
            f"{value!r} is not a whole placeholder",
            where=origins.get(path, display),
            key=path,
            fix="write the whole value as ${NAME} or ${NAME:default} "
            "(text around a placeholder is not substituted)",
        )
    name, default = match.group(1).strip(), match.group(2)
    if default is not None and "${" in default:
        # ChatLearn splits such a value at every ':' and takes a fragment of it as the default
        raise ConfigError(
            f"{value!r} nests a placeholder in a default; nested placeholders are not supported",
            where=origins.get(path, display),
            key=path,
            fix="give the default as a plain value: ${NAME:default}",
        )
    if name in os.environ:
        return literal(os.environ[name])
    if default is not None:
        return literal(default)
    logger.warning(
        "%s: %s: environment variable %s is not set and has no default; using null",
        origins.get(path, display),
        path,
        name,
    )
    return None


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `update` into `base` in place: mappings merge key by key, anything else replaces."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def resolve_path(
    name: Any, config_dir: Path, *, where: str, key: str, what: str, beside: Path | None = None
) -> Path:
    """Resolve a path written in a config file against the main config's directory (then, if
    not found there, against ``beside``: the directory of the file that names it)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(
            f"expected a file path, got {name!r}",
            where=where,
            key=key,
            fix=f"write the path of the {what} (relative to the main config's directory)",
        )
    path = Path(os.path.expanduser(name.strip()))
    candidates = [path] if path.is_absolute() else [config_dir / path]
    # ChatLearn also accepts a path that already starts with the config directory, as written
    # relative to the working directory.
    relative_dir = Path(os.path.relpath(config_dir)).parts
    if not path.is_absolute() and relative_dir and path.parts[: len(relative_dir)] == relative_dir:
        candidates.append(path)
    if not path.is_absolute() and beside is not None and beside.resolve() != config_dir.resolve():
        candidates.append(beside / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(
        f"{what} {name!r} not found (looked for {tried})",
        where=where,
        key=key,
        fix=f"create the file or correct the path; relative paths start at {config_dir}",
    )


def load_file(
    path: Path, config_dir: Path, *, stack: tuple[Path, ...] = (), display: str | None = None
) -> tuple[dict[str, Any], Origins]:
    """Load one config file with its includes (recursively) and substitutions applied."""
    display = display or display_name(path) or str(path)
    data, origins = read_yaml(path, display)
    if data is None:
        return {}, origins
    if not isinstance(data, dict):
        raise ConfigError(
            f"the top level must be a mapping of sections, got a {type(data).__name__}",
            where=display,
            fix="write sections such as `runtime:` and `models:` at the top level",
        )
    data = substitute(data, "", origins, display)
    includes = data.pop("includes", None)
    if includes is None:
        return data, origins
    where = origins.get("includes", display)
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list):
        raise ConfigError(
            f"expected a list of files, got a {type(includes).__name__}",
            where=where,
            key="includes",
            fix="write includes: [base.yaml, other.yaml]",
        )
    merged: dict[str, Any] = {}
    merged_origins: Origins = {}
    chain = (*stack, path.resolve())
    for name in includes:
        # ChatLearn resolves every include against the main config's directory, nested ones
        # too; one it does not find there is looked for beside the file that includes it, so
        # a config elsewhere can include a file that has includes of its own (the examples')
        include = resolve_path(
            name, config_dir, where=where, key="includes", what="included file", beside=path.parent
        )
        if include.resolve() in chain:
            names = " → ".join(str(display_name(p)) for p in (*chain, include.resolve()))
            raise ConfigError(
                f"include cycle: {names}",
                where=where,
                key="includes",
                fix=f"remove the include of {name!r} (or the include that leads back here)",
            )
        sub_data, sub_origins = load_file(include, config_dir, stack=chain)
        deep_merge(merged, sub_data)
        merged_origins.update(sub_origins)
    deep_merge(merged, data)  # the file's own keys override its includes
    merged_origins.update(origins)
    return merged, merged_origins


def display_name(path: str | os.PathLike[str] | None) -> str | None:
    """How a file is named in messages: relative to the working directory when below it."""
    if path is None:
        return None
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return os.fspath(path)
    return relative if not relative.startswith("..") else os.fspath(path)
