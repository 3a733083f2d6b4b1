"""One of two processes of tests/test_multiprocess.py: `python multiprocess_worker.py ID PORT DIR`.

Each process sees 4 simulated CPU devices (8 in all, joined by jax.distributed over
localhost with the gloo CPU collectives). Together they save sharded Orbax checkpoints,
merge them streamed and in memory, and compute data-parallel statistics of a batch split
between them; process 0 writes the statistics for the parent test to check.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmerge
from jaxmerge import checkpoints


def model(seed: int) -> dict:
    """The test's models: the same numbers in every process (and in the parent)."""
    rng = np.random.default_rng(seed)
    return {"layer": {"w": rng.standard_normal((16, 8)).astype(np.float32),
                      "b": rng.standard_normal(8).astype(np.float32)},
            "head": rng.standard_normal((8, 4)).astype(np.float32)}


def batch() -> np.ndarray:
    return np.random.default_rng(99).standard_normal((64, 16)).astype(np.float32)


def apply(params, data):
    h = jnp.tanh(data[0] @ params["layer"]["w"] + params["layer"]["b"][None])
    return h @ params["head"]


def main(process_id: int, port: int, out: Path) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rule = checkpoints.largest_axes_sharding(mesh)

    def distributed(tree):
        flat = {"layer/w": tree["layer"]["w"], "layer/b": tree["layer"]["b"], "head": tree["head"]}
        arrays = {k: jax.make_array_from_callback(v.shape, rule(k, v.shape), lambda index, v=v: v[index])
                  for k, v in flat.items()}
        return {"layer": {"w": arrays["layer/w"], "b": arrays["layer/b"]}, "head": arrays["head"]}

    paths = [checkpoints.save(out / f"m{i}", distributed(model(i))) for i in range(4)]
    # streamed: each process reads only its shards of every tensor, merges, writes its shards
    checkpoints.stream_merge(jaxmerge.plan("ties", density=0.5), paths[1:], out / "ties", base=paths[0],
                             options=checkpoints.StreamOptions(sharding=rule, progress=False))
    # in memory: restore into the sharding, merge under jit, save sharded
    loaded = [checkpoints.load(p, sharding=rule) for p in paths[1:]]
    merged = jax.jit(jaxmerge.average)(loaded)
    assert merged["layer"]["w"].sharding.is_equivalent_to(loaded[0]["layer"]["w"].sharding, 2)
    checkpoints.save(out / "average", merged)
    # data parallel: each process holds half of the batch
    local = batch()[process_id * 32:(process_id + 1) * 32]
    data = jax.make_array_from_process_local_data(NamedSharding(mesh, P(("data", "model"))), local)
    params = jax.tree.map(jnp.asarray, model(0))
    grams = jaxmerge.input_grams(apply, [(data,)], params=params)
    labels = jax.make_array_from_process_local_data(NamedSharding(mesh, P(("data", "model"))),
                                                    np.arange(process_id * 32, (process_id + 1) * 32) % 4)
    fisher = jaxmerge.diagonal_fisher(apply, [(data, labels)], params=params, microbatch=16)
    if process_id == 0:
        np.savez(out / "statistics.npz", gram=np.asarray(grams["layer"]["w"]["gram"].addressable_data(0)),
                 count=np.asarray(grams["layer"]["w"]["count"].addressable_data(0)),
                 fisher=np.asarray(fisher["layer"]["w"].addressable_data(0)))
    print(f"process {process_id} done", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
