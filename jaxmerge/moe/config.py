"""mergekit-moe's YAML config: a base model, experts with prompts, a gate mode, and jaxmerge's
optional ``non_expert_merge`` (MergeME: the experts' shared tensors merged by a method)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxmerge.cli.config import parse_dtype, read_yaml
from jaxmerge.cli.hub import resolve_model
from jaxmerge.errors import ConfigError

GATE_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random", "perplexity")
_TOP_LEVEL = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture",
              "non_expert_merge", "routing_texts"}
_EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}


@dataclasses.dataclass(frozen=True)
class Expert:
    """One dense model used as an expert in every layer.

    Attributes:
      source_model: its directory.
      positive_prompts: prompts that should be routed to it.
      negative_prompts: prompts that should not.
      noise_scale: standard deviation of Gaussian noise added to its MLP tensors.
      residual_scale: factor of its ``down_proj`` tensors.

    Examples:
      >>> from pathlib import Path
      >>> Expert(Path("math-model"), positive_prompts=("solve",)).negative_prompts
      ()
    """

    source_model: Path
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """A mixture-of-experts config (mergekit-moe's keys and defaults).

    Attributes:
      base_model: the model whose non-MLP tensors, tokenizer and config the output takes.
      experts: the routed experts.
      gate_mode: how routers are initialised: ``hidden`` (alias ``hidden_last``),
        ``hidden_avg``, ``cheap_embed``, ``random`` or ``uniform_random`` (mergekit-moe's),
        or ``perplexity`` (jaxmerge's, after MergeME: see :mod:`jaxmerge.moe.routers`).
      dtype: the output dtype (default: the base config's).
      experts_per_token: experts each token is routed to.
      shared_experts: experts every token goes through (Qwen2-MoE: exactly one).
      architecture: the output architecture's name or prefix (``mixtral``, ``qwen``,
        ``qwen3``); default: the first that supports the models, Mixtral first.
      non_expert_merge: ``{"method": name, "parameters": {...}}``: merge the experts'
        non-MLP tensors with this method around the base instead of copying the base's.
      text: the config file's text.
      routing_texts: for ``gate_mode: perplexity``, texts routed to the expert that models
        each best, besides the experts' positive prompts.

    Examples:
      >>> from pathlib import Path
      >>> MoeConfig(Path("base"), (Expert(Path("a")), Expert(Path("b")))).gate_mode
      'hidden'
    """

    base_model: Path
    experts: tuple[Expert, ...]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: tuple[Expert, ...] = ()
    architecture: str | None = None
    non_expert_merge: dict | None = None
    text: str = ""
    routing_texts: tuple[str, ...] = ()


def _prompts(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{where} must be a list of strings")
    return tuple(value)


def _scale(value, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    return float(value)


def _experts(entries, key: str, config: Path) -> tuple[Expert, ...]:
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise ConfigError(f"{config}: {key} must be a list of {{source_model: path, positive_prompts: [...]}}")
    experts = []
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict) or "source_model" not in entry:
            raise ConfigError(f"{config}: {where} must be a mapping with a source_model")
        if unknown := sorted(set(entry) - _EXPERT_KEYS):
            raise ConfigError(f"{config}: {where} has the unknown key {unknown[0]!r} (known: {sorted(_EXPERT_KEYS)})")
        experts.append(Expert(resolve_model(str(entry["source_model"]), config.parent, f"{where}.source_model"),
                              _prompts(entry.get("positive_prompts"), f"{where}.positive_prompts"),
                              _prompts(entry.get("negative_prompts"), f"{where}.negative_prompts"),
                              _scale(entry.get("noise_scale"), f"{where}.noise_scale"),
                              _scale(entry.get("residual_scale"), f"{where}.residual_scale")))
    return tuple(experts)


def load_moe_config(path: str | Path, *, allow_all_same: bool = False) -> MoeConfig:
    """Read and check a mergekit-moe config.

    Args:
      path: the YAML file.
      allow_all_same: accept experts that are all the same model (useful only before training).

    Returns:
      The :class:`MoeConfig`, model paths resolved (as given, else relative to the config, else
      a Hugging Face id in the local cache).

    Raises:
      ConfigError: one line naming the key at fault, including mergekit-moe's refusals: fewer
        experts than ``experts_per_token``, an expert without positive prompts (unless
        ``gate_mode`` is ``random``), the same prompts for every expert, the same model for
        every expert.

    Examples:
      >>> import pathlib, tempfile
      >>> tmp = pathlib.Path(tempfile.mkdtemp())
      >>> for name in ("base", "a", "b"):
      ...     (tmp / name).mkdir()
      >>> text = "{base_model: base, gate_mode: random, experts: [{source_model: a}, {source_model: b}]}"
      >>> _ = (tmp / "moe.yaml").write_text(text)
      >>> config = load_moe_config(tmp / "moe.yaml")
      >>> config.gate_mode, [e.source_model.name for e in config.experts], config.experts_per_token
      ('random', ['a', 'b'], 2)
    """
    path = Path(path)
    raw, text = read_yaml(path)
    if unknown := sorted(set(raw) - _TOP_LEVEL):
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (a mergekit-moe config has {sorted(_TOP_LEVEL)})")
    for key in ("base_model", "experts"):
        if raw.get(key) is None:
            raise ConfigError(f"{path}: {key} is required")
    gate_mode = str(raw.get("gate_mode", "hidden"))
    if gate_mode not in GATE_MODES:
        raise ConfigError(f"{path}: gate_mode must be one of {list(GATE_MODES)}, got {gate_mode!r}")
    per_token = raw.get("experts_per_token", 2)
    if isinstance(per_token, bool) or not isinstance(per_token, int) or per_token < 1:
        raise ConfigError(f"{path}: experts_per_token must be a whole number of at least 1, got {per_token!r}")
    merge = raw.get("non_expert_merge")
    if merge is not None and (not isinstance(merge, dict) or "method" not in merge
                              or not isinstance(merge.get("parameters", {}), dict)):
        raise ConfigError(f"{path}: non_expert_merge must be {{method: name, parameters: {{...}}}}")
    config = MoeConfig(resolve_model(str(raw["base_model"]), path.parent, "base_model"),
                       _experts(raw["experts"], "experts", path), gate_mode, parse_dtype(raw.get("dtype"), "dtype"),
                       per_token, _experts(raw.get("shared_experts"), "shared_experts", path),
                       None if raw.get("architecture") is None else str(raw["architecture"]), merge, text,
                       _texts(raw.get("routing_texts"), path))
    _check(config, path, allow_all_same)
    return config


def _texts(value, path: Path) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
        raise ConfigError(f"{path}: routing_texts must be a list of non-empty strings")
    return tuple(value)


def _check(config: MoeConfig, path: Path, allow_all_same: bool) -> None:
    """mergekit-moe's refusals of configs that cannot give a working model."""
    experts = config.experts
    if len(experts) < config.experts_per_token:
        raise ConfigError(f"{path}: {len(experts)} experts, fewer than experts_per_token ({config.experts_per_token})")
    if config.routing_texts and config.gate_mode != "perplexity":
        raise ConfigError(f"{path}: routing_texts are read by gate_mode perplexity only")
    if config.gate_mode == "random" or (config.gate_mode == "perplexity" and config.routing_texts):
        return
    for i, expert in enumerate(experts):
        if not expert.positive_prompts:
            raise ConfigError(f"{path}: experts[{i}] has no positive_prompts (gate_mode {config.gate_mode!r} "
                              "routes by prompts)")
    if len(experts) > 1 and len({(e.positive_prompts, e.negative_prompts) for e in experts}) == 1:
        raise ConfigError(f"{path}: every expert has the same prompts; each expert's positive_prompts should show "
                          "what is routed to it")
    if not allow_all_same and len(experts) > 1 and len({e.source_model.resolve() for e in experts}) == 1:
        raise ConfigError(f"{path}: every expert is the same model, which gives the dense model's output at a "
                          "higher cost; pass --i-understand-this-is-not-useful-without-training to build it anyway")
