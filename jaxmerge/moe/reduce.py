"""An existing mixture's experts merged into fewer: each group of experts becomes one expert
whose MLP tensors are the group's merged (by default averaged) and whose router row is the
mean of the group's rows, so a token that preferred any member now prefers the merged expert
about as much (router logits are linear in the rows)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxmerge.errors import JaxmergeError
from jaxmerge.moe.layouts import LAYOUTS

_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<rest>.+)$")
_STACKED = re.compile(r"^.*\.mlp\.experts\.(gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"^.*\.mlp\.gate\.weight$")


def _mean(tensors: list[jax.Array]) -> jax.Array:
    return (sum(t.astype(jnp.float32) for t in tensors) / len(tensors)).astype(tensors[0].dtype)


def merge_experts(tensors: Mapping[str, jax.Array], config: Mapping, groups: Sequence[Sequence[int]], *,
                  merge: Callable[[list[jax.Array]], jax.Array] = _mean) -> tuple[dict, dict]:
    """A mixture with each group of ``groups`` merged into one expert.

    Args:
      tensors: the mixture's tensors (Mixtral, Qwen2-MoE or Qwen3-MoE names).
      config: its ``config.json``.
      groups: a partition of the experts ``0 .. n-1``: new expert ``k`` merges ``groups[k]``.
      merge: ``merge(tensors) -> tensor`` over the group's copies of one expert tensor (default:
        the mean in float32; e.g. ``lambda ts: jaxmerge.ties(base, ts, density=0.5)`` with a
        base expert tensor).

    Returns:
      ``(tensors, config)`` with ``len(groups)`` experts (``num_experts_per_tok`` capped by it).

    Raises:
      JaxmergeError: ``groups`` is not a partition of the experts, or the config is not a
        mixture this library writes.

    Examples:
      >>> import jax.numpy as jnp
      >>> moe = {"model.layers.0.mlp.gate.weight": jnp.asarray([[1.0], [3.0], [5.0]]),
      ...        "model.layers.0.mlp.experts.down_proj": jnp.asarray([[[1.0]], [[2.0]], [[4.0]]])}
      >>> merged, config = merge_experts(moe, {"model_type": "mixtral", "num_local_experts": 3,
      ...                                      "num_experts_per_tok": 2}, [[0, 1], [2]])
      >>> merged["model.layers.0.mlp.experts.down_proj"].ravel().tolist(), config["num_local_experts"]
      ([1.5, 4.0], 2)
    """
    layout = next((la for la in LAYOUTS if la.model_type == config.get("model_type")), None)
    if layout is None:
        raise JaxmergeError(f"model_type {config.get('model_type')!r} is not a mixture of {[la.model_type for la in LAYOUTS]}")
    count = config[layout.expert_count_key]
    if sorted(e for g in groups for e in g) != list(range(count)) or not all(groups):
        raise JaxmergeError(f"groups must split the experts 0..{count - 1} into non-empty groups, got {groups}")
    out = {}
    for name, tensor in tensors.items():
        if _STACKED.match(name) or _ROUTER.match(name):
            rows = [merge([tensor[e] for e in g]) if _STACKED.match(name) else _mean([tensor[e] for e in g])
                    for g in groups]
            out[name] = jnp.stack(rows)
        elif match := _PER_EXPERT.match(name):
            k = next((k for k, g in enumerate(groups) if g[0] == int(match["expert"])), None)
            if k is not None:
                members = [tensors[f"{match['prefix']}.{e}.{match['rest']}"] for e in groups[k]]
                out[f"{match['prefix']}.{k}.{match['rest']}"] = merge(members)
        else:
            out[name] = tensor
    merged_config = {**config, layout.expert_count_key: len(groups),
                     "num_experts_per_tok": min(config.get("num_experts_per_tok", 2), len(groups))}
    return out, merged_config
