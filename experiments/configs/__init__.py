"""Experiment configs: each file's `get_config()` returns an ml_collections ConfigDict.

Entry points take one as `--config=FILE` (or `FILE:ARG`) with `--config.FIELD=VALUE`
overrides; `load` and `override_problem` let a command check a file and its overrides before
it starts anything (the sweep checks every point's before running the first).
"""

from __future__ import annotations

import importlib.util

from ml_collections import ConfigDict


def load(path: str) -> ConfigDict:
    """The ConfigDict of a config file, `FILE` or `FILE:ARG` as `--config` takes it."""
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("user_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def override_problem(config: ConfigDict, field: str, value: str | None = None) -> str | None:
    """None if `--config.FIELD=VALUE` fits `config`; else one line saying why not: the field
    is unknown (naming the fields there) or the value is not of the field's type."""
    node = config
    for part in field.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            known = sorted(node.keys()) if hasattr(node, "keys") else []
            return f"unknown config field {field!r}; the fields there are: " + ", ".join(known)
        node = node[part]
    if value is None or node is None or isinstance(node, str):
        return None
    parse, kind = _PARSERS.get(type(node), (None, ""))
    try:
        if parse:
            parse(value)
    except ValueError:
        return f"config field {field!r} takes {kind}, not {value!r}"
    return None


def _parse_bool(value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(value)
    return value.lower() in ("true", "1")


_PARSERS = {
    bool: (_parse_bool, "true or false"),
    int: (int, "an integer"),
    float: (float, "a number"),
}
