"""Small helpers for the jaxpr interpreters of the statistics (evaluate, with hooks)."""

from __future__ import annotations

from jax.extend import core as jex_core

CALL_PRIMITIVES = ("jit", "pjit", "closed_call", "core_call")


class Env(dict):
    """Values of a jaxpr's variables, by variable identity; literals read as their value."""

    def read(self, v):
        return v.val if isinstance(v, jex_core.Literal) else self[id(v)]

    def write(self, variables, values) -> None:
        for v, value in zip(variables, values):
            self[id(v)] = value


def bind(eqn, invals: list) -> list:
    """Run one equation as it is; always returns a list of outputs."""
    with eqn.ctx.manager:
        outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    return list(outs) if eqn.primitive.multiple_results else [outs]
