"""``jaxmerge moe``: a mergekit-moe config built into a mixture-of-experts checkpoint, streamed
tensor by tensor with a merge's safety rules (staged, atomic, inputs never overwritten)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.checkpoints.safetensors import read_config
from jaxmerge.cli.config import DTYPES
from jaxmerge.errors import JaxmergeError
from jaxmerge.moe.build import BASE, SHARED, ExpertScaling, plan_moe
from jaxmerge.moe.config import MoeConfig
from jaxmerge.moe.layouts import select_layout
from jaxmerge.moe.routers import PromptTokenizer, gate_vectors, perplexity_prompts, prompt_embedder, text_losses


def _routers(config: MoeConfig, base_config: dict, readers: dict,
             key: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """``(routers, shared_routers)`` of the config's gate mode (mergekit-moe's rules: shared
    experts get a gate when they have prompts, or in the random modes)."""
    gated = list(config.experts)
    shared_prompts = [bool(e.positive_prompts) for e in config.shared_experts]
    if len(set(shared_prompts)) > 1:
        raise JaxmergeError("give prompts to every shared expert or to none")
    if any(shared_prompts) or config.gate_mode in ("random", "uniform_random"):
        gated += config.shared_experts
    prompts = [(e.positive_prompts, e.negative_prompts) for e in gated]
    mode, embed = config.gate_mode, None
    if mode not in ("random", "uniform_random"):
        reader, tokenizer = readers[BASE], PromptTokenizer(config.base_model)
        needed = ["model.embed_tokens.weight"] if mode == "cheap_embed" else reader.names
        params = {name: reader.read(name).astype(jnp.float32) for name in needed}
        if mode == "perplexity":
            prompts[:len(config.experts)] = _perplexity_prompts(config, base_config, readers, tokenizer)
            mode = "hidden"
        embed = prompt_embedder(mode, tokenizer, params, base_config)
    gates = gate_vectors(mode, prompts, layers=base_config["num_hidden_layers"], hidden=base_config["hidden_size"],
                         key=key, embed=embed)
    if config.gate_mode.startswith("hidden") and _out_dtype(config, base_config) is None:
        gates = gates.astype(jnp.bfloat16)  # the dtype mergekit-moe runs the model in, which its routers keep
    count = len(config.experts)
    return gates[:, :count], (gates[:, count:] if gates.shape[1] > count else None)


def _perplexity_prompts(config: MoeConfig, base_config: dict, readers: dict, tokenizer) -> list:
    """The routed experts' prompts for ``gate_mode: perplexity``: the routing texts each
    expert's dense model gives the lowest perplexity (see :mod:`jaxmerge.moe.routers`)."""
    texts = list(dict.fromkeys([*config.routing_texts, *(p for e in config.experts for p in e.positive_prompts)]))
    ids, mask = tokenizer(texts)
    losses = []
    for e in range(len(config.experts)):  # one expert's tensors in memory at a time
        reader = readers[e]
        params = {name: reader.read(name).astype(jnp.float32) for name in reader.names}
        losses.append(np.asarray(text_losses(params, base_config, ids, mask)))
        del params
    return perplexity_prompts(np.stack(losses), texts, [e.positive_prompts for e in config.experts])


def _dense_merge(spec: dict | None, seed: int):
    """MergeME: ``non_expert_merge``'s method as ``merge(base, experts) -> tensor``."""
    if spec is None:
        return None
    from jaxmerge.merging.method import method

    record = method(str(spec["method"]))
    names = {p.key: p.name for p in record.params if p.key is not None}
    kwargs = {}
    for key, value in (spec.get("parameters") or {}).items():
        if key not in names:
            raise JaxmergeError(f"non_expert_merge: {record.name} has no parameter {key!r} (it has {sorted(names)})")
        kwargs[names[key]] = value
    if "key" in inspect.signature(record.function).parameters:
        kwargs["key"] = jax.random.key(seed)

    if record.statistics is not None:
        raise JaxmergeError(f"non_expert_merge: {record.name} needs statistics per model; choose a method without")

    def merge(base, experts):
        arguments = dict(kwargs)
        if arguments.get("weights") is not None and not isinstance(arguments["weights"], list):
            arguments["weights"] = [arguments["weights"]] * len(experts)  # one weight for every expert
        return record.merge(experts, base=None if record.base in ("none", "pair") else base, **arguments)
    return merge


def _out_dtype(config: MoeConfig, base_config: dict) -> str | None:
    """The config's ``dtype``, else the base config's (``torch_dtype`` or ``dtype``)."""
    return config.dtype or DTYPES.get(str(base_config.get("torch_dtype") or base_config.get("dtype")))


def build_moe(config: MoeConfig, output: str | Path, *, seed: int = 0, options=None, inputs=()) -> Path:
    """Write the mixture of experts ``config`` describes (see :mod:`jaxmerge.moe`).

    Args:
      config: a :class:`~jaxmerge.moe.MoeConfig` (:func:`~jaxmerge.moe.load_moe_config`).
      output: the directory to create.
      seed: the seed of random routers, experts' noise and random merges.
      options: a :class:`~jaxmerge.checkpoints.StreamOptions` (``force``, shard size, progress).
      inputs: other files read (the config file), which the output must not hold.

    Returns:
      The output path.

    Raises:
      JaxmergeError: no output architecture takes the models (each reason given), a tensor is
        missing (named with its model), or the prompts cannot be read.

    Examples:
      >>> import json, pathlib, tempfile, jax
      >>> from jaxmerge import checkpoints
      >>> from jaxmerge.checkpoints import StreamOptions
      >>> from jaxmerge.moe import load_moe_config
      >>> from jaxmerge.moe.transformer import random_params
      >>> tmp = pathlib.Path(tempfile.mkdtemp())
      >>> config = {"model_type": "llama", "hidden_size": 4, "intermediate_size": 8, "num_attention_heads": 2,
      ...           "num_hidden_layers": 1, "vocab_size": 6}
      >>> for i, name in enumerate(["base", "a", "b"]):
      ...     path = checkpoints.save(tmp / name, random_params(config, jax.random.key(i)), format="safetensors")
      ...     _ = (path / "config.json").write_text(json.dumps(config))
      >>> text = "{base_model: base, gate_mode: random, experts: [{source_model: a}, {source_model: b}]}"
      >>> _ = (tmp / "moe.yaml").write_text(text)
      >>> out = build_moe(load_moe_config(tmp / "moe.yaml"), tmp / "moe", options=StreamOptions(progress=False))
      >>> checkpoints.load(out)["model.layers.0.mlp.experts.gate_up_proj"].shape
      (2, 16, 4)
    """
    from jaxmerge.checkpoints.stream import StreamOptions, open_checkpoint, stream_tensors

    options = options or StreamOptions()
    base_config = read_config(config.base_model)
    models = {BASE: config.base_model, **dict(enumerate(e.source_model for e in config.experts))}
    if config.shared_experts:
        models[SHARED] = config.shared_experts[0].source_model
    model_types = [read_config(m).get("model_type") for m in (config.base_model, *(e.source_model for e in
                                                                                   config.experts + config.shared_experts))]
    layout = select_layout(config.architecture, model_types, len(config.shared_experts),
                           any(e.positive_prompts for e in config.shared_experts), config.gate_mode,
                           any(e.negative_prompts for e in config.shared_experts))
    opened = {}  # one reader per directory (a shared expert may be the base or an expert), the base's first
    for path in models.values():
        if Path(path).resolve() not in opened:
            opened[Path(path).resolve()] = open_checkpoint(path)
    readers = {model: opened[Path(path).resolve()] for model, path in models.items()}
    key = jax.random.key(seed)
    routers, shared_routers = _routers(config, base_config, readers, jax.random.fold_in(key, 0))
    scale = lambda e: ExpertScaling(e.noise_scale, e.residual_scale)
    outputs = plan_moe(layout, base_config, set(readers[BASE].names).__contains__, [scale(e) for e in config.experts],
                       routers, shared=scale(config.shared_experts[0]) if config.shared_experts else None,
                       shared_routers=shared_routers, key=jax.random.fold_in(key, 1),
                       dense_merge=_dense_merge(config.non_expert_merge, seed))
    out_dtype = _out_dtype(config, base_config)

    def abstract(model, name):
        if name not in readers[model].names:
            raise JaxmergeError(f"{models[model]} has no tensor {name!r}, which the mixture needs")
        shape, dtype = readers[model].shape_dtype(name)
        return jax.ShapeDtypeStruct(shape, dtype)

    planned = {}
    for out in outputs:
        shape = jax.eval_shape(out.combine, *(abstract(m, n) for m, n in out.inputs))
        planned[out.name] = (out, shape.shape, np.dtype(out_dtype or shape.dtype))

    def tensor(name):
        out = planned[name][0]
        return out.combine(*(readers[m].read(n) for m, n in out.inputs))

    layout_config = layout.config(base_config, len(config.experts), config.experts_per_token, out_dtype)
    extra = {"config.json": json.dumps(layout_config, indent=2, sort_keys=True) + "\n",
             "mergekit_moe_config.yml": config.text}
    return stream_tensors([(n, s, d) for n, (_, s, d) in planned.items()], tensor, output,
                          readers=list(opened.values()), options=options, extra_files=extra,
                          inputs=inputs)
