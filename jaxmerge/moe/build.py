"""A mixture of experts from dense models: the base's non-MLP tensors (or, MergeME-style, the
experts' merged around it), each expert's MLP as one expert, and the routers.

Every output tensor is an :class:`Output`: the input tensors it reads and a function of them,
so the same plan builds the mixture in memory (:func:`moe_from_dense`) and streams it between
checkpoints, one output tensor at a time (:func:`build_moe`, ``jaxmerge moe``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxmerge.errors import JaxmergeError
from jaxmerge.moe.layouts import LAYOUTS, PROJECTIONS, Layout

BASE, SHARED = "base", "shared"  # model keys besides the experts' indices


@dataclasses.dataclass(frozen=True)
class ExpertScaling:
    """mergekit-moe's per-expert options: Gaussian noise of standard deviation ``noise_scale``
    added to each MLP tensor, and ``residual_scale`` multiplying ``down_proj``.

    Examples:
      >>> ExpertScaling(residual_scale=0.5).noise_scale is None
      True
    """

    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclasses.dataclass(frozen=True)
class Output:
    """One output tensor: ``combine(*arrays)`` of the ``inputs`` (``(model, tensor name)``,
    model ``'base'``, an expert's index or ``'shared'``).

    Examples:
      >>> import jax.numpy as jnp
      >>> out = Output("model.norm.weight", (("base", "model.norm.weight"),), lambda t: t)
      >>> out.combine(jnp.ones(2)).tolist()
      [1.0, 1.0]
    """

    name: str
    inputs: tuple[tuple, ...]
    combine: Callable[..., jax.Array]


def _expert_tensor(scaling: ExpertScaling, key: jax.Array, residual: bool) -> Callable[[jax.Array], jax.Array]:
    def transform(tensor):
        if scaling.noise_scale is not None:
            noise = scaling.noise_scale * jax.random.normal(key, tensor.shape, jnp.float32)
            tensor = (tensor.astype(jnp.float32) + noise).astype(tensor.dtype)
        if residual and scaling.residual_scale is not None:
            tensor = (tensor.astype(jnp.float32) * scaling.residual_scale).astype(tensor.dtype)
        return tensor
    return transform


def plan_moe(layout: Layout, source_config: Mapping, available: Callable[[str], bool], scalings: Sequence[ExpertScaling],
             routers: jax.Array, *, shared: ExpertScaling | None = None, shared_routers: jax.Array | None = None,
             key: jax.Array | None = None,
             dense_merge: Callable[[jax.Array, list[jax.Array]], jax.Array] | None = None) -> list[Output]:
    """Every output tensor of the mixture.

    Args:
      layout: the output architecture (:data:`~jaxmerge.moe.layouts.LAYOUTS`).
      source_config: the base's ``config.json``.
      available: whether the base holds a tensor.
      scalings: per expert, its noise and residual scale.
      routers: ``(layers, experts, hidden)``.
      shared: the shared expert's scaling (layouts with a shared expert).
      shared_routers: ``(layers, 1, hidden)``, the shared expert's gate.
      key: the key of the experts' noise (needed with a ``noise_scale``).
      dense_merge: ``dense_merge(base, experts) -> tensor`` for the non-MLP tensors (default:
        the base's).

    Returns:
      The outputs, in mergekit-moe's order.

    Raises:
      JaxmergeError: routers of the wrong shape, a required base tensor missing, or noise
        without a key.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge.moe import LAYOUTS
      >>> config = {"model_type": "llama", "hidden_size": 2, "num_attention_heads": 1, "num_hidden_layers": 1}
      >>> outputs = plan_moe(LAYOUTS[0], config, lambda name: True, [ExpertScaling()] * 2, jnp.zeros((1, 2, 2)))
      >>> [o.name for o in outputs][-3:]
      ['model.layers.0.mlp.experts.gate_up_proj', 'model.layers.0.mlp.experts.down_proj', 'model.layers.0.mlp.gate.weight']
    """
    layers, count = source_config["num_hidden_layers"], len(scalings)
    if routers.shape[:2] != (layers, count):
        raise JaxmergeError(f"routers have shape {routers.shape}; expected ({layers}, {count}, hidden)")
    outputs = [_dense(layout, source_config, name, optional, available, count, dense_merge)
               for name, optional in layout.dense_names(source_config.get("model_type", "llama"), layers)]
    outputs = [o for o in outputs if o is not None]

    def expert_input(model, scaling, layer, projection):
        name = f"model.layers.{layer}.mlp.{projection}.weight"
        number = count if model == SHARED else model
        noise_key = None if key is None else jax.random.fold_in(
            jax.random.fold_in(jax.random.fold_in(key, number), layer), PROJECTIONS.index(projection))
        if scaling.noise_scale is not None and noise_key is None:
            raise JaxmergeError("an expert's noise_scale needs a key")
        return (model, name), _expert_tensor(scaling, noise_key, projection == "down_proj")

    for layer in range(layers):
        prefix = f"model.layers.{layer}.mlp"
        if layout.stacked:
            for projections, out in ((("gate_proj", "up_proj"), "gate_up_proj"), (("down_proj",), "down_proj")):
                parts = [expert_input(e, s, layer, p) for e, s in enumerate(scalings) for p in projections]
                outputs.append(Output(f"{prefix}.experts.{out}", tuple(i for i, _ in parts),
                                      _stacker([f for _, f in parts], len(projections))))
        else:
            members = [(e, s, f"experts.{e}") for e, s in enumerate(scalings)] + [(SHARED, shared, "shared_expert")]
            for model, scaling, module in members:
                for projection in PROJECTIONS:
                    (source, transform) = expert_input(model, scaling, layer, projection)
                    outputs.append(Output(f"{prefix}.{module}.{projection}.weight", (source,), transform))
    outputs += [Output(f"model.layers.{i}.mlp.gate.weight", (), lambda r=routers[i]: r) for i in range(layers)]
    if layout.shared:
        outputs += [Output(f"model.layers.{i}.mlp.shared_expert_gate.weight", (), lambda r=shared_routers[i]: r)
                    for i in range(layers)]
    return outputs


def _stacker(transforms: list[Callable], per_expert: int) -> Callable[..., jax.Array]:
    """Stack the experts' tensors, each expert's ``per_expert`` tensors concatenated by rows."""
    def combine(*tensors):
        done = [t(x) for t, x in zip(transforms, tensors)]
        return jnp.stack([jnp.concatenate(done[i:i + per_expert]) for i in range(0, len(done), per_expert)])
    return combine


def _dense(layout: Layout, config: Mapping, name: str, optional: bool, available: Callable[[str], bool], count: int,
           dense_merge) -> Output | None:
    """A non-MLP tensor: the base's (or merged), zeros for an attention bias the base lacks,
    None for a missing optional one."""
    if not available(name):
        if name.endswith("_proj.bias"):
            heads = config["num_attention_heads"]
            kv = name.endswith(("k_proj.bias", "v_proj.bias"))
            size = (config.get("num_key_value_heads") or heads if kv else heads) * (config["hidden_size"] // heads)
            return Output(name, (), lambda: jnp.zeros(size, jnp.float32))
        if optional:
            return None
        raise JaxmergeError(f"the base model has no tensor {name!r}, which a {layout.name} model needs")
    if dense_merge is None:
        return Output(name, ((BASE, name),), lambda tensor: tensor)
    return Output(name, ((BASE, name), *((e, name) for e in range(count))), lambda base, *experts: dense_merge(base, list(experts)))


def moe_from_dense(base: Mapping[str, jax.Array], experts: Sequence[Mapping[str, jax.Array]], routers: jax.Array, *,
                   config: Mapping, layout: str | Layout = "mixtral", experts_per_token: int = 2,
                   shared: Mapping[str, jax.Array] | None = None, shared_routers: jax.Array | None = None,
                   scalings: Sequence[ExpertScaling] | None = None, key: jax.Array | None = None,
                   dense_merge: Callable | None = None, dtype: str | None = None) -> tuple[dict, dict]:
    """A mixture of experts built in memory from dense models' tensors (Hugging Face names).

    Args:
      base: the base model's tensors (non-MLP tensors, unless ``dense_merge``).
      experts: each expert's tensors (its MLPs become one expert per layer).
      routers: ``(layers, experts, hidden)`` router rows (:func:`~jaxmerge.moe.gate_vectors`).
      config: the base's ``config.json``.
      layout: ``'mixtral'``, ``'qwen2_moe'``, ``'qwen3_moe'`` or a :class:`Layout`.
      experts_per_token: experts each token is routed to.
      shared: the shared expert's tensors (``qwen2_moe``).
      shared_routers: ``(layers, 1, hidden)``, the shared expert's gate (``qwen2_moe``).
      scalings: per expert, its noise and residual scale (default: none).
      key: the key of the experts' noise.
      dense_merge: ``dense_merge(base, experts) -> tensor`` merging each non-MLP tensor
        (MergeME; e.g. ``lambda b, e: jaxmerge.ties(b, e, density=0.5)``).
      dtype: the dtype of every output tensor (default: as stored; routers float32).

    Returns:
      ``(tensors, config)``: the mixture's tensors and its ``config.json``.

    Examples:
      >>> import jax.numpy as jnp
      >>> config = {"model_type": "llama", "hidden_size": 2, "intermediate_size": 3, "num_attention_heads": 1,
      ...           "num_hidden_layers": 1}
      >>> dense = {"model.embed_tokens.weight": jnp.ones((5, 2)), "model.norm.weight": jnp.ones(2),
      ...          "model.layers.0.input_layernorm.weight": jnp.ones(2),
      ...          "model.layers.0.post_attention_layernorm.weight": jnp.ones(2),
      ...          **{f"model.layers.0.self_attn.{p}_proj.weight": jnp.eye(2) for p in "qkvo"},
      ...          "model.layers.0.mlp.gate_proj.weight": jnp.ones((3, 2)),
      ...          "model.layers.0.mlp.up_proj.weight": jnp.ones((3, 2)),
      ...          "model.layers.0.mlp.down_proj.weight": jnp.ones((2, 3))}
      >>> tensors, moe_config = moe_from_dense(dense, [dense, dense], jnp.zeros((1, 2, 2)), config=config)
      >>> tensors["model.layers.0.mlp.experts.gate_up_proj"].shape, moe_config["num_local_experts"]
      ((2, 6, 2), 2)
    """
    chosen = layout if isinstance(layout, Layout) else next((la for la in LAYOUTS if la.model_type == layout), None)
    if chosen is None:
        raise JaxmergeError(f"layout must be one of {[la.model_type for la in LAYOUTS]}, got {layout!r}")
    models = {BASE: base, SHARED: shared or {}, **dict(enumerate(experts))}
    scalings = scalings or [ExpertScaling()] * len(experts)
    outputs = plan_moe(chosen, config, base.__contains__, scalings, routers, shared=ExpertScaling(),
                       shared_routers=shared_routers, key=key, dense_merge=dense_merge)
    tensors = {}
    for out in outputs:
        try:
            value = out.combine(*(models[model][name] for model, name in out.inputs))
        except KeyError as missing:
            raise JaxmergeError(f"{out.name!r} needs the tensor {missing.args[0]!r}, which a model lacks") from None
        tensors[out.name] = value if dtype is None else value.astype(dtype)
    return tensors, chosen.config(config, len(experts), experts_per_token, dtype)
