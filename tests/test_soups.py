import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge


def scalar_models(values):
    return [{"w": jnp.asarray([v], jnp.float32)} for v in values]


def reference_greedy(values, score):
    """Recipe 1 of the model soups paper, by hand: sort by score, keep what does not hurt."""
    order = sorted(range(len(values)), key=lambda i: -score(values[i]))
    chosen = [order[0]]
    for i in order[1:]:
        if score(np.mean([values[j] for j in chosen + [i]])) >= score(np.mean([values[j] for j in chosen])):
            chosen.append(i)
    return sorted(chosen)


@pytest.mark.parametrize("values,target", [([1.0, 3.0, 2.5, -4.0, 2.0], 2.2), ([0.0, 1.0, 10.0], 0.4),
                                           ([5.0, -5.0, 4.0, -4.0], 0.0)])
def test_greedy_soup_matches_the_recipe(values, target):
    def score(v):
        return -abs(float(v) - target)

    calls = []

    def evaluate(params):
        calls.append(1)
        return score(params["w"][0])

    result = jaxmerge.greedy_soup(scalar_models(values), evaluate)
    assert list(result.indices) == reference_greedy(values, score)
    np.testing.assert_allclose(result.params["w"][0], np.mean([values[i] for i in result.indices]), rtol=1e-6)
    assert result.score >= max(score(v) for v in values)  # never worse than the best single
    assert result.score == pytest.approx(score(result.params["w"][0]))
    assert len(calls) == len(values) + len(values) - 1  # each single and each tried soup once
    assert [accepted for *_, accepted in result.history][0] is True


def test_strict_greedy_rejects_ties():
    models = scalar_models([1.0, 1.0])
    assert jaxmerge.greedy_soup(models, lambda p: 0.0).indices == (0, 1)
    assert jaxmerge.greedy_soup(models, lambda p: 0.0, keep_ties=False).indices == (0,)


def test_uniform_soup_is_the_average():
    models = scalar_models([1.0, 2.0, 6.0])
    np.testing.assert_allclose(jaxmerge.uniform_soup(models)["w"], [3.0])


def test_category_expert_soup_picks_experts_and_searches_weights():
    # four models, three categories; categories 0 and 1 move together, category 2 does not
    category_scores = np.array([[0.9, 0.8, 0.1], [0.5, 0.4, 0.2], [0.2, 0.1, 0.95], [0.1, 0.0, 0.3]])
    models = scalar_models([10.0, 20.0, 30.0, 40.0])

    def evaluate(params):  # the held-out optimum is 0.7 * model 0 + 0.3 * model 2 = 16
        return -abs(float(params["w"][0]) - 16.0)

    result = jaxmerge.category_expert_soup(models, category_scores, evaluate)
    assert result.indices == (0, 2)
    assert result.weights == pytest.approx((0.7, 0.3))
    np.testing.assert_allclose(result.params["w"], [16.0], rtol=1e-6)
    assert result.score == pytest.approx(0.0, abs=1e-5)
    assert len(result.history) == 1 + 9  # uniform, then the 9 grid pairs summing to 1


def test_evaluate_must_return_a_finite_scalar():
    models = scalar_models([1.0, 2.0])
    with pytest.raises(ValueError, match=r"evaluate must return a scalar, got an array of shape \(2,\)"):
        jaxmerge.greedy_soup(models, lambda p: np.ones(2))
    with pytest.raises(ValueError, match=r"evaluate returned nan for the soup of models \[0\]"):
        jaxmerge.greedy_soup(models, lambda p: float("nan"))
    with pytest.raises(ValueError, match="category_scores must have shape"):
        jaxmerge.category_expert_soup(models, np.ones((3, 2)), lambda p: 0.0)
