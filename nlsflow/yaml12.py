"""YAML as configs mean it: `2:4` is a string (no YAML 1.1 base-60 numbers), and duplicate keys are refused."""

from __future__ import annotations

import re
from collections.abc import Hashable

import yaml


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's base-60 numbers, so `structure: 2:4` stays the string '2:4' (not 124), and
    with duplicate keys refused (YAML forbids them; PyYAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)  # resolve `<<` merge keys first; a key they bring in may be overridden
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                break  # the base class reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if not (tag.endswith((":int", ":float")) and regex.match("2:4"))]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _pattern, _first in [
    (
        "tag:yaml.org,2002:int",
        r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$",
        "-+0123456789",
    ),
    (
        "tag:yaml.org,2002:float",
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?"
        r"|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
        r"|[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+)$",
        "-+0123456789.",
    ),
]:
    _Yaml12Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)
