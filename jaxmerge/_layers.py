"""The layer stack of a model, read from its leaf paths or tensor names.

A transformer's tensors are numbered by layer: ``model.layers.3.mlp.up_proj.weight``,
``params/layers/3/kernel``, ``params/Block_3/Dense_0/kernel``. The layer stack is the numbered
path entry that the most tensors carry (ties: the one with the most distinct indices), so
that the expert index of a mixture-of-experts layer or the index of a layer inside a block
is not taken for it. Layer gradients place tensors along it; merge configs' slices read and
renumber its layers.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

_SEPARATOR = re.compile(r"([./])")
_NAME_WITH_INDEX = re.compile(r"(.*\D)_(\d+)")


def _parts(path_keys: tuple[str, ...]) -> list[str]:
    """A path's entries, flat checkpoint names ('model.layers.3.mlp', 'params/Block_3') split too."""
    return [part for key in path_keys for part in _SEPARATOR.split(key)[::2]]


def _numbered(path_keys: tuple[str, ...]) -> list[tuple[tuple[str, ...], int, int]]:
    """``(stack, index, position in the parts)`` for each numbered entry: ``layers/3`` or ``Block_3``."""
    parts = _parts(path_keys)
    found = []
    for j, part in enumerate(parts):
        if part.isdigit():
            found.append((tuple(parts[:j]), int(part), j))
        elif match := _NAME_WITH_INDEX.fullmatch(part):
            found.append((tuple(parts[:j]) + (match[1],), int(match[2]), j))
    return found


def position(index: int | None, count: int) -> float:
    """A layer's position ``t`` in [0, 1] for gradients, as mergekit places it: layer ``index`` of
    ``count`` at ``index / (count - 1)`` (1 when ``count == 1``), a tensor outside the stack
    (``index`` None: embeddings, final norm, head) at 0."""
    if index is None:
        return 0.0
    return index / (count - 1) if count > 1 else 1.0


class LayerStack:
    """Which layer each path belongs to.

    Attributes:
      indices: per path, its layer index, or None outside the stack (embeddings, final norm, head).
      num_layers: one more than the largest index (0 without a stack).
    """

    def __init__(self, keys: Sequence[tuple[str, ...]]):
        numbered = [_numbered(k) for k in keys]
        carriers: dict[tuple[str, ...], int] = defaultdict(int)
        distinct: dict[tuple[str, ...], set[int]] = defaultdict(set)
        for entries in numbered:
            for stack in {s for s, _, _ in entries}:
                carriers[stack] += 1
            for stack, index, _ in entries:
                distinct[stack].add(index)
        stack = max(carriers, key=lambda s: (carriers[s], len(distinct[s]))) if carriers else None
        self._where = [next(((i, j) for s, i, j in entries if s == stack), None) for entries in numbered]
        self.indices = [None if w is None else w[0] for w in self._where]
        self.num_layers = max(distinct[stack]) + 1 if stack is not None else 0

    def positions(self) -> list[float]:
        """Each path's :func:`position` along the stack."""
        return [position(i, self.num_layers) for i in self.indices]

    def renumbered(self, k: int, name: str, index: int) -> str:
        """Flat name ``name`` (of path ``k``, in the stack) with its layer index replaced by ``index``."""
        tokens = _SEPARATOR.split(name)
        j = 2 * self._where[k][1]  # parts sit at the even tokens, separators between them
        match = _NAME_WITH_INDEX.fullmatch(tokens[j])
        tokens[j] = f"{match[1]}_{index}" if match else str(index)
        return "".join(tokens)
