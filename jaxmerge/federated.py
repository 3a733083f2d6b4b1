"""Federated averaging as pure functions: a round of clients under ``jax.vmap`` (or sharded over
a mesh axis of clients), aggregated by a server whose optimizer is any optax transformation.

Clients are stacked on a leading axis: every leaf of the client data, of the clients' params
and of a participation mask has the number of clients first, so one jitted round runs them all
on one device (``jax.vmap``) or across devices (shard that axis over a mesh). The server treats
the aggregated change of the clients' params as a pseudo-gradient (FedOpt, arXiv 2003.00295):
``optax.sgd(1.0)`` gives FedAvg, ``optax.sgd(lr, momentum=0.9)`` FedAvgM, ``optax.adam(lr)``
FedAdam, ``optax.yogi(lr)`` FedYogi, ``optax.sgd(lr, momentum=0.9, nesterov=True)`` DiLoCo's
outer step.

Aggregation weights: with ``participation='known'`` the participating clients' changes are
averaged with weights ``num_examples`` (FedAvg, arXiv 1602.05629); with ``'unknown'`` each
participating client's change is scaled by an online estimate of the inverse of its
participation rate, the mean of its observed participation intervals (FedAU, arXiv
2306.03401), and summed with weights ``num_examples / sum(num_examples)`` over all clients.

For data-parallel replicas that communicate rarely: :func:`diloco` (local steps, then an
all-reduce and an outer optimizer step) and :func:`noloco` (local steps, then averaging with a
random partner).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmerge._tree import PyTree
from jaxmerge.errors import JaxmergeError

__all__ = ["DilocoState", "ParticipationState", "Server", "ServerState", "aggregate", "diloco", "noloco",
           "participation_state", "participation_weights", "run_clients", "sample_clients", "server"]

Participation = Literal["known", "unknown"]


class ParticipationState(NamedTuple):
    """FedAU's per-client statistics (each ``(num_clients,)``), made by :func:`participation_state`.

    Attributes:
      since: rounds since the client last took part (or since its last cut-off interval).
      total: the sum of its recorded participation intervals.
      count: how many intervals are recorded (a float, so that ``total / count`` is the mean).

    Examples:
      >>> from jaxmerge import federated
      >>> federated.participation_state(2).count.tolist()
      [0.0, 0.0]
    """

    since: jax.Array
    total: jax.Array
    count: jax.Array


class ServerState(NamedTuple):
    """State of a :func:`server`: the optimizer's state, and FedAU's statistics (``None`` with
    ``participation='known'``). A NamedTuple of arrays: it jits, shards and checkpoints.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import federated
      >>> state = federated.server(participation="unknown").init({"w": jnp.zeros(2)}, num_clients=4)
      >>> state.participation.since.shape
      (4,)
    """

    opt_state: optax.OptState
    participation: ParticipationState | None


class Server(NamedTuple):
    """A federated server (see :func:`server`): ``init(params, num_clients)`` and
    ``update(params, state, client_params, participating, num_examples)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import federated
      >>> fedavg = federated.server()
      >>> params = {"w": jnp.zeros(1)}
      >>> fedavg.update(params, fedavg.init(params, 2), {"w": jnp.asarray([[1.0], [3.0]])})[0]["w"].tolist()
      [2.0]
    """

    init: Callable[..., ServerState]
    update: Callable[..., tuple[PyTree, ServerState]]


def participation_weights(state: ParticipationState, participating: jax.Array,
                          cutoff: int) -> tuple[jax.Array, ParticipationState]:
    """FedAU's aggregation weights for this round and the statistics after it.

    A participating client's weight is the mean of its recorded participation intervals (1
    before any is recorded); then the interval that ends now (rounds since it last took
    part, plus one) is recorded. A client that has not taken part for ``cutoff`` rounds
    records an interval of ``cutoff`` and starts counting again, which bounds the weights.

    Args:
      state: the statistics so far.
      participating: ``(num_clients,)`` booleans.
      cutoff: the longest interval recorded (FedAU's ``K``).

    Returns:
      ``(weights, state)``: ``(num_clients,)`` float32 weights (0 for clients not taking part)
      and the new statistics.

    Raises:
      JaxmergeError: ``cutoff`` is not a whole number of at least 1.

    References:
      Wang & Ji, "A Lightweight Method for Tackling Unknown Participation Statistics in
      Federated Averaging", arXiv 2306.03401.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import federated
      >>> state = federated.participation_state(2)
      >>> for took_part in ([True, True], [True, False], [True, True]):
      ...     weights, state = federated.participation_weights(state, jnp.asarray(took_part), cutoff=10)
      >>> weights.tolist()  # client 1 had one interval recorded (1 round); this round records one of 2
      [1.0, 1.0]
      >>> (state.total / state.count).tolist()
      [1.0, 1.5]
    """
    _check_count("cutoff", cutoff, "rounds")
    mean = jnp.where(state.count > 0, state.total / jnp.maximum(state.count, 1), 1.0)
    weights = jnp.where(participating, mean, 0.0).astype(jnp.float32)
    waited = state.since + 1
    cut = ~participating & (waited >= cutoff)
    records = participating | cut
    interval = jnp.where(participating, waited, cutoff).astype(jnp.float32)
    return weights, ParticipationState(since=jnp.where(records, 0, waited),
                                       total=state.total + jnp.where(records, interval, 0.0),
                                       count=state.count + records.astype(jnp.float32))


def participation_state(num_clients: int) -> ParticipationState:
    """FedAU's statistics before the first round (see :func:`participation_weights`).

    Args:
      num_clients: how many clients there are.

    Returns:
      A :class:`ParticipationState` of zeros, each field ``(num_clients,)``.

    Examples:
      >>> from jaxmerge import federated
      >>> federated.participation_state(3).since.tolist()
      [0, 0, 0]
    """
    return ParticipationState(since=jnp.zeros(num_clients, jnp.int32), total=jnp.zeros(num_clients, jnp.float32),
                              count=jnp.zeros(num_clients, jnp.float32))


def aggregate(params: PyTree, client_params: PyTree, weights: jax.Array, divisor: jax.Array) -> PyTree:
    """``sum_i weights[i] * (client_params[i] - params) / divisor``, in float32 per leaf (cast
    back to the leaf's dtype): the clients' mean change, the server's negative pseudo-gradient.

    Args:
      params: the server's params.
      client_params: the clients' params after their local steps, stacked on a leading axis.
      weights: ``(num_clients,)``, 0 for clients not taking part.
      divisor: a scalar (the summed weights for a weighted mean).

    Returns:
      A pytree like ``params``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import federated
      >>> change = federated.aggregate({"w": jnp.zeros(1)}, {"w": jnp.asarray([[2.0], [4.0]])},
      ...                              jnp.asarray([1.0, 3.0]), jnp.asarray(4.0))
      >>> change["w"].tolist()
      [3.5]
    """
    scale = jnp.asarray(weights, jnp.float32) / jnp.asarray(divisor, jnp.float32)

    def mean_change(p, c):
        change = c.astype(jnp.float32) - p.astype(jnp.float32)[None]
        return jnp.tensordot(scale, change, axes=1).astype(p.dtype)
    return jax.tree.map(mean_change, params, client_params)


def server(optimizer: optax.GradientTransformation | None = None, *, participation: Participation = "known",
           cutoff: int = 50) -> Server:
    """A federated server: aggregates the clients' changes and takes an optimizer step.

    The pseudo-gradient ``params - mean(client params)`` (weighted as ``participation`` says)
    is passed to ``optimizer``; the default, ``optax.sgd(1.0)``, makes the new params the
    weighted mean of the participating clients' params (FedAvg). A round in which no client
    takes part (or only clients with no examples) leaves the params and the optimizer's state
    unchanged.

    Args:
      optimizer: the server's optax transformation (FedOpt): ``optax.sgd(1.0)`` (FedAvg),
        ``optax.sgd(lr, momentum=m)`` (FedAvgM), ``optax.adam(lr)`` (FedAdam),
        ``optax.yogi(lr)`` (FedYogi), ``optax.sgd(lr, momentum=0.9, nesterov=True)``
        (DiLoCo's outer optimizer), or any chain.
      participation: ``'known'``: the participating clients' weighted mean, weights
        ``num_examples``; ``'unknown'``: FedAU's weights from the observed participation
        (see :func:`participation_weights`), each times the client's share of
        ``num_examples``.
      cutoff: FedAU's longest recorded interval (``'unknown'`` only), at least 1.

    Returns:
      A :class:`Server` with ``init(params, num_clients) -> ServerState`` and
      ``update(params, state, client_params, participating=None, num_examples=None) ->
      (params, state)``; ``participating`` is a ``(num_clients,)`` boolean mask (default:
      every client), ``num_examples`` a ``(num_clients,)`` vector (default: ones).

    Raises:
      JaxmergeError: an unknown ``participation`` or a ``cutoff`` below 1; from ``update``,
        client params not stacked on a leading axis (naming the leaf).

    References:
      McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
      Data", arXiv 1602.05629. Reddi et al., "Adaptive Federated Optimization", arXiv
      2003.00295. Douillard et al., "DiLoCo", arXiv 2311.08105. Wang & Ji, arXiv 2306.03401.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from jaxmerge import federated
      >>> fedavg = federated.server()
      >>> params = {"w": jnp.zeros(2)}
      >>> state = fedavg.init(params, num_clients=3)
      >>> clients = {"w": jnp.asarray([[1.0, 1.0], [3.0, 3.0], [9.0, 9.0]])}
      >>> params, state = fedavg.update(params, state, clients, participating=jnp.asarray([True, True, False]),
      ...                               num_examples=jnp.asarray([1.0, 3.0, 5.0]))
      >>> params["w"].tolist()  # (1 * 1 + 3 * 3) / 4
      [2.5, 2.5]
    """
    if participation not in ("known", "unknown"):
        raise JaxmergeError(f"participation must be 'known' or 'unknown', got {participation!r}")
    _check_count("cutoff", cutoff, "rounds")
    optimizer = optax.sgd(1.0) if optimizer is None else optimizer

    def init(params: PyTree, num_clients: int) -> ServerState:
        statistics = participation_state(num_clients) if participation == "unknown" else None
        return ServerState(optimizer.init(params), statistics)

    def update(params: PyTree, state: ServerState, client_params: PyTree, participating: jax.Array | None = None,
               num_examples: jax.Array | None = None) -> tuple[PyTree, ServerState]:
        num_clients = _check_stacked(params, client_params)
        taking_part = _per_client(participating, num_clients, "participating", bool)
        examples = _per_client(num_examples, num_clients, "num_examples", jnp.float32)
        statistics = state.participation
        if statistics is not None and statistics.since.shape != (num_clients,):
            raise JaxmergeError(f"the server state was made for {statistics.since.shape[0]} clients, the round has "
                                f"{num_clients}")
        if participation == "known":
            weights = jnp.where(taking_part, examples, 0.0)
            divisor = jnp.sum(weights)
        else:
            adaptive, statistics = participation_weights(statistics, taking_part, cutoff)
            weights, divisor = adaptive * examples, jnp.sum(examples)
        counted = jnp.sum(weights) > 0  # someone took part, with examples
        change = aggregate(params, client_params, weights, jnp.where(counted, divisor, 1.0))
        updates, opt_state = optimizer.update(jax.tree.map(jnp.negative, change), state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(counted, n, o), new, old)  # noqa: E731
        return keep(new_params, params), ServerState(keep(opt_state, state.opt_state), statistics)

    return Server(init, update)


def run_clients(client_update: Callable[[PyTree, Any], PyTree], params: PyTree, client_data: Any) -> PyTree:
    """Every client's params after its local training, from the same server params.

    Args:
      client_update: ``client_update(params, data) -> params``: one client's local steps
        (e.g. a ``lax.scan`` of an optax optimizer over its batches).
      params: the server's params, sent to every client.
      client_data: every client's data, each leaf with the clients on its leading axis
        (sharded over a mesh axis to spread the clients over devices).

    Returns:
      The clients' params, stacked on a leading axis (``jax.vmap`` over the clients).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import federated
      >>> step = lambda params, x: {"w": params["w"] - 0.5 * (params["w"] - x.mean())}  # one step on 0.5 (w - x)^2
      >>> federated.run_clients(step, {"w": jnp.asarray(0.0)}, jnp.asarray([[2.0, 2.0], [4.0, 6.0]]))["w"].tolist()
      [1.0, 2.5]
    """
    return jax.vmap(client_update, in_axes=(None, 0))(params, client_data)


def sample_clients(key: jax.Array, num_clients: int, num_sampled: int) -> jax.Array:
    """A ``(num_clients,)`` boolean mask of ``num_sampled`` clients drawn without replacement.

    Args:
      key: a ``jax.random`` key (one per round).
      num_clients: how many clients there are.
      num_sampled: how many take part.

    Returns:
      A boolean ``(num_clients,)`` array with ``num_sampled`` entries set.

    Raises:
      JaxmergeError: ``num_sampled`` outside ``[0, num_clients]``.

    Examples:
      >>> import jax
      >>> from jaxmerge import federated
      >>> int(federated.sample_clients(jax.random.key(0), 10, 3).sum())
      3
    """
    if not 0 <= num_sampled <= num_clients:
        raise JaxmergeError(f"num_sampled must be in [0, {num_clients}], got {num_sampled}")
    chosen = jax.random.choice(key, num_clients, (num_sampled,), replace=False)
    return jnp.zeros(num_clients, bool).at[chosen].set(True)


class DilocoState(NamedTuple):
    """State of :func:`diloco` and :func:`noloco`.

    Attributes:
      count: inner steps taken.
      anchor: the params every replica started its current ``every`` steps from (the same on
        every replica).
      outer_state: the outer optimizer's state (:func:`noloco`'s momentum).
      inner_state: the inner optimizer's state (each replica's own).

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from jaxmerge import federated
      >>> federated.diloco(optax.sgd(0.1), every=4, axis_name="replicas").init(jnp.zeros(2)).anchor.tolist()
      [0.0, 0.0]
    """

    count: jax.Array
    anchor: PyTree
    outer_state: optax.OptState
    inner_state: optax.OptState


def diloco(inner: optax.GradientTransformation, every: int, axis_name: str,
           outer: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """Local steps on each data-parallel replica, averaged across replicas every ``every`` steps.

    Each replica (an index of the mesh or ``vmap`` axis ``axis_name``, with its own batches)
    takes ``every`` steps of ``inner`` alone; then the replicas' params are averaged with one
    ``lax.pmean`` over ``axis_name``, and ``outer`` takes a step on the pseudo-gradient
    ``anchor - mean`` from the anchor (the params of the last synchronisation), which every
    replica then continues from (up to the rounding of ``params + (anchor - params)``, within an
    ulp). ``outer=optax.sgd(1.0)`` (the default) is periodic averaging (local SGD);
    ``optax.sgd(0.7, momentum=0.9, nesterov=True)`` is DiLoCo's outer optimizer. Under
    ``shard_map`` replicas communicate only on synchronising steps (a ``lax.cond``; under
    ``vmap`` with a per-replica state the cond becomes a select that averages every step and
    keeps the result only on synchronising ones). Inside
    ``jax.shard_map`` each replica's params must vary across ``axis_name`` (start them with
    ``jax.lax.pcast(params, axis_name, to='varying')``): gradients of params shared by every
    replica are summed across replicas by JAX, which is data-parallel training, not local steps.

    Args:
      inner: each replica's optimizer.
      every: inner steps between synchronisations (DiLoCo's ``H``), at least 1.
      axis_name: the replicas' axis: a mesh axis inside ``jax.shard_map``, or ``vmap``'s
        ``axis_name``.
      outer: the outer optimizer (default ``optax.sgd(1.0)``).

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``; its state is a
      :class:`DilocoState`.

    Raises:
      JaxmergeError: ``every`` is not a whole number of at least 1.

    References:
      Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models",
      arXiv 2311.08105.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxmerge import federated
      >>> tx = federated.diloco(optax.sgd(0.1), every=2, axis_name="replicas")
      >>> grads = jnp.asarray([[1.0], [3.0]])  # each replica's gradient
      >>> def two_steps(grad):
      ...     params = jnp.zeros(1)
      ...     state = tx.init(params)
      ...     for _ in range(2):
      ...         updates, state = tx.update(grad, state, params)
      ...         params = optax.apply_updates(params, updates)
      ...     return params
      >>> jax.vmap(two_steps, axis_name="replicas")(grads).tolist()  # -0.2 and -0.6, averaged
      [[-0.4000000059604645], [-0.4000000059604645]]
    """
    outer = optax.sgd(1.0) if outer is None else outer

    def synchronise(local, anchor, outer_state):
        mean = jax.lax.pmean(local, axis_name)
        step, new_outer_state = outer.update(jax.tree.map(jnp.subtract, anchor, mean), outer_state, anchor)
        new_anchor = optax.apply_updates(anchor, step)
        return new_anchor, new_outer_state

    return _local_steps(inner, every, outer.init, lambda count, *trees: synchronise(*trees), "diloco")


def noloco(inner: optax.GradientTransformation, every: int, axis_name: str, *, key: jax.Array,
           outer_lr: float = 0.7, momentum: float = 0.5) -> optax.GradientTransformation:
    """Local steps on each replica, then averaging with one random partner instead of all replicas.

    Like :func:`diloco`, each replica takes ``every`` steps of ``inner`` alone from its anchor
    ``phi_i`` (the params of its last synchronisation) to ``theta_i``. Then the replicas are
    paired at random, and replica ``i`` and its partner ``j`` exchange ``delta = theta - phi``
    and ``phi`` (one ``lax.ppermute``: no all-reduce) and each takes NoLoCo's modified Nesterov
    step::

        m_i   <- momentum * m_i + outer_lr * (delta_i + delta_j) / 2
                                + outer_lr * ((phi_i + phi_j) / 2 - phi_i)
        phi_i <- phi_i + m_i,    theta_i <- phi_i

    The last term pulls the pair's anchors together, so replicas that never all-reduce stay
    close; summed over replicas it cancels, and the replicas' mean anchor moves exactly as
    DiLoCo's with ``outer=optax.sgd(outer_lr, momentum=momentum)`` on the mean change. As in
    the authors' code, one rate ``outer_lr`` scales both terms; the defaults are their
    configuration's. The pairing of a synchronisation is one of the ``n - 1`` perfect matchings
    of a round-robin schedule over the ``n`` replicas (so every partner is equally likely), drawn
    from ``key`` folded with the step count: every replica draws the same pairing without
    communicating, and the run is reproducible. The replica axis must have an even size. Under
    ``shard_map``, start each replica's params as varying over ``axis_name``, as for
    :func:`diloco`.

    Args:
      inner: each replica's optimizer.
      every: inner steps between synchronisations, at least 1.
      axis_name: the replicas' axis: a mesh axis inside ``jax.shard_map``, or ``vmap``'s
        ``axis_name``.
      key: the key the pairings are drawn from (the same on every replica).
      outer_lr: the outer rate (the paper's step size of both terms).
      momentum: the outer momentum.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``; its state is a
      :class:`DilocoState` whose ``outer_state`` is the momentum ``m`` (a pytree like params).

    Raises:
      JaxmergeError: ``every`` is not a whole number of at least 1; when traced, the replica
        axis has an odd size.

    References:
      Kolehmainen et al., "NoLoCo: No-all-reduce Low Communication Training Method for Large
      Models", arXiv 2506.10911.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxmerge import federated
      >>> tx = federated.noloco(optax.sgd(0.1), every=1, axis_name="replicas", key=jax.random.key(0),
      ...                       outer_lr=1.0, momentum=0.0)
      >>> def one_step(grad):
      ...     params = jnp.zeros(1)
      ...     updates, _ = tx.update(grad, tx.init(params), params)
      ...     return optax.apply_updates(params, updates)
      >>> jax.vmap(one_step, axis_name="replicas")(jnp.asarray([[1.0], [3.0]])).tolist()  # two replicas: partners
      [[-0.20000000298023224], [-0.20000000298023224]]
    """

    def synchronise(count, local, anchor, velocity):
        exchange = _partner_exchange(axis_name, jax.random.fold_in(key, count))
        delta = jax.tree.map(jnp.subtract, local, anchor)
        partner_delta, partner_anchor = exchange((delta, anchor))
        half = lambda a, b: (a + b) / 2  # noqa: E731

        def step(m, d, pd, a, pa):
            return momentum * m + outer_lr * half(d, pd) + outer_lr * (half(a, pa) - a)
        velocity = jax.tree.map(step, velocity, delta, partner_delta, anchor, partner_anchor)
        return jax.tree.map(jnp.add, anchor, velocity), velocity

    return _local_steps(inner, every, lambda params: jax.tree.map(jnp.zeros_like, params), synchronise, "noloco")


def _local_steps(inner: optax.GradientTransformation, every: int, outer_init: Callable[[PyTree], PyTree],
                 synchronise: Callable, name: str) -> optax.GradientTransformation:
    """``every`` steps of ``inner`` from an anchor, then ``synchronise(count, local, anchor,
    outer_state) -> (anchor, outer_state)``, after which every replica continues from the new
    anchor (up to the rounding of ``params + (anchor - params)``, within an ulp)."""
    _check_count("every", every, "steps")

    def init(params):
        return DilocoState(jnp.zeros((), jnp.int32), params, outer_init(params), inner.init(params))

    def update(grads, state, params=None):
        if params is None:
            raise JaxmergeError(f"{name} needs params: call update(grads, state, params)")
        updates, inner_state = inner.update(grads, state.inner_state, params)
        local = optax.apply_updates(params, updates)
        count = state.count + 1

        def synchronised(local, anchor, outer_state):
            new_anchor, new_outer_state = synchronise(count, local, anchor, outer_state)
            return _typed_like((new_anchor, new_anchor, new_outer_state), (local, anchor, outer_state))

        local, anchor, outer_state = jax.lax.cond(count % every == 0, synchronised, lambda *a: a, local, state.anchor,
                                                  state.outer_state)
        return jax.tree.map(jnp.subtract, local, params), DilocoState(count, anchor, outer_state, inner_state)

    return optax.GradientTransformation(init, update)


def _round_robin_pairings(num_replicas: int) -> list[list[tuple[int, int]]]:
    """The ``num_replicas - 1`` perfect matchings of the circle method, each as the
    ``(source, destination)`` pairs of a ``lax.ppermute`` that swaps partners: together they
    hold every pair of replicas exactly once (``num_replicas`` even)."""
    last = num_replicas - 1
    pairings = []
    for r in range(last):
        pairs = [(r, last)] + [((r + k) % last, (r - k) % last) for k in range(1, num_replicas // 2)]
        pairings.append(pairs + [(b, a) for a, b in pairs])
    return pairings


def _partner_exchange(axis_name: str, key: jax.Array) -> Callable[[PyTree], PyTree]:
    """A function that swaps a pytree with this replica's partner in a pairing drawn from ``key``."""
    num_replicas = jax.lax.axis_size(axis_name)
    if num_replicas % 2:
        raise JaxmergeError(f"noloco pairs replicas: the axis {axis_name!r} must have an even size, got {num_replicas}")
    pairings = _round_robin_pairings(num_replicas)
    index = jax.random.randint(key, (), 0, len(pairings))
    branches = [lambda tree, perm=perm: jax.lax.ppermute(tree, axis_name, perm) for perm in pairings]
    return lambda tree: jax.lax.switch(index, branches, tree)


def _check_count(name: str, value, unit: str) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        raise JaxmergeError(f"{name} must be a whole number of {unit}, at least 1, got {value!r}")


def _per_client(values, num_clients: int, name: str, dtype) -> jax.Array:
    """A ``(num_clients,)`` vector of ``values`` (default: ones), or an error naming it."""
    if values is None:
        return jnp.ones(num_clients, dtype)
    if jnp.shape(values) != (num_clients,):
        raise JaxmergeError(f"{name} must have one entry per client, shape ({num_clients},), got {jnp.shape(values)}")
    return jnp.asarray(values, dtype)


def _check_stacked(params: PyTree, client_params: PyTree) -> int:
    """The number of clients: the leading axis every client leaf adds to its server leaf."""
    counts = set()

    def check(path, p, c):
        shape = jnp.shape(c)
        if shape[1:] != jnp.shape(p) or not shape:
            raise JaxmergeError(f"client params at {jax.tree_util.keystr(path)} have shape {shape}; expected "
                                f"(num_clients, *{jnp.shape(p)}): stack the clients on a leading axis")
        counts.add(shape[0])
    jax.tree_util.tree_map_with_path(check, params, client_params)
    if not counts:
        raise JaxmergeError("the params hold no arrays")
    if len(counts) != 1:
        raise JaxmergeError(f"client params disagree on the number of clients: {sorted(counts)}")
    return counts.pop()


def _typed_like(values: PyTree, like: PyTree) -> PyTree:
    """``values`` marked as varying across the ``shard_map`` axes over which ``like``'s leaves
    vary (averaged values are the same on every device, but ``lax.cond`` needs both branches'
    types alike); unchanged outside ``shard_map`` (e.g. under ``vmap``)."""
    def typed(value, reference):
        axes = tuple(jax.typeof(reference).manual_axis_type.varying - jax.typeof(value).manual_axis_type.varying)
        return jax.lax.pcast(value, axes, to="varying") if axes else value
    return jax.tree.map(typed, values, like)
