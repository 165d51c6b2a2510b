"""YAML as an operator writes it: a key given twice is an error, not a silent overwrite.

PyYAML's ``safe_load`` keeps the last of two equal keys in a mapping, so a policy or run config
that sets ``privacy:`` twice loses every setting of the first block without a word. Every file
fedslm reads for its settings (node policy, run config, scenario) goes through :func:`load_yaml`.
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names one key twice; the one-line message names the dotted key and both lines."""


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping holding one key twice, before anything is constructed."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._check_unique(node)
        return super().construct_document(node)

    def _check_unique(self, root: yaml.Node) -> None:
        # Iterative walk; each node once, so nested aliases (a "billion laughs") cost their text, not their expansion.
        seen: set[int] = set()
        stack: list[tuple[yaml.Node, str]] = [(root, "")]
        while stack:
            node, path = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, yaml.SequenceNode):
                stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
            elif isinstance(node, yaml.MappingNode):
                first: dict[Any, int] = {}
                for key_node, value_node in node.value:
                    if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node)
                    dotted = f"{path}.{key}" if path else str(key)
                    line = key_node.start_mark.line + 1
                    try:
                        earlier = first.get(key)
                    except TypeError:  # an unhashable key: the constructor reports it
                        continue
                    if earlier is not None:
                        raise DuplicateKeyError(
                            f"duplicate key '{dotted}' on line {line} (first on line {earlier}): YAML would silently "
                            "keep only the last; give each key once"
                        )
                    first[key] = line
                    stack.append((value_node, dotted))


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that raises :class:`DuplicateKeyError` for a key given twice in one mapping."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
