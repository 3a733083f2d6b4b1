import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmerge import federated
from jaxmerge.errors import JaxmergeError


def _problem(num_clients=4, per_client=8, dim=3, seed=0):
    """Least squares split over clients: params ``w``, data ``(x, y)`` per client."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_clients, per_client, dim)).astype(np.float32)
    y = rng.standard_normal((num_clients, per_client)).astype(np.float32)
    return {"w": jnp.zeros(dim, jnp.float32)}, (jnp.asarray(x), jnp.asarray(y))


def _loss(params, data):
    x, y = data
    return jnp.mean((x @ params["w"] - y) ** 2)


def _sgd_steps(steps, lr):
    def client_update(params, data):
        def step(p, _):
            return jax.tree.map(lambda a, g: a - lr * g, p, jax.grad(_loss)(p, data)), None
        return jax.lax.scan(step, params, None, length=steps)[0]
    return client_update


def test_one_client_one_step_of_fedavg_is_one_step_of_sgd():
    params, data = _problem(num_clients=1)
    fedavg = federated.server()
    clients = federated.run_clients(_sgd_steps(1, 0.1), params, data)
    new, _ = fedavg.update(params, fedavg.init(params, 1), clients)
    expected = params["w"] - 0.1 * jax.grad(_loss)(params, jax.tree.map(lambda a: a[0], data))["w"]
    np.testing.assert_allclose(new["w"], expected, rtol=1e-6)


def test_fedadam_with_one_gradient_step_clients_is_adam_on_the_mean_gradient(standard_promotion):
    params, data = _problem()
    fedadam = federated.server(optax.adam(0.05))
    state = fedadam.init(params, 4)
    reference, adam_state = params, optax.adam(0.05).init(params)
    for _ in range(5):
        clients = federated.run_clients(_sgd_steps(1, 1.0), params, data)  # p - grad
        params, state = fedadam.update(params, state, clients)
        grads = jax.vmap(jax.grad(_loss), in_axes=(None, 0))(reference, data)
        mean = jax.tree.map(lambda g: g.mean(0), grads)
        updates, adam_state = optax.adam(0.05).update(mean, adam_state, reference)
        reference = optax.apply_updates(reference, updates)
        np.testing.assert_allclose(params["w"], reference["w"], rtol=1e-5, atol=1e-6)


def test_known_participation_is_the_example_weighted_mean_of_the_participants():
    params = {"w": jnp.asarray([1.0, -1.0])}
    clients = {"w": jnp.asarray([[2.0, 0.0], [4.0, 4.0], [100.0, 100.0]])}
    taking_part = jnp.asarray([True, True, False])
    examples = jnp.asarray([1.0, 3.0, 50.0])
    fedavg = federated.server()
    new, _ = fedavg.update(params, fedavg.init(params, 3), clients, taking_part, examples)
    np.testing.assert_allclose(new["w"], (1 * np.asarray([2.0, 0.0]) + 3 * np.asarray([4.0, 4.0])) / 4)
    nobody, state = fedavg.update(params, fedavg.init(params, 3), clients, jnp.zeros(3, bool), examples)
    np.testing.assert_array_equal(nobody["w"], params["w"])  # no participant: nothing changes
    empty, _ = fedavg.update(params, fedavg.init(params, 3), clients, taking_part, jnp.asarray([0.0, 0.0, 50.0]))
    np.testing.assert_array_equal(empty["w"], params["w"])  # participants without examples: nothing changes


def test_momentum_server_keeps_its_state_through_a_round_without_clients():
    params, data = _problem()
    server = federated.server(optax.sgd(0.5, momentum=0.9))
    state = server.init(params, 4)
    clients = federated.run_clients(_sgd_steps(2, 0.1), params, data)
    params, state = server.update(params, state, clients)
    same, kept = server.update(params, state, clients, jnp.zeros(4, bool))
    np.testing.assert_array_equal(same["w"], params["w"])
    jax.tree.map(np.testing.assert_array_equal, kept, state)


def test_fedau_weights_converge_to_the_inverse_participation_rates():
    rates = np.asarray([1.0, 0.5, 0.25, 0.1])
    schedule = jax.random.uniform(jax.random.key(7), (3000, 4)) < jnp.asarray(rates, jnp.float32)[None]

    def step(state, taking_part):
        return federated.participation_weights(state, taking_part, cutoff=1000)[1], None
    state, _ = jax.lax.scan(step, federated.participation_state(4), schedule)
    np.testing.assert_allclose(np.asarray(state.total / state.count), 1 / rates, rtol=0.1)


def test_fedau_matches_a_loop_over_clients_written_from_the_paper():
    rng = np.random.default_rng(3)
    schedule = rng.random((40, 3)) < [0.9, 0.4, 0.2]
    cutoff = 4
    since, intervals = [0, 0, 0], [[], [], []]
    state = federated.participation_state(3)
    for taking_part in schedule:
        weights, state = federated.participation_weights(state, jnp.asarray(taking_part), cutoff)
        for i in range(3):
            if taking_part[i]:
                assert weights[i] == pytest.approx(np.mean(intervals[i]) if intervals[i] else 1.0)
                intervals[i].append(since[i] + 1)
                since[i] = 0
            else:
                assert weights[i] == 0
                since[i] += 1
                if since[i] >= cutoff:
                    intervals[i].append(since[i])
                    since[i] = 0


def test_unknown_participation_scales_each_change_by_its_weight_over_all_clients():
    params = {"w": jnp.zeros(1)}
    clients = {"w": jnp.asarray([[1.0], [2.0]])}
    server = federated.server(participation="unknown", cutoff=10)
    state = server.init(params, 2)
    state = state._replace(participation=state.participation._replace(total=jnp.asarray([3.0, 0.0]),
                                                                      count=jnp.asarray([1.0, 0.0])))
    new, _ = server.update(params, state, clients, jnp.asarray([True, False]))
    np.testing.assert_allclose(new["w"], [3.0 * 1.0 / 2])  # weight 3 (mean interval), over 2 clients
    both, _ = server.update(params, state, clients, jnp.asarray([True, True]), jnp.asarray([1.0, 3.0]))
    np.testing.assert_allclose(both["w"], [(3.0 * 1 * 1.0 + 1.0 * 3 * 2.0) / 4])  # times each client's examples


def test_a_jitted_round_sharded_over_clients_equals_the_unsharded_one(standard_promotion):
    params, data = _problem(num_clients=8)
    server = federated.server(optax.adam(0.1), participation="unknown")
    taking_part = federated.sample_clients(jax.random.key(1), 8, 5)

    @jax.jit
    def round_(params, state, data):
        clients = federated.run_clients(_sgd_steps(3, 0.05), params, data)
        return server.update(params, state, clients, taking_part)
    expected = round_(params, server.init(params, 8), data)
    mesh = jax.make_mesh((8,), ("clients",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(data, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("clients")))
    got = round_(params, server.init(params, 8), sharded)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, expected)


def test_iid_fedavg_tracks_centralised_gradient_descent():
    params, data = _problem(num_clients=4, per_client=16)
    fedavg = federated.server()
    state = fedavg.init(params, 4)
    central = params
    pooled = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), data)
    for _ in range(30):
        params, state = fedavg.update(params, state, federated.run_clients(_sgd_steps(1, 0.05), params, data))
        central = jax.tree.map(lambda a, g: a - 0.05 * g, central, jax.grad(_loss)(central, pooled))
    np.testing.assert_allclose(params["w"], central["w"], rtol=1e-4, atol=1e-6)  # equal shards: the same steps


def test_bad_settings_are_refused():
    with pytest.raises(JaxmergeError, match="participation"):
        federated.server(participation="sometimes")
    with pytest.raises(JaxmergeError, match="cutoff"):
        federated.server(participation="unknown", cutoff=0)
    with pytest.raises(JaxmergeError, match="num_sampled"):
        federated.sample_clients(jax.random.key(0), 3, 4)
    fedavg = federated.server()
    params = {"w": jnp.zeros(2), "b": jnp.zeros(())}
    with pytest.raises(JaxmergeError, match=r"\['w'\] have shape \(2,\)"):
        fedavg.update(params, fedavg.init(params, 2), {"w": jnp.zeros(2), "b": jnp.zeros(2)})
    with pytest.raises(JaxmergeError, match="disagree on the number of clients"):
        fedavg.update(params, fedavg.init(params, 2), {"w": jnp.zeros((2, 2)), "b": jnp.zeros(3)})
    stacked = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    with pytest.raises(JaxmergeError, match=r"participating must have one entry per client, shape \(2,\)"):
        fedavg.update(params, fedavg.init(params, 2), stacked, jnp.ones(1, bool))
    fedau = federated.server(participation="unknown")
    with pytest.raises(JaxmergeError, match="made for 3 clients, the round has 2"):
        fedau.update(params, fedau.init(params, 3), stacked)
    with pytest.raises(JaxmergeError, match="cutoff"):
        federated.participation_weights(federated.participation_state(2), jnp.ones(2, bool), cutoff=0)
    assert federated.diloco(optax.sgd(0.1), every=np.int64(2), axis_name="r") is not None


def _replica_batches(replicas=4, steps=6, dim=3, seed=5):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((replicas, steps, 8, dim)), jnp.float32),
            jnp.asarray(rng.standard_normal((replicas, steps, 8)), jnp.float32))


def _train_replica(tx, batches, start=lambda w: w):
    """One replica's run: ``tx`` steps over its batches, from ``start(zeros)``; the params after each step."""
    def step(carry, batch):
        params, state = carry
        updates, state = tx.update(jax.grad(_loss)(params, batch), state, params)
        params = optax.apply_updates(params, updates)
        return (params, state), params["w"]
    params = {"w": start(jnp.zeros(batches[0].shape[-1], jnp.float32))}
    return jax.lax.scan(step, (params, tx.init(params)), batches)[1]


def test_diloco_averaging_every_step_is_synchronous_sgd_on_the_mean_gradient():
    batches = _replica_batches()
    tx = federated.diloco(optax.sgd(0.1), every=1, axis_name="replicas")
    got = jax.vmap(lambda b: _train_replica(tx, b), axis_name="replicas")(batches)
    params = {"w": jnp.zeros(3, jnp.float32)}
    for t in range(batches[0].shape[1]):
        grads = jax.vmap(jax.grad(_loss), in_axes=(None, 0))(params, (batches[0][:, t], batches[1][:, t]))
        params = {"w": params["w"] - 0.1 * grads["w"].mean(0)}
        for replica in range(4):
            np.testing.assert_allclose(got[replica, t], params["w"], rtol=1e-5, atol=1e-7)


def test_diloco_replicas_drift_between_synchronisations_and_agree_after_them():
    tx = federated.diloco(optax.sgd(0.1), every=3, axis_name="replicas",
                          outer=optax.sgd(0.7, momentum=0.9, nesterov=True))
    got = np.asarray(jax.vmap(lambda b: _train_replica(tx, b), axis_name="replicas")(_replica_batches()))
    for t in range(6):
        spread = np.ptp(got[:, t], axis=0).max()
        assert (spread < 1e-6) if (t + 1) % 3 == 0 else (spread > 1e-3), (t, spread)


@pytest.mark.parametrize("tx", [
    federated.diloco(optax.adam(0.05), every=2, axis_name="replicas", outer=optax.sgd(0.7, momentum=0.9, nesterov=True)),
    federated.noloco(optax.adam(0.05), every=2, axis_name="replicas", key=jax.random.key(1))], ids=["diloco", "noloco"])
def test_local_steps_on_a_mesh_of_replicas_equal_the_vmapped_simulation(tx, standard_promotion):
    batches = _replica_batches()
    simulated = jax.vmap(lambda b: _train_replica(tx, b), axis_name="replicas")(batches)
    mesh = jax.make_mesh((4,), ("replicas",), axis_types=(jax.sharding.AxisType.Explicit,), devices=jax.devices()[:4])
    spec = jax.sharding.PartitionSpec("replicas")
    placed = jax.device_put(batches, jax.sharding.NamedSharding(mesh, spec))

    def replica(local):  # each replica's own params (varying): gradients of shared ones would be summed
        own = lambda w: jax.lax.pcast(w, "replicas", to="varying")  # noqa: E731
        return _train_replica(tx, jax.tree.map(lambda a: a[0], local), own)[None]
    sharded = jax.jit(jax.shard_map(replica, mesh=mesh, in_specs=(spec,), out_specs=spec))(placed)
    np.testing.assert_allclose(sharded, simulated, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("replicas", [2, 4, 8])
def test_round_robin_pairings_pair_every_replica_with_each_other_once(replicas):
    pairings = federated._round_robin_pairings(replicas)
    assert len(pairings) == replicas - 1
    seen = []
    for perm in pairings:
        partner = dict(perm)
        assert sorted(partner) == list(range(replicas)) and all(partner[partner[i]] == i != partner[i] for i in partner)
        seen += [frozenset(p) for p in perm if p[0] < p[1]]
    assert sorted(map(sorted, seen)) == [[i, j] for i in range(replicas) for j in range(i + 1, replicas)]


def test_noloco_of_two_replicas_is_diloco_with_heavy_ball_momentum():
    batches = _replica_batches(replicas=2)
    noloco = federated.noloco(optax.sgd(0.1), every=2, axis_name="replicas", key=jax.random.key(3), outer_lr=0.6,
                              momentum=0.4)
    diloco = federated.diloco(optax.sgd(0.1), every=2, axis_name="replicas", outer=optax.sgd(0.6, momentum=0.4))
    got, expected = (jax.vmap(lambda b, tx=tx: _train_replica(tx, b), axis_name="replicas")(batches)
                     for tx in (noloco, diloco))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def _noloco_reference(batches, key, every, lr, outer_lr, momentum):
    """NumPy: each replica's SGD steps; every ``every`` steps, the pairing drawn as noloco draws it
    and the paper's outer step for each pair."""
    xs, ys = (np.asarray(a, np.float64) for a in batches)
    replicas, steps = xs.shape[:2]
    local, anchor, velocity = (np.zeros((replicas, xs.shape[-1])) for _ in range(3))
    history = []
    for t in range(steps):
        for i in range(replicas):
            residual = xs[i, t] @ local[i] - ys[i, t]
            local[i] -= lr * 2 * xs[i, t].T @ residual / len(residual)
        if (t + 1) % every == 0:
            index = int(jax.random.randint(jax.random.fold_in(key, t + 1), (), 0, replicas - 1))
            partner = dict(federated._round_robin_pairings(replicas)[index])
            delta = local - anchor
            pair = np.array([partner[i] for i in range(replicas)])
            velocity = (momentum * velocity + outer_lr * (delta + delta[pair]) / 2
                        + outer_lr * ((anchor + anchor[pair]) / 2 - anchor))
            anchor = anchor + velocity
            local = anchor.copy()
        history.append(local.copy())
    return np.stack(history, axis=1)


def test_noloco_matches_a_numpy_reference_of_the_paper():
    batches, key = _replica_batches(replicas=4, steps=8), jax.random.key(11)
    tx = federated.noloco(optax.sgd(0.05), every=2, axis_name="replicas", key=key)
    got = np.asarray(jax.vmap(lambda b: _train_replica(tx, b), axis_name="replicas")(batches))
    np.testing.assert_allclose(got, _noloco_reference(batches, key, 2, 0.05, 0.7, 0.5), rtol=1e-4, atol=1e-6)
    assert np.ptp(got[:, -1], axis=0).max() > 1e-4  # no all-reduce: the replicas differ after synchronising


def test_noloco_refuses_an_odd_number_of_replicas():
    tx = federated.noloco(optax.sgd(0.1), every=1, axis_name="replicas", key=jax.random.key(1))
    with pytest.raises(JaxmergeError, match="axis 'replicas' must have an even size, got 3"):
        jax.vmap(lambda b: _train_replica(tx, b), axis_name="replicas")(_replica_batches(replicas=3))


def test_every_must_be_a_positive_whole_number():
    with pytest.raises(JaxmergeError, match="every"):
        federated.diloco(optax.sgd(0.1), every=0, axis_name="replicas")
    with pytest.raises(JaxmergeError, match="every"):
        federated.noloco(optax.sgd(0.1), every=1.5, axis_name="replicas", key=jax.random.key(0))


def test_server_state_restored_from_orbax_continues_bit_identically(tmp_path, standard_promotion):
    from orbax.checkpoint import v1 as ocp

    params, data = _problem(num_clients=6)
    server = federated.server(optax.adam(0.05), participation="unknown", cutoff=3)
    masks = [federated.sample_clients(key, 6, 3) for key in jax.random.split(jax.random.key(2), 8)]

    @jax.jit
    def round_(params, state, taking_part):
        return server.update(params, state, federated.run_clients(_sgd_steps(2, 0.05), params, data), taking_part)
    state = server.init(params, 6)
    for mask in masks[:4]:
        params, state = round_(params, state, mask)
    ocp.save(tmp_path / "round4", {"params": params, "state": state})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            {"params": params, "state": state})
    restored = ocp.load(tmp_path / "round4", abstract)
    runs = []
    for p, s in ((params, state), (restored["params"], restored["state"])):
        for mask in masks[4:]:
            p, s = round_(p, s, mask)
        runs.append((p, s))
    jax.tree.map(np.testing.assert_array_equal, runs[0], runs[1])
