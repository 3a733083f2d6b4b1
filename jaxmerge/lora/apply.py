"""Applying a LoRA adapter to its base model: ``W + weight * scaling * B @ A`` per adapted
module (PEFT's ``merge_and_unload``), in memory or streamed tensor by tensor between
checkpoints; ``weight=-1`` removes an applied adapter again.

Base tensors are named as in the Hugging Face checkpoint: module ``m``'s weight is
``m.weight``. Tensors the adapter saves in full replace the base's before its updates are
added, as PEFT loads them: modules trained in full (``modules_to_save``, under
``base_model.model.<name>``) and the tensors of adapted modules' base layers
(``<module>.base_layer.<name>``: biases trained with ``bias="all"`` or ``"lora_only"``, an
embedding saved with ``save_embedding_layers``).

Removing an adapter (``weight < 0``) gives an adapted module's saved base-layer weight back
as it is (the base the adapter was applied to); other tensors saved in full cannot be taken
out, and such an adapter is refused.

PEFT decides per layer, by its type, whether the weight is stored ``(in, out)`` (GPT-2's
``Conv1D``) and the update is transposed, whatever ``fan_in_fan_out`` the config holds
(PEFT saves the value its last layer set). Here the base decides: a layer named as
transformers names ``Conv1D`` layers (``c_attn``, ``c_proj``, ``c_fc``, ``q_attn``) in a
checkpoint whose ``config.json`` names a model with such layers (GPT-2, OpenAI GPT, ImageGPT,
Decision Transformer, CLVP) is one; else a layer's shape where it is not square; a square
layer with such a name as the non-square layers of those names are stored, where they agree
(GPTBigCode's are ``Linear``); else the config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxmerge.checkpoints.safetensors import read_config, set_config_dtype
from jaxmerge.checkpoints.stream import TIED_EMBEDDINGS
from jaxmerge.errors import CheckpointError, JaxmergeError
from jaxmerge.lora.adapter import PREFIX, Adapter, check_plain, load_adapter


def _updates(adapter: Adapter) -> tuple[dict[str, str], dict[str, jax.Array], set[str]]:
    """``({base tensor name: module}, {base tensor name: replacement}, {names of the
    replacements that are modules trained in full})`` of ``adapter``."""
    check_plain(adapter, "the adapter")
    modules = {f"{module}.weight": module for module in adapter.layers}
    replaced, trained = {}, set()
    for name, value in adapter.extras.items():
        if name.endswith(".lora_B.bias") or not name.startswith(PREFIX):
            raise JaxmergeError(f"the adapter's tensor {name!r} is neither a LoRA factor nor a module saved in full; "
                                "not supported")
        base_name = name.removeprefix(PREFIX).replace(".base_layer.", ".")
        replaced[base_name] = value
        if ".base_layer." not in name:
            trained.add(base_name)
    return modules, replaced, trained


_CONV1D_NAMES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})  # transformers' Conv1D layers (GPT-2 and its kin)
_CONV1D_MODELS = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})  # whose those are


def _stored_in_out(adapter: Adapter, shapes: Mapping[str, tuple], conv1d: bool = False) -> dict[str, bool]:
    """Per adapted linear module whose layout the base tells, whether it is stored ``(in, out)``
    (see the module's docstring): ``conv1d`` (the base is one of transformers' models with
    ``Conv1D`` layers), else its weight's shape in ``shapes``; the others follow the config."""
    decided, square = {}, []
    for module, layer in adapter.layers.items():
        if module in adapter.embeddings or layer.a.ndim != 2 or f"{module}.weight" not in shapes:
            continue
        out_in = (layer.b.shape[0], layer.a.shape[1])
        if conv1d and module.rsplit(".", 1)[-1] in _CONV1D_NAMES:
            decided[module] = True
        elif out_in[0] == out_in[1]:
            square.append(module)
        else:
            decided[module] = tuple(shapes[f"{module}.weight"]) == out_in[::-1]
    named = {v for m, v in decided.items() if m.rsplit(".", 1)[-1] in _CONV1D_NAMES}
    if len(named) == 1:
        decided.update({m: next(iter(named)) for m in square if m.rsplit(".", 1)[-1] in _CONV1D_NAMES})
    return decided


def _base_config(base: Path) -> dict | None:
    """The ``config.json`` of the model in ``base``, if it has a readable one."""
    try:
        values = read_config(base)
    except (CheckpointError, ValueError):
        return None
    return values if isinstance(values, dict) else None


@jax.jit
def _added(weight_tensor: jax.Array, delta: jax.Array, weight) -> jax.Array:
    return (weight_tensor.astype(jnp.float32) + weight * delta.astype(jnp.float32)).astype(weight_tensor.dtype)


class _AdapterUpdate:
    """A tensor's new value: the base's plus the module's update, the adapter's full copy, or
    the base's unchanged."""

    def __init__(self, adapter: Adapter, weight: float, model_type: str | None = None):
        self.adapter, self.weight = adapter, weight
        self.conv1d = model_type in _CONV1D_MODELS  # the base has transformers' Conv1D layers
        self.modules, self.replaced, self.trained = _updates(adapter)
        self.layouts: dict[str, bool] = {}
        self.shared: dict[str, str] = {}  # a tied input embedding -> the module of the head that shares it
        lasting = sorted(set(self.replaced) - set(self.modules))
        if weight < 0 and lasting:
            raise JaxmergeError(f"the adapter saves {lasting[0]!r} in full ({len(lasting)} such tensors): removing it "
                                "cannot give back the base's values")

    def __call__(self, name: str, tensor: jax.Array) -> jax.Array:
        if name in self.replaced:
            value = self.replaced[name]
            if value.shape != tensor.shape:
                raise JaxmergeError(f"the adapter saves {name!r} as {tuple(value.shape)}, the base holds "
                                    f"{tuple(tensor.shape)}")
            tensor = value.astype(tensor.dtype)
            if self.weight < 0:  # the saved base layer: the tensor the adapter was applied to
                return tensor
        for module in (self.modules.get(name), self.shared.get(name)):  # PEFT's order: the embedding, then the head
            if module is not None:
                tensor = self._updated(name, tensor, module)
        return tensor

    def _updated(self, name: str, tensor: jax.Array, module: str) -> jax.Array:
        delta = self.adapter.delta(module, self.layouts.get(module))
        if module in self.adapter.embeddings:  # PEFT rounds an embedding's update to the weight's dtype first
            delta = delta.astype(tensor.dtype)
        if delta.shape != tensor.shape:
            raise JaxmergeError(f"the adapter's update of {module!r} is {tuple(delta.shape)}, the base "
                                f"tensor {name!r} is {tuple(tensor.shape)}")
        return _added(tensor, delta, jnp.float32(self.weight))

    def tie(self, names: Iterable[str]) -> dict[str, str]:
        """Settle the output embeddings that the base ties to its input embedding (leaves out of
        ``names``, its tensors) and the adapter changes. As PEFT merges them: a LoRA update of
        the head is added to the shared weight (which the head's saved base layer replaces,
        PEFT loading it after the embedding's); a module trained in full in place of either
        unties them (unless the adapter was trained with ``ensure_weight_tying``: then the
        trained copy is the shared weight), and the heads returned (``{head: input
        embedding}``) are then to be written too, each from the input embedding's values as
        the base holds them."""
        present, changed = set(names), set(self.modules) | set(self.replaced)
        untied = {}
        for head, inputs in TIED_EMBEDDINGS.items():
            shared = next((t for t in inputs if t in present), None)
            if head in present or shared is None or head not in changed and shared not in self.trained:
                continue
            if {head, shared} & self.trained and self.adapter.config.get("ensure_weight_tying"):
                self.replaced[shared] = self.replaced[shared if shared in self.trained else head]  # still shared
                self.replaced.pop(head, None)
            elif {head, shared} & self.trained:
                untied[head] = shared
            elif head in self.modules:
                self.shared[shared] = self.modules[head]
                if head in self.replaced:  # its saved base layer, loaded after the embedding's
                    self.replaced[shared] = self.replaced[head]
        return untied

    def bind(self, shapes: Mapping[str, tuple]) -> None:
        """Check the base's tensors (``{name: shape}``) and read the layers' layouts from them."""
        sharing = {f"{m}.weight" for m in self.shared.values()}  # heads whose updates go to the shared weight
        absent = sorted((set(self.modules) | set(self.replaced)) - set(shapes) - sharing)
        if absent:
            raise JaxmergeError(f"the base model has no tensor {absent[0]!r}, which the adapter changes "
                                f"({len(absent)} missing)")
        self.layouts = _stored_in_out(self.adapter, shapes, self.conv1d)

    def leaf_fn(self, spec, statistics=None, model_names=None, positions=None):
        """The streaming driver's leaf function (see :class:`~jaxmerge.checkpoints.stream.Group`)."""
        names = [key[0] for key in spec.keys]
        self.bind({name: tuple(leaf.shape) for name, leaf in zip(names, spec.leaves)})
        return lambda i, base, leaves: self(names[i], leaves[0])


def merge_adapter(params: Mapping[str, jax.Array], adapter: Adapter, *, weight: float = 1.0,
                  model_type: str | None = None) -> dict[str, jax.Array]:
    """The base model with ``adapter`` applied: ``W + weight * scaling * B @ A`` per module.

    Args:
      params: the base model's tensors by Hugging Face name (``{name: array}``, as
        :func:`jaxmerge.checkpoints.load` reads a safetensors checkpoint).
      adapter: the adapter (:func:`~jaxmerge.lora.load_adapter`).
      weight: the adapter's weight; ``-1`` removes it from a model it was applied to.
      model_type: the ``model_type`` of the base's ``config.json`` (``"gpt2"``): which of its
        layers are ``Conv1D`` (see the module's docstring).

    Returns:
      A new dict of the same tensors, each in its dtype (sums taken in float32), plus the
      head of tied embeddings that the adapter unties (see :meth:`_AdapterUpdate.tie`; the
      model's config then says ``tie_word_embeddings: false``).

    Raises:
      JaxmergeError: a tensor the adapter changes is missing or of another shape (naming
        it), the adapter is DoRA or trains biases, or ``weight < 0`` and it saves tensors in
        full other than its modules' base layers.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxmerge import lora
      >>> layer = lora.LoraLayer(a=jnp.ones((1, 2)), b=jnp.ones((2, 1)))
      >>> adapter = lora.Adapter({"q": layer}, lora.lora_config(1, 2, ["q"]))
      >>> merged = lora.merge_adapter({"q.weight": jnp.zeros((2, 2))}, adapter)
      >>> merged["q.weight"].tolist(), lora.merge_adapter(merged, adapter, weight=-1)["q.weight"].tolist()
      ([[2.0, 2.0], [2.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]])
    """
    update = _AdapterUpdate(adapter, weight, model_type)
    params = {**params, **{head: params[shared] for head, shared in update.tie(params).items()}}
    update.bind({name: tuple(tensor.shape) for name, tensor in params.items()})
    return {name: update(name, tensor) for name, tensor in params.items()}


def apply_adapter(base: str | os.PathLike, adapter: str | os.PathLike | Adapter, output: str | os.PathLike, *,
                  weight: float = 1.0, options=None) -> Path:
    """Write ``base`` with ``adapter`` applied to ``output``, one tensor at a time.

    The output is built like a merge's (:func:`jaxmerge.checkpoints.stream_merge`): in a
    staging directory renamed into place when complete, the base's config and tokenizer
    files copied, refused if it would overlap an input.

    Args:
      base: the base checkpoint (safetensors or Orbax, Hugging Face tensor names).
      adapter: a PEFT adapter directory, or an :class:`~jaxmerge.lora.Adapter`.
      output: the directory to create.
      weight: the adapter's weight (``-1`` removes it).
      options: a :class:`~jaxmerge.checkpoints.StreamOptions` (dtypes, shard size, force).

    Returns:
      The output path.

    Examples:
      >>> import tempfile, pathlib, jax.numpy as jnp
      >>> from jaxmerge import checkpoints, lora
      >>> from jaxmerge.checkpoints import StreamOptions
      >>> tmp = pathlib.Path(tempfile.mkdtemp())
      >>> base = checkpoints.save(tmp / "base", {"q.weight": jnp.zeros((2, 2))}, format="safetensors")
      >>> adapter = lora.Adapter({"q": lora.LoraLayer(jnp.ones((1, 2)), jnp.ones((2, 1)))}, lora.lora_config(1, 1, "q"))
      >>> out = lora.apply_adapter(base, adapter, tmp / "out", options=StreamOptions(progress=False))
      >>> checkpoints.load(out)["q.weight"].tolist()
      [[1.0, 1.0], [1.0, 1.0]]
    """
    from jaxmerge.checkpoints.stream import Group, StreamOptions, open_checkpoint, stream_groups

    read = []
    if not isinstance(adapter, Adapter):
        read = [Path(adapter, name).resolve() for name in ("adapter_config.json", "adapter_model.safetensors")]
        adapter = load_adapter(adapter)
    values = _base_config(Path(base))
    update = _AdapterUpdate(adapter, weight, (values or {}).get("model_type"))
    names = open_checkpoint(base).names
    heads = list(update.tie(names))
    options = options or StreamOptions()
    config = _config(values, untied=bool(heads), dtype=options.out_dtype or options.dtype)
    group = Group(update, (base,), outputs=[*names, *heads] if heads else None)
    return stream_groups([group], output, options=options, inputs=read,
                         extra_files={} if config is None else {"config.json": config})


def _config(values: dict | None, untied: bool, dtype) -> str | None:
    """The base's ``config.json`` (``values``) as PEFT saves the merged model's, where it
    changes: its embeddings untied (a module trained in full replaced one of them), its
    ``torch_dtype`` the one the tensors are written in; None where nothing changes or there is
    no config."""
    if values is None or not (untied or dtype is not None):
        return None
    config = dict(values)
    if untied:
        config["tie_word_embeddings"] = False
    if dtype is not None:
        set_config_dtype(config, jnp.dtype(dtype).name)
    return json.dumps(config, indent=2) + "\n"
