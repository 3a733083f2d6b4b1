"""Input Gram matrices of the linear layers of a model, ``G = X^T X``, for RegMean.

The model's forward pass is traced to a jaxpr and evaluated with a hook on every
``dot_general`` that multiplies an activation by a parameter (a *kernel*): the activation's
contracted features are flattened to ``(rows, features)`` and ``X^T X`` is accumulated in
float32. This finds the inputs of ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``,
Linen's ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum`` alike, and of any hand-written
``x @ w``, without editing the model. A kernel is captured when the dimensions it
contracts are its leading ones (Flax's ``(in..., out...)`` layout), so that its Gram
matches ``kernel.reshape(features, -1)``. Layers inside ``jax.lax.scan`` (scanned layer
stacks) are not looked into.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core

from jaxmerge._tree import PyTree, flatten_with_keys
from jaxmerge.errors import JaxmergeError
from jaxmerge.statistics._data import limited, model_function, replicated_like
from jaxmerge.statistics._jaxpr import CALL_PRIMITIVES, Env, bind

_BLOCK = 128


def _symmetric_gram(flat: jax.Array) -> jax.Array:
    """``flat^T flat``, computing only the blocks on and above the diagonal (a Gram is
    symmetric) when there are enough features for blocks of ``_BLOCK`` to pay off."""
    def product(a, b):
        return lax.dot_general(a, b, (((0,), (0,)), ((), ())), out_sharding=replicated_like(flat))

    features = flat.shape[1]
    count = features // _BLOCK if features % _BLOCK == 0 else 1
    if count < 4:
        return product(flat, flat)
    blocks = jnp.split(flat, count, axis=1)
    upper = {(i, j): product(blocks[i], blocks[j]) for i in range(count) for j in range(i, count)}
    return jnp.block([[upper[i, j] if i <= j else upper[j, i].T for j in range(count)] for i in range(count)])


def flat_activation(x: jax.Array, contract: tuple[int, ...]) -> jax.Array:
    """The activation as ``(rows, features)`` float32, its contracted axes flattened as features."""
    moved = jnp.moveaxis(x, contract, range(x.ndim - len(contract), x.ndim))
    return moved.reshape(-1, math.prod(x.shape[d] for d in contract)).astype(jnp.float32)


def _activation_gram(x: jax.Array, contract: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``(X^T X, rows)`` with ``X`` the activation's contracted axes flattened as features."""
    flat = flat_activation(x, contract)
    return _symmetric_gram(flat), jnp.asarray(flat.shape[0], jnp.float32)


class _Capture:
    """Evaluates a jaxpr, recording the Grams of kernel inputs (or, with ``keep_activations``,
    the inputs themselves, ``(rows, features)`` per use) and the order params are used."""

    def __init__(self, only: frozenset | None, keep_activations: bool = False):
        self.only, self.keep_activations = only, keep_activations
        self.activations: dict[int, list[jax.Array]] = {}
        self.outputs: dict[int, list[jax.Array]] = {}
        self.grams: dict[int, tuple[jax.Array, jax.Array]] = {}
        self.computed: dict[tuple, tuple[jax.Array, jax.Array]] = {}  # one Gram per activation
        self.first_use: dict[int, int] = {}
        self.kernel_order: list[int] = []

    def _record(self, param: int, activation_var, activation: jax.Array, contract: tuple[int, ...]) -> None:
        if param not in self.kernel_order:
            self.kernel_order.append(param)
        if self.only is not None and param not in self.only:
            return
        if self.keep_activations:
            self.activations.setdefault(param, []).append(flat_activation(activation, contract))
            return
        key = (id(activation_var), contract)
        if key not in self.computed:  # q, k and v projections share their input
            self.computed[key] = _activation_gram(activation, contract)
        gram, rows = self.computed[key]
        if param in self.grams:
            gram, rows = self.grams[param][0] + gram, self.grams[param][1] + rows
        self.grams[param] = (gram, rows)

    def _hook_dot(self, eqn, invals: list, tags: list) -> int | None:
        """Record a kernel's input; the kernel's param index when it is the right operand (its
        output features then come last in the result), else None."""
        if any(isinstance(v, jex_core.Literal) for v in eqn.invars):
            return None
        (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
        if lhs_batch or rhs_batch:
            return None
        sides = ((1, tuple(rhs_contract), 0, tuple(lhs_contract)), (0, tuple(lhs_contract), 1, tuple(rhs_contract)))
        for kernel, kernel_contract, activation, activation_contract in sides:
            if (tags[kernel] is not None and tags[activation] is None
                    and sorted(kernel_contract) == list(range(len(kernel_contract)))):
                # features in the kernel's row-major order of its leading axes
                ordered = tuple(a for _, a in sorted(zip(kernel_contract, activation_contract)))
                self._record(tags[kernel], eqn.invars[activation], invals[activation], ordered)
                return tags[kernel] if kernel == 1 else None
        return None

    def _hook_conv(self, eqn, invals: list, tags: list, output: jax.Array) -> None:
        """Record a convolution's input and output channels, ``(rows, channels)`` over every
        example and position, for a kernel in Flax's ``(spatial..., in, out)`` layout."""
        lhs_spec, rhs_spec, out_spec = eqn.params["dimension_numbers"]
        ndim = invals[1].ndim
        flax_layout = rhs_spec[0] == ndim - 1 and rhs_spec[1] == ndim - 2
        plain = eqn.params["feature_group_count"] == 1 and eqn.params["batch_group_count"] == 1
        if tags[1] is None or tags[0] is not None or not flax_layout or not plain:
            return
        self._record(tags[1], eqn.invars[0], invals[0], (lhs_spec[1],))
        self._record_output(tags[1], flat_activation(output, (out_spec[1],)))

    def _record_output(self, param: int, rows: jax.Array) -> None:
        """Keep a kernel's output, ``(rows, output features)``, when activations are kept."""
        if self.keep_activations and (self.only is None or param in self.only):
            self.outputs.setdefault(param, []).append(rows.astype(jnp.float32))

    def run(self, jaxpr, consts, args, arg_tags) -> list:
        env, tag = Env(), {}
        env.write(jaxpr.constvars, consts)
        env.write(jaxpr.invars, args)
        tag.update((id(v), t) for v, t in zip(jaxpr.invars, arg_tags) if t is not None)
        for eqn in jaxpr.eqns:
            invals = [env.read(v) for v in eqn.invars]
            tags = [None if isinstance(v, jex_core.Literal) else tag.get(id(v)) for v in eqn.invars]
            for t in tags:
                if t is not None:
                    self.first_use.setdefault(t, len(self.first_use))
            if eqn.primitive.name in CALL_PRIMITIVES:
                sub = eqn.params["jaxpr"]
                outs = self.run(sub.jaxpr, sub.consts, invals, tags)
            else:
                kernel = self._hook_dot(eqn, invals, tags) if eqn.primitive.name == "dot_general" else None
                outs = bind(eqn, invals)
                if kernel is not None:
                    features = math.prod(invals[1].shape[len(eqn.params["dimension_numbers"][0][1]):])
                    self._record_output(kernel, outs[0].reshape(-1, features))
                if eqn.primitive.name == "conv_general_dilated" and self.keep_activations:
                    self._hook_conv(eqn, invals, tags, outs[0])
                if eqn.primitive.name == "convert_element_type" and tags[0] is not None:
                    tag[id(eqn.outvars[0])] = tags[0]
            env.write(eqn.outvars, outs)
        return [env.read(v) for v in jaxpr.outvars]


def capture(apply_fn: Callable, params: PyTree, batch, only: frozenset | None = None,
            keep_activations: bool = False) -> _Capture:
    """Run ``apply_fn(params, batch)`` once, recording kernel input Grams (of ``only``, if
    given), or the inputs themselves with ``keep_activations``."""
    leaves, treedef = jax.tree.flatten(params)
    closed = jax.make_jaxpr(lambda *ls: apply_fn(jax.tree.unflatten(treedef, ls), batch))(*leaves)
    recorder = _Capture(only, keep_activations)
    recorder.run(closed.jaxpr, closed.consts, leaves, list(range(len(leaves))))
    return recorder


@functools.partial(jax.jit, static_argnames=("apply_fn", "only"))
def gram_sums(params: PyTree, batch, *, apply_fn: Callable, only: frozenset | None = None) -> dict:
    """``{param leaf index: (X^T X, rows)}`` of one batch, for every captured kernel."""
    return capture(apply_fn, params, batch, only).grams


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def kernel_inputs(params: PyTree, batch, *, apply_fn: Callable) -> dict:
    """``{param leaf index: (rows, features)}``: every captured kernel's input on one batch
    (the rows of all its uses, in order)."""
    return {param: jnp.concatenate(rows) for param, rows in
            capture(apply_fn, params, batch, keep_activations=True).activations.items()}


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def kernel_outputs(params: PyTree, batch, *, apply_fn: Callable) -> dict:
    """``{param leaf index: (rows, outputs)}``: every captured kernel's product ``x @ kernel``
    (before any bias) on one batch, for kernels on the right of the product."""
    return {param: jnp.concatenate(rows) for param, rows in
            capture(apply_fn, params, batch, keep_activations=True).outputs.items()}


def traced(apply_fn: Callable, params: PyTree, batch, read: Callable[[_Capture], Any], **options):
    """``read(recorder)`` of a :func:`capture` (with ``options``) that is only traced, nothing
    computed: what the recorder found in the forward pass, e.g. the order of its kernels."""
    found = []

    def trace(p):
        found.append(read(capture(apply_fn, p, batch, **options)))
        return 0

    jax.eval_shape(trace, params)
    return found[0]


def accumulate_grams(apply_fn: Callable, params: PyTree, data: Iterable, *, num_examples: int | None = None,
                     only: frozenset | None = None) -> dict:
    """Sum of :func:`gram_sums` over the batches of ``data``."""
    total: dict = {}
    for batch, _ in limited(data, num_examples):
        for index, (gram, rows) in gram_sums(params, batch, apply_fn=apply_fn, only=only).items():
            total[index] = (gram, rows) if index not in total else (total[index][0] + gram, total[index][1] + rows)
    return total


def as_tree(keys: list[tuple[str, ...]], grams: dict) -> dict:
    """Nested plain dicts keyed like the params: ``{'gram': X^T X, 'count': rows}`` per kernel."""
    tree: dict = {}
    for index, (gram, rows) in sorted(grams.items()):
        node = tree
        for key in keys[index][:-1]:
            node = node.setdefault(key, {})
        node[keys[index][-1]] = {"gram": gram, "count": rows}
    return tree


def input_grams(model, data: Iterable, *, params: PyTree | None = None, num_examples: int | None = None) -> dict:
    """Gram matrices ``X^T X`` of the inputs of every linear layer, summed over ``data``.

    The statistics of RegMean merging (:func:`jaxmerge.regmean`). The forward pass is traced
    once per batch shape and evaluated with a hook on every ``dot_general`` that multiplies
    an activation by a parameter whose leading axes it contracts (a *kernel*: Flax's
    ``(in..., out...)`` layout); the activation is flattened to ``X`` of shape ``(rows, d)``
    and ``X^T X`` is accumulated in float32, together with the number of rows. Parameters
    used otherwise (biases, norms, embeddings) get no entry; layers inside ``jax.lax.scan``
    are not looked into.

    Args:
      model: ``apply_fn(params, batch)`` (with ``params``: Linen's ``lambda v, b:
        module.apply(v, b[0])``, or any function), called on whole batches, or a Flax NNX
        module (its ``nnx.Param`` state is the params; it is called on the batch's inputs).
      data: an iterable of batches (see :func:`jaxmerge.diagonal_fisher`; labels are not
        needed); every leaf has the examples on axis 0. Batches may be sharded over a mesh
        along the example axis, and the sum over rows is then a cross-device reduction
        inside the jitted step.
      params: the parameters, required with an ``apply_fn`` and ``None`` with a module.
      num_examples: stop after this many examples (``None``: all of ``data``).

    Returns:
      Nested dicts keyed like the params, with ``{'gram': (d, d) float32, 'count': rows}``
      where a kernel is (``d`` its number of input features; ``rows`` the number of input
      vectors, e.g. examples x tokens, a float32 scalar). Save it with
      :func:`jaxmerge.checkpoints.save` like params.

    Raises:
      JaxmergeError: no linear layer found; ``params`` missing with an ``apply_fn`` or given
        with a module; ``num_examples < 1``; batch leaves of different leading sizes; or data
        that yields no examples.
      TypeError: ``model`` is neither callable nor an NNX module, or (with a module) a batch
        is neither a tuple nor a dict with ``'inputs'``.

    References:
      Jin et al., "Dataless knowledge fusion by merging weights of language models",
      arXiv 2212.09849.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> apply_fn = lambda params, batch: batch[0] @ params["w"]  # one linear layer
      >>> x = jnp.asarray([[1.0, 0.0], [0.0, 2.0]])  # two input rows
      >>> grams = jaxmerge.input_grams(apply_fn, [(x,)], params={"w": jnp.ones((2, 3))})
      >>> grams["w"]["gram"].tolist(), grams["w"]["count"].item()  # X^T X and the rows
      ([[1.0, 0.0], [0.0, 4.0]], 2.0)
    """
    apply_fn, params = model_function(model, params)
    grams = accumulate_grams(apply_fn, params, data, num_examples=num_examples)
    if not grams:
        raise JaxmergeError("found no linear layer: no dot_general multiplies an activation by a parameter "
                         "whose leading axes it contracts")
    return as_tree(flatten_with_keys(params)[0], grams)
