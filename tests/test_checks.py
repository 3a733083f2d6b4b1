"""jaxmerge.checked: hyperparameters traced under jit are checked at run time, naming the
hyperparameter and its value; without it the checks cost nothing and change nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxmerge

MODELS = [{"w": jnp.asarray([1.0, -2.0, 3.0])}, {"w": jnp.asarray([0.5, 1.0, -1.0])}]
BASE = {"w": jnp.zeros(3)}

CASES = {
    "nan weight": (lambda w: jaxmerge.average(MODELS, w), jnp.asarray([1.0, jnp.nan]),
                   r"weights of models\[1\] must be a finite number, got nan"),
    "weights summing to 0": (lambda w: jaxmerge.average(MODELS, w), jnp.asarray([1.0, -1.0]),
                             r"weights sum to 0 at 'w', so they cannot be normalized"),
    "density above 1": (lambda d: jaxmerge.ties(BASE, MODELS, density=d), jnp.float32(1.5),
                        r"density of models\[0\] must be in \(0, 1\], got 1.5"),
    "nan t": (lambda t: jaxmerge.slerp(MODELS[0], MODELS[1], t), jnp.float32(jnp.nan),
              r"t must be a finite number, got nan"),
}
GOOD = {"nan weight": jnp.asarray([1.0, 3.0]), "weights summing to 0": jnp.asarray([1.0, 3.0]),
        "density above 1": jnp.float32(0.5), "nan t": jnp.float32(0.3)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_traced_hyperparameters_are_checked_at_run_time(case):
    merge, bad, message = CASES[case]
    jitted = jax.jit(merge)
    with pytest.raises(checkify.JaxRuntimeError, match=message):
        jaxmerge.checked(jitted)(bad)
    jax.tree.map(np.testing.assert_array_equal, jaxmerge.checked(jitted)(GOOD[case]), jitted(GOOD[case]))
    with pytest.raises(jaxmerge.JaxmergeError, match=message.split(" got")[0]):  # concrete: refused at once
        merge(np.asarray(bad))


def test_unchecked_traced_values_pass_through():
    merge = jax.jit(lambda t: jaxmerge.lerp(MODELS[0], MODELS[1], t))
    assert np.isnan(np.asarray(merge(jnp.float32(jnp.nan))["w"])).all()
