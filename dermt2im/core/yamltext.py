"""YAML as people type it: only ``true`` / ``false`` are booleans (YAML 1.2's core schema).

PyYAML follows YAML 1.1, where ``on``, ``off``, ``yes``, ``no``, ``y`` and ``n`` are booleans too:
``--set runtime.train.compile=on`` arrived as ``True`` and was refused, and ``mixed_precision: no``
needed quotes. Every config file, saved workdir config and ``--set`` override is read through
``load`` so that these words stay the words that were typed; the settings that are switches accept
them (``dermt2im.core.runtime.Switch``, pydantic's booleans).
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2's booleans (true / false in any case) instead of YAML 1.1's."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def load(text: str) -> Any:
    """``text`` parsed as YAML with YAML 1.2's booleans."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
