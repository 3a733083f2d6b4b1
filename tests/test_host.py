import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmerge import _host


def test_on_host_means_numpy_or_a_concrete_array_on_one_cpu_device():
    assert _host.on_host([np.zeros(3), jnp.zeros(3)])
    mesh = jax.make_mesh((2,), ("a",), devices=jax.devices()[:2])
    assert not _host.on_host([jax.device_put(jnp.zeros(4), NamedSharding(mesh, P("a")))])
    assert not _host.on_host([jax.device_put(jnp.zeros(4), NamedSharding(mesh, P()))])  # two copies
    seen = []
    jax.jit(lambda x: seen.append(_host.on_host([x])) or x)(jnp.zeros(3))
    concrete = jnp.zeros(3)  # closed over: concrete, but the traced key says a trace is active
    jax.jit(lambda key: seen.append(_host.on_host([concrete], {"key": key, "p": 0.5})) or key)(jnp.zeros(2))
    assert seen == [False, False]
    assert _host.on_host([concrete], {"key": jnp.zeros(2), "p": 0.5})


def test_on_host_needs_jax_computing_on_the_cpu(monkeypatch):
    """With another default backend the loop's kernels would run there, not where the arrays are."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not _host.on_host([jnp.zeros(3)])
    assert not _host.on_host([np.zeros(3)])


def test_aligned_empty_is_wrapped_by_jax_without_a_copy():
    for shape, dtype in (((3, 5), np.float32), ((7,), np.bool_)):
        array = _host.aligned_empty(shape, dtype)
        assert array.shape == shape and array.dtype == dtype and array.ctypes.data % _host.ALIGNMENT == 0
    array = _host.aligned_empty((64,), np.float32)
    assert jax.device_put(array).unsafe_buffer_pointer() == array.ctypes.data


def test_assemble_copies_every_block_in_its_place():
    blocks = [(0, (np.arange(4), np.ones(4, bool))), (4, (np.arange(4) + 10, np.zeros(4, bool))),
              (5, (np.arange(4) + 20, np.ones(4, bool)))]  # the last block overlaps the one before
    numbers, flags = _host.assemble(9, iter(blocks))
    np.testing.assert_array_equal(numbers, [0, 1, 2, 3, 10, 20, 21, 22, 23])
    np.testing.assert_array_equal(flags, [True] * 4 + [False] + [True] * 4)
    assert _host.assemble(0, iter([])) == ()
