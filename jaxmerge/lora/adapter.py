"""LoRA adapters in PEFT's format: ``adapter_config.json`` and ``adapter_model.safetensors``.

An :class:`Adapter` is a pytree: each adapted module's low-rank factors (``A``, ``B``) as
:class:`LoraLayer` leaves, plus any other tensors the file holds (copied base layers,
``modules_to_save``), with PEFT's config alongside as static data. Module names are the
base model's (``model.layers.0.self_attn.q_proj``); the file's tensors add PEFT's prefix
``base_model.model.`` and the suffixes ``.lora_A.weight`` / ``.lora_B.weight`` (linear and
convolution layers) or ``.lora_embedding_A`` / ``.lora_embedding_B`` (embeddings).

The update a module adds to its base weight is ``scaling * B @ A`` with ``scaling =
lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA, arXiv 2312.03732), ``r`` and
``lora_alpha`` taken per module from ``rank_pattern`` / ``alpha_pattern`` where a pattern
matches the module's name (Hu et al., "LoRA", arXiv 2106.09685).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmerge.errors import CheckpointError, JaxmergeError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_FACTOR = re.compile(  # PEFT reads a factor with its adapter's name, ``.default``, as it reads one without
    r"^(?P<module>.+)\.(?:lora_(?P<linear>[AB])(?:\.default)?\.weight|lora_embedding_(?P<embedding>[AB])(?:\.default)?)$")


class LoraLayer(NamedTuple):
    """One module's factors in PEFT's layout: the update is ``B @ A`` (times the scaling).

    Attributes:
      a: ``(r, in_features)``; ``(r, num_embeddings)`` for an embedding; ``(r, in, kh, kw)``
        for a convolution.
      b: ``(out_features, r)``; ``(embedding_dim, r)`` for an embedding; ``(out, r, 1, 1)``
        for a convolution.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import lora
      >>> layer = lora.LoraLayer(a=jnp.ones((2, 5)), b=jnp.ones((3, 2)))
      >>> lora.delta_weight(layer, 0.5).tolist()[0]
      [1.0, 1.0, 1.0, 1.0, 1.0]
    """

    a: jax.Array
    b: jax.Array


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True)
class Adapter:
    """A LoRA adapter: factors per module, other tensors, and PEFT's config.

    A pytree whose leaves are the factors and the other tensors (so ``jax.tree.map``,
    ``jax.jit`` and ``jax.device_put`` work on it); the config is static.

    Attributes:
      layers: ``{module name: LoraLayer}``.
      config: PEFT's ``adapter_config.json`` as a dict (``r``, ``lora_alpha``,
        ``target_modules``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``, ...).
      embeddings: the names of the modules that are embeddings (PEFT's
        ``lora_embedding_A/B``): their update is stored transposed, ``(B @ A).T``.
      extras: other tensors of the file under their full names (a copied base layer, or a
        module trained in full, ``modules_to_save``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxmerge import lora
      >>> layer = lora.LoraLayer(a=jnp.ones((4, 8)), b=jnp.zeros((8, 4)))
      >>> adapter = lora.Adapter({"model.q_proj": layer}, lora.lora_config(4, 16, ["q_proj"]))
      >>> adapter.rank("model.q_proj"), adapter.scaling("model.q_proj")
      (4, 4.0)
      >>> jax.tree.map(lambda x: x.astype(jnp.bfloat16), adapter).layers["model.q_proj"].a.dtype
      dtype(bfloat16)
    """

    layers: Mapping[str, LoraLayer]
    config: Mapping
    embeddings: frozenset = frozenset()
    extras: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)

    def tree_flatten_with_keys(self):
        children = [(jax.tree_util.GetAttrKey("layers"), dict(self.layers)),
                    (jax.tree_util.GetAttrKey("extras"), dict(self.extras))]
        return children, (json.dumps(self.config, sort_keys=True), self.embeddings)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], json.loads(aux[0]), aux[1], children[1])

    def rank(self, module: str) -> int:
        """``r`` of ``module``: the config's ``rank_pattern`` entry matching its name, else ``r``."""
        return int(_pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"]))

    def scaling(self, module: str) -> float:
        """The factor of ``module``'s update: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"])
        rank = self.rank(module)
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def delta(self, module: str, fan_in_fan_out: bool | None = None) -> jax.Array:
        """The update ``module``'s adapter adds to its base weight, shaped like that weight
        (``(out, in)``; ``(num_embeddings, dim)`` for an embedding; transposed for a layer that
        stores its weight ``(in, out)``: ``fan_in_fan_out``, by default the config's), in float32."""
        if fan_in_fan_out is None:
            fan_in_fan_out = bool(self.config.get("fan_in_fan_out"))
        layer = self.layers[module]
        return delta_weight(layer, self.scaling(module), transposed=module in self.embeddings or fan_in_fan_out)


def _pattern_value(patterns: Mapping, module: str, default):
    """PEFT's per-module override: the first pattern ``p`` with ``module`` matching ``(.*\\.)?(p)$``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


@jax.jit(static_argnames=("transposed",), compiler_options={"xla_allow_excess_precision": False})
def delta_weight(layer: LoraLayer, scaling, *, transposed: bool = False) -> jax.Array:
    """One module's update ``scaling * B @ A``, in float32, with PEFT's arithmetic on CPU
    (on an accelerator, a float32 product of the backend's own).

    ``B @ A`` is summed over the rank in order, one fused multiply-add a term, as CPU
    matrix-multiply kernels (torch's) sum it; XLA has no fused multiply-add, so each step is
    taken in float64 (exact for the product of two float32 numbers) and rounded to float32:
    torch's float32 result unless the float64 sum lies on a float32 midpoint (compiled without
    XLA's excess precision, so that every step rounds). Then the product is multiplied by
    ``scaling`` in float32.

    Args:
      layer: the module's factors.
      scaling: the factor (:meth:`Adapter.scaling`).
      transposed: transpose the result (embeddings, and ``fan_in_fan_out`` layers).

    Returns:
      The update shaped like the base weight: ``(out, in)``, or a convolution's ``(out, in,
      kh, kw)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import lora
      >>> layer = lora.LoraLayer(a=jnp.ones((1, 3)), b=jnp.ones((2, 1)))
      >>> lora.delta_weight(layer, 2.0, transposed=True).shape
      (3, 2)
    """
    b = layer.b.astype(jnp.float32).reshape(layer.b.shape[:2])
    a = layer.a.astype(jnp.float32)
    if jax.default_backend() != "cpu":  # accelerators have no fast float64: their own float32 product
        product = jnp.einsum("or,r...->o...", b, a, precision=lax.Precision.HIGHEST)
    else:
        with jax.enable_x64(True):
            product = _rank_ordered_product(b, a)
    if transposed:
        product = product.T
    return product * jnp.float32(scaling)


def _rank_ordered_product(b: jax.Array, a: jax.Array) -> jax.Array:
    """``b @ a`` over the first axis of ``a`` as torch's CPU matrix multiply sums it: the rank
    split into blocks (:func:`_rank_blocks`), each summed from zero by a fused multiply-add per
    term, in order, and the blocks' sums added in order, each as it is made (one block's sum
    in memory at a time besides the total)."""
    wide = jnp.float64
    spread = (-1,) + (1,) * (a.ndim - 1)

    def step(k, total):
        term = lax.dynamic_index_in_dim(b, k, 1, keepdims=False).reshape(spread).astype(wide) \
            * lax.dynamic_index_in_dim(a, k, 0).astype(wide)
        return (total.astype(wide) + term).astype(jnp.float32)
    # zeros that the compiler cannot see as constants: else a block of one term is a bare product,
    # which LLVM fuses into the addition of the blocks (one rounding, where torch rounds twice)
    zeros = jnp.broadcast_to((b[:, :1] * 0).reshape(spread), (b.shape[0], *a.shape[1:]))

    def block(start, size: int):
        return lax.fori_loop(0, size, lambda k, total: step(start + k, total), zeros, unroll=8)
    blocks = _rank_blocks(a.shape[0])
    size = blocks[0][1]
    equal = sum(end - start == size for start, end in blocks)  # the leading blocks, of one size
    total = lax.fori_loop(1, equal, lambda j, total: total + block(j * size, size), block(0, size))
    for start, end in blocks[equal:]:
        total = total + block(start, end - start)
    return total


def _rank_blocks(rank: int) -> list[tuple[int, int]]:
    """How torch's CPU matrix multiply (MKL's, measured against torch 2.13) splits the summed
    axis: whole up to 192 terms, in two halves (and a last term when odd) up to 384, in
    blocks of 192 beyond."""
    size = rank if rank <= 192 else rank // 2 if rank <= 384 else 192
    return [(start, min(start + size, rank)) for start in range(0, rank, size)]


def lora_config(r: int, lora_alpha: float, target_modules, **fields) -> dict:
    """A minimal PEFT LoRA config (``adapter_config.json``), other fields set by keyword.

    Args:
      r: the rank.
      lora_alpha: the scale numerator (``scaling = lora_alpha / r``).
      target_modules: module names (a list) or a regular expression.
      **fields: other fields (``use_rslora``, ``rank_pattern``, ``task_type``, ...).

    Returns:
      The config dict.

    Examples:
      >>> from jaxmerge import lora
      >>> config = lora.lora_config(8, 16, ["q_proj", "v_proj"])
      >>> config["peft_type"], config["r"], config["target_modules"]
      ('LORA', 8, ['q_proj', 'v_proj'])
    """
    return {"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "target_modules": target_modules,
            "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
            "fan_in_fan_out": False, "bias": "none", "lora_dropout": 0.0, "modules_to_save": None,
            "init_lora_weights": True, "inference_mode": True, "task_type": None,
            "base_model_name_or_path": None, **fields}


def check_plain(adapter: Adapter, name: str) -> None:
    """Refuse what PEFT's merges and a plain ``W + scaling B A`` do not cover: DoRA, LoRA
    biases, trained token rows."""
    if adapter.config.get("use_dora"):
        raise JaxmergeError(f"{name} is a DoRA adapter (use_dora): its update is not B @ A alone; not supported")
    if adapter.config.get("lora_bias"):
        raise JaxmergeError(f"{name} trains a bias with its LoRA (lora_bias): not supported")
    if adapter.config.get("trainable_token_indices"):
        raise JaxmergeError(f"{name} trains some token rows in full (trainable_token_indices): not supported")


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read a PEFT LoRA adapter directory (``adapter_config.json``, ``adapter_model.safetensors``).

    Args:
      path: the directory, as PEFT's ``save_pretrained`` writes it.

    Returns:
      The :class:`Adapter`, its tensors in their stored dtypes.

    Raises:
      CheckpointError: a missing or unreadable file, a config that is not a LoRA config, a
        module with only one of its factors, or factors whose rank disagrees with the
        config (each naming the file and tensor).

    Examples:
      >>> import tempfile, jax.numpy as jnp
      >>> from jaxmerge import lora
      >>> layer = lora.LoraLayer(a=jnp.ones((2, 3)), b=jnp.ones((4, 2)))
      >>> adapter = lora.Adapter({"model.q_proj": layer}, lora.lora_config(2, 4, ["q_proj"]))
      >>> path = lora.save_adapter(tempfile.mkdtemp() + "/adapter", adapter)
      >>> loaded = lora.load_adapter(path)
      >>> loaded.scaling("model.q_proj"), loaded.delta("model.q_proj").shape
      (2.0, (4, 3))
    """
    from jaxmerge.checkpoints.safetensors import SafetensorsReader

    path = Path(path)
    config = _read_config(path / CONFIG_NAME)
    weights = path / WEIGHTS_NAME
    if not weights.exists():
        found = " (it holds adapter_model.bin: convert it to safetensors)" if (path / "adapter_model.bin").exists() \
            else ""
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME}{found}")
    reader = SafetensorsReader(weights)
    factors: dict[str, dict[str, jax.Array]] = {}
    embeddings, extras = set(), {}
    for name in reader.names:
        match = _FACTOR.match(name)
        if match is None:
            extras[name] = reader.read(name)
            continue
        module = match["module"].removeprefix(PREFIX)
        factors.setdefault(module, {})[match["linear"] or match["embedding"]] = reader.read(name)
        if match["embedding"]:
            embeddings.add(module)
    layers = {}
    for module, parts in factors.items():
        if set(parts) != {"A", "B"}:
            raise CheckpointError(f"{weights}: module {module!r} has lora_{set(parts).pop()} but not its other factor")
        layers[module] = LoraLayer(parts["A"], parts["B"])
    adapter = Adapter(layers, config, frozenset(embeddings), extras)
    for module, layer in layers.items():
        if not layer.a.shape[0] == layer.b.shape[1] == adapter.rank(module):
            raise CheckpointError(f"{weights}: module {module!r} has factors A {tuple(layer.a.shape)} and B "
                                  f"{tuple(layer.b.shape)}, but the config gives it rank {adapter.rank(module)}")
    return adapter


def _read_config(file: Path) -> dict:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file.parent}: no {CONFIG_NAME}; not a PEFT adapter directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file}: not readable JSON ({error})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{file}: not a LoRA adapter (peft_type {kind!r})")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)) or isinstance(config.get(field), bool) \
                or config[field] <= 0:
            raise CheckpointError(f"{file}: {field} must be a positive number, got {config.get(field)!r}")
    return config


def tensor_names(adapter: Adapter) -> dict[str, jax.Array]:
    """The adapter's tensors under the names PEFT saves them with."""
    tensors = dict(adapter.extras)
    for module, layer in adapter.layers.items():
        if module in adapter.embeddings:
            a_name, b_name = f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B"
        else:
            a_name, b_name = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
        tensors[a_name], tensors[b_name] = layer.a, layer.b
    return dict(sorted(tensors.items()))


def save_adapter(path: str | os.PathLike, adapter: Adapter, *, force: bool = False,
                 inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Write ``adapter`` as a PEFT adapter directory, atomically (loadable by PEFT's ``from_pretrained``).

    Args:
      path: the directory to create.
      adapter: the adapter.
      force: replace an existing non-empty ``path``.
      inputs: directories the adapter was made from, which ``path`` must not overlap.

    Returns:
      The absolute path written.

    Raises:
      CheckpointError: ``path`` exists and is not empty, without ``force``, or overlaps an input.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp
      >>> from jaxmerge import lora
      >>> adapter = lora.Adapter({"q": lora.LoraLayer(jnp.ones((1, 2)), jnp.ones((2, 1)))}, lora.lora_config(1, 1, "q"))
      >>> sorted(os.listdir(lora.save_adapter(tempfile.mkdtemp() + "/out", adapter)))
      ['adapter_config.json', 'adapter_model.safetensors']
    """
    from jaxmerge.checkpoints.safetensors import SafetensorsWriter
    from jaxmerge.checkpoints.stream import _check_destination, staged

    output = Path(path).absolute()
    _check_destination(output, [Path(p) for p in inputs], force)
    tensors = tensor_names(adapter)
    with staged(output) as staging:
        staging.path.mkdir(parents=True)
        staging.writer = SafetensorsWriter(staging.path, [(n, np.shape(x), np.dtype(x.dtype))
                                                          for n, x in tensors.items()], max_shard_size=2 ** 62)
        for name, x in tensors.items():
            staging.writer.write(name, x)
        staging.writer.close()
        (staging.path / "model.safetensors").rename(staging.path / WEIGHTS_NAME)
        (staging.path / CONFIG_NAME).write_text(json.dumps(dict(adapter.config), indent=2, sort_keys=True) + "\n")
    return output
