"""Independent NumPy (float64) references for the task-vector merges, from the papers' formulas
and mergekit's documented semantics."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry_2x32


def top_k(x, k):
    """Mask of the k largest |x|; equal magnitudes go to the lower flat index (stable sort)."""
    order = np.argsort(-np.abs(x).ravel(), kind="stable")
    mask = np.zeros(x.size, bool)
    mask[order[:max(k, 0)]] = True
    return mask.reshape(x.shape)


def uniforms(key, shape):
    """The documented uniforms: entry ``i`` gets ``(w_i >> 8) / 2**24`` (float32), ``w_i`` word
    ``i mod 2`` of the Threefry-2x32 block at counter ``(0, i // 2)`` under two words drawn
    from ``key`` (made with ``jax.extend.random.threefry_2x32``, which takes the counters' high
    words then their low words)."""
    n = int(np.prod(shape))
    pairs = -(-n // 2)
    keypair = jax.random.bits(key, (2,), jnp.uint32)
    counters = np.concatenate([np.zeros(pairs, np.uint32), np.arange(pairs, dtype=np.uint32)])
    words = np.asarray(threefry_2x32(keypair, jnp.asarray(counters))).reshape(2, pairs).T.reshape(-1)[:n]
    return ((words >> 8).astype(np.float32) * np.float32(2.0 ** -24)).reshape(shape)


def keep_draws(key, probability, shape):
    """The documented random keep test: entry ``i`` is kept when ``u_i < p_i``."""
    return uniforms(key, shape) < np.broadcast_to(np.asarray(probability, np.float32), shape)


def della_keep(key, delta, density, epsilon):
    """DELLA's documented keep test, in float32: an entry is kept when its rank (of its float32
    magnitude in its row) reaches ``ceil((u - (density - epsilon)) (n - 1) / (2 epsilon))``."""
    rows = delta.astype(np.float32).reshape(1, -1) if delta.ndim < 2 else delta.astype(np.float32)
    n = rows.shape[1]
    u = uniforms(key, delta.shape)
    if n == 1 or epsilon == 0:
        return u < np.float32(density)
    shift, scale = np.float32(density) - np.float32(epsilon), np.float32(n - 1) / (np.float32(2) * np.float32(epsilon))
    count = np.ceil(np.clip((u - shift) * scale, -1, n))
    return row_ranks(rows).reshape(delta.shape) >= count


def row_ranks(rows):
    """Per entry, the entries of smaller magnitude in its row (axis 1)."""
    ranks = np.empty(rows.shape)
    for index in np.ndindex(rows.shape[:1] + rows.shape[2:]):
        row_index = (index[0], slice(None)) + index[1:]
        magnitudes = np.abs(rows[row_index])
        ranks[row_index] = (magnitudes[:, None] > magnitudes[None, :]).sum(1)
    return ranks


def magnitude(delta, density):
    """mergekit 0.1.5: a positive density keeps at least one entry."""
    return top_k(delta, max(1, int(density * delta.size)))


def breadcrumbs(delta, density, gamma):
    """mergekit 0.1.5: ``n_bot = max(0, n - int(density n) - int(gamma n))`` smallest entries are
    dropped, then ``int(density n)`` kept, so the outliers dropped shrink when gamma + density > 1."""
    keep = int(density * delta.size)
    top = delta.size - keep - max(0, delta.size - keep - int(gamma * delta.size))
    return top_k(delta, top + keep) & ~top_k(delta, top)


def rescaled(delta, mask, norm, keep=None):
    kept = np.where(mask, delta, 0.0)
    if norm is None:
        return kept
    if norm == "density":
        return kept / keep
    measure = {"l1": lambda v: np.abs(v).sum(), "l2": lambda v: np.sqrt((v ** 2).sum()),
               "linf": lambda v: np.abs(v).max()}[norm]
    before, after = measure(delta), measure(kept)
    return kept if before < 1e-7 or after < 1e-7 else kept * before / after


def della_probabilities(delta, density, epsilon):
    rows = delta.reshape(1, -1) if delta.ndim < 2 else delta
    n = rows.shape[1]
    relative = row_ranks(rows) / (n - 1) if n > 1 else np.full(rows.shape, 0.5)
    return (density - epsilon + 2 * epsilon * relative).reshape(delta.shape)


def combine(base, deltas, weights, *, consensus, normalize, lambda_):
    """Steps 2-4 of generalized task arithmetic: sign election, (disjoint) sum, scaling."""
    weighted = [w * d for w, d in zip(weights, deltas)]
    if consensus is None:
        mixed = sum(weighted)
        divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
    else:
        if consensus == "sum":
            elected = np.where(sum(weighted) >= 0, 1.0, -1.0)
        else:
            elected = np.where(sum(np.sign(x) for x in weighted) >= 0, 1.0, -1.0)
        agree = [np.sign(x) == elected for x in weighted]
        mixed = sum(np.where(a, x, 0.0) for a, x in zip(agree, weighted))
        divisor = sum(np.where(a, w, 0.0) for a, w in zip(agree, weights))
        divisor = np.where(divisor == 0, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    return base + lambda_ * mixed
