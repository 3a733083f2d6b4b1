"""The ``jaxmerge`` command: ``merge`` a YAML config into a checkpoint, ``inspect`` a checkpoint,
``extract-lora``, ``merge-adapters`` and ``apply-adapter`` for LoRA adapters, ``moe`` to build
a mixture of experts from a mergekit-moe config, ``align`` a Llama-family model's units to
another's."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Sequence

from jaxmerge import _signals
from jaxmerge.errors import ConfigError, JaxmergeWarning

MERGE_EXAMPLE = """\
example config (mergekit's format):

  merge_method: ties
  base_model: ./llama-base
  models:
    - model: ./llama-math
      parameters: {weight: 1.0, density: 0.5}
    - model: ./llama-code
      parameters:
        weight: [0.2, 0.8]                  # a gradient over the layers
        density: [{filter: self_attn, value: 0.3}, {value: 0.6}]
  parameters: {normalize: true, lambda: 1.0}
  dtype: float32                            # inputs cast to this before merging
  out_dtype: bfloat16                       # written tensors

`jaxmerge methods` lists every merge_method with its parameters, defaults and ranges.

Models are local directories of Hugging Face safetensors (model.safetensors, or shards
with model.safetensors.index.json) or Orbax checkpoints. The output is written to a
temporary directory and renamed into place when complete; the base (or first) model's
config.json, tokenizer and other non-weight files are copied into it, with the config
as jaxmerge_config.yml. tokenizer_source: union (or base, or a model) merges the
vocabularies and moves the embedding and head rows onto the merged one.
"""


# mergekit-yaml's options that change nothing here (devices, threads, caches, its loader and writer)
_MERGEKIT_NO_EFFECT = ("--allow-crimes", "--no-allow-crimes", "--trust-remote-code", "--no-trust-remote-code",
                       "--cuda", "--no-cuda", "--low-cpu-memory", "--no-low-cpu-memory", "--lazy-unpickle",
                       "--no-lazy-unpickle", "--read-to-gpu", "--no-read-to-gpu", "--multi-gpu", "--no-multi-gpu",
                       "--gpu-rich", "--async-write", "--no-async-write", "--clone-tensors", "--no-clone-tensors",
                       "--copy-tokenizer", "--write-model-card", "--safe-serialization", "--no-quiet")
_MERGEKIT_NO_EFFECT_VALUES = (("--device",), ("-j", "--num-threads"), ("--write-threads",), ("--transformers-cache",),
                              ("--lora-merge-cache",), ("--lora-merge-dtype",), ("--out-shard-size",))


_MERGEKIT_ACTING = {"--quiet": "hides the progress bar", "--no-copy-tokenizer": "leaves the tokenizer files out",
                    "--no-write-model-card": "leaves the model card (README.md) out"}


def _mergekit_options(parser: argparse.ArgumentParser, tool: str, acting: tuple = (), no_effect: tuple = (),
                      own: tuple = ()) -> None:
    """``tool``'s options (mergekit's shared ones, plus ``no_effect``), so that its command
    lines run unchanged: those in ``acting`` (of ``_MERGEKIT_ACTING``) act, those with a value
    in ``own`` are the command's own options, the others are noted on stderr as changing
    nothing (see :func:`_note_no_effect`)."""
    flags = (*_MERGEKIT_NO_EFFECT, *(f for f in _MERGEKIT_ACTING if f not in acting), *no_effect)
    valued = [f for f in _MERGEKIT_NO_EFFECT_VALUES if f[-1] not in own]
    group = parser.add_argument_group(
        f"{tool}'s options", f"accepted so that {tool} command lines run unchanged: "
        + "".join(f"{f} {_MERGEKIT_ACTING[f]}; " for f in acting)
        + f"{', '.join(flags)} and {', '.join(f[-1] for f in valued)} VALUE change nothing")
    for flag in acting:
        group.add_argument(flag, action="store_true", help=argparse.SUPPRESS,
                           **({"dest": "no_progress"} if flag == "--quiet" else {}))
    for flag in flags:
        group.add_argument(flag, action="append_const", const=flag, dest="no_effect", default=[],
                           help=argparse.SUPPRESS)
    for flags in valued:
        group.add_argument(*flags, action="append", dest="no_effect", type=lambda v, f=flags[-1]: f"{f} {v}",
                           help=argparse.SUPPRESS)


_ADAPTER_OPTIONS = ("--lora-merge-cache", "--lora-merge-dtype")


def _adapter_options(parser: argparse.ArgumentParser) -> None:
    """mergekit's options for models named with a LoRA adapter (``model+adapter``)."""
    parser.add_argument("--lora-merge-cache", metavar="DIR",
                        help="where models named with a LoRA adapter (model+adapter) are applied and kept, reused "
                             "when there (default: a temporary directory beside the output, removed after)")
    parser.add_argument("--lora-merge-dtype", type=_dtype,
                        help="apply adapters to models read in this dtype (default: the dtype of a model's first "
                             "float tensor, as transformers loads it for mergekit)")


@contextlib.contextmanager
def _adapted_models(args, output: str):
    """The command's models named with an adapter (:class:`~jaxmerge.cli.adapted.AdaptedModels`),
    applied in ``--lora-merge-cache``, else in a temporary directory beside ``output`` removed
    on the way out; none in a run of several processes."""
    from pathlib import Path

    import jax

    from jaxmerge.checkpoints.stream import staging_path
    from jaxmerge.cli.adapted import AdaptedModels

    single = jax.process_count() == 1
    temporary = staging_path(Path(output).absolute()) if single and not args.lora_merge_cache else None
    try:
        yield AdaptedModels(temporary or (Path(args.lora_merge_cache) if single else None), args.lora_merge_dtype,
                            progress=not getattr(args, "no_progress", False))
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def _note_no_effect(args) -> None:
    if args.no_effect:
        print(f"jaxmerge: note: {', '.join(args.no_effect)} change nothing here", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxmerge", description="Merge model checkpoints with JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="merge the checkpoints a YAML config names",
                                description="Merge the checkpoints a mergekit-style YAML config names, tensor by "
                                            "tensor, into OUTPUT_DIR.",
                                epilog=MERGE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    merge.add_argument("config", metavar="CONFIG.yaml", help="the merge config")
    merge.add_argument("output", metavar="OUTPUT_DIR", help="the directory to create")
    merge.add_argument("--force", action="store_true", help="replace OUTPUT_DIR if it exists and is not empty")
    merge.add_argument("--random-seed", type=_seed, default=0,
                       help="seed of the random methods (DARE, DELLA), 0 to 2**63 - 1; default 0")
    merge.add_argument("--max-shard-size", default="5GB", type=_size,
                       help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    merge.add_argument("--output-format", choices=("safetensors", "orbax"),
                       help="default: the format of the base (or first) model")
    merge.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    merge.add_argument("--mesh", metavar="AXIS=SIZE,...",
                       help="merge on a device mesh, e.g. data=4,model=2 (sizes multiply to the device count): "
                            "each tensor's largest axes are sharded over the mesh axes in order")
    merge.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() first (TPU pods, SLURM, or JAX_COORDINATOR_ADDRESS "
                            "etc.); every process runs the same command and the output is an Orbax checkpoint")
    merge.add_argument("-v", "--verbose", action="store_true", help="print a line per merged tensor on stderr")
    merge.add_argument("--no-compilation-cache", action="store_true",
                       help="do not keep compiled kernels on disk for later runs (default: kept in "
                            "$JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/jaxmerge/xla or ~/.cache/jaxmerge/xla; "
                            "also off when JAXMERGE_NO_COMPILATION_CACHE=1)")
    _adapter_options(merge)
    _mergekit_options(merge, "mergekit-yaml", acting=tuple(_MERGEKIT_ACTING), own=_ADAPTER_OPTIONS)
    inspect = commands.add_parser("inspect", help="list a checkpoint's tensors",
                                  description="List the tensors of a checkpoint (safetensors file or directory, "
                                              "or Orbax directory) with shapes and dtypes, and the totals.")
    inspect.add_argument("path", help="the checkpoint")
    listing = commands.add_parser("methods", help="list the merge methods and their parameters",
                                  description="List every merge method a config may name, with its parameters "
                                              "(defaults, ranges, per-model or global) and references.")
    listing.add_argument("method", nargs="?", help="show only this method")
    _lora_parsers(commands)
    _moe_parser(commands)
    _align_parser(commands)
    return parser


def _lora_parsers(commands) -> None:
    extract = commands.add_parser("extract-lora", help="extract a LoRA adapter from a fine-tuned model",
                                  description="Extract a PEFT LoRA adapter from a fine-tuned model and its base by "
                                              "truncated SVD of each linear layer's update (as mergekit-extract-lora).")
    extract.add_argument("--model", required=True, help="the fine-tuned model")
    extract.add_argument("--base-model", required=True, help="its base model")
    extract.add_argument("--out-path", required=True, help="the adapter directory to create")
    extract.add_argument("--max-rank", type=_positive_int, default=128, help="largest rank of a layer (default 128)")
    extract.add_argument("--sv-epsilon", type=float, default=0.0,
                         help="keep only singular values above this (default 0: up to --max-rank)")
    extract.add_argument("--no-distribute-scale", action="store_true",
                         help="put the singular values into lora_A alone (default: sqrt into both factors)")
    extract.add_argument("--embed-lora", action="store_true",
                         help="extract the embeddings as LoRA too (default: saved in full)")
    extract.add_argument("-i", "--include-regex", action="append", default=[], help="only modules matching this")
    extract.add_argument("-e", "--exclude-regex", action="append", default=[], help="skip modules matching this")
    extract.add_argument("--force", action="store_true", help="replace the output if it exists and is not empty")
    extract.add_argument("-v", "--verbose", action="store_true", help="print each module's rank and retained energy")
    _adapter_options(extract)
    _mergekit_options(extract, "mergekit-extract-lora", acting=("--quiet",),
                      no_effect=("--distribute-scale", "--no-embed-lora"), own=_ADAPTER_OPTIONS)
    combine = commands.add_parser("merge-adapters", help="merge LoRA adapters into one (PEFT's add_weighted_adapter)",
                                  description="Merge PEFT LoRA adapters into one with PEFT's combination types.")
    combine.add_argument("output", metavar="OUTPUT_DIR", help="the adapter directory to create")
    combine.add_argument("adapters", metavar="ADAPTER", nargs="+", help="the adapters' directories")
    combine.add_argument("--weights", type=float, nargs="+", help="one per adapter (default: 1 each)")
    combine.add_argument("--combination-type", default="svd",
                         help="cat, linear, ties, dare_linear, dare_ties, magnitude_prune, or an svd type: svd, "
                              "ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd (default svd)")
    combine.add_argument("--svd-rank", type=_positive_int, help="rank of the svd types (default: the largest rank)")
    combine.add_argument("--svd-clamp", type=float, help="quantile to clamp the svd factors to")
    combine.add_argument("--density", type=float, help="fraction kept by ties, dare and magnitude_prune types")
    combine.add_argument("--majority-sign-method", choices=("total", "frequency"), default="total")
    combine.add_argument("--random-seed", type=_seed, default=0, help="seed of the dare types (default 0)")
    combine.add_argument("--force", action="store_true", help="replace the output if it exists and is not empty")
    apply = commands.add_parser("apply-adapter", help="apply a LoRA adapter to its base model",
                                description="Write the base model with a PEFT LoRA adapter applied (W + weight * "
                                            "scaling * B @ A), tensor by tensor.")
    apply.add_argument("base", metavar="BASE", help="the base model")
    apply.add_argument("adapter", metavar="ADAPTER", help="the adapter directory")
    apply.add_argument("output", metavar="OUTPUT_DIR", help="the directory to create")
    apply.add_argument("--weight", type=float, default=1.0, help="the adapter's weight; -1 removes it (default 1)")
    apply.add_argument("--out-dtype", choices=("float32", "bfloat16", "float16"), help="dtype of the written tensors")
    apply.add_argument("--force", action="store_true", help="replace OUTPUT_DIR if it exists and is not empty")
    apply.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _moe_parser(commands) -> None:
    moe = commands.add_parser("moe", help="build a mixture of experts from dense models (a mergekit-moe config)",
                              description="Build a Mixtral, Qwen2-MoE or Qwen3-MoE checkpoint from a mergekit-moe "
                                          "config, tensor by tensor.")
    moe.add_argument("config", metavar="CONFIG", help="the mergekit-moe YAML config")
    moe.add_argument("output", metavar="OUTPUT_DIR", help="the directory to create")
    moe.add_argument("--random-seed", type=_seed, default=0,
                     help="seed of random routers, experts' noise and random merges (default 0)")
    moe.add_argument("--i-understand-this-is-not-useful-without-training", dest="allow_all_same",
                     action="store_true", help="build it even if every expert is the same model")
    moe.add_argument("--max-shard-size", type=_size, default="5GB", help="largest safetensors shard (default 5GB)")
    moe.add_argument("--force", action="store_true", help="replace OUTPUT_DIR if it exists and is not empty")
    moe.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _mergekit_options(moe, "mergekit-moe", acting=("--quiet",), no_effect=("--load-in-4bit", "--load-in-8bit"))


def _align_parser(commands) -> None:
    align = commands.add_parser("align", help="permute a Llama-family model's units to line up with another's",
                                description="Write MODEL with its residual stream, attention heads and MLP units "
                                            "permuted to line up with REFERENCE's (Git Re-Basin weight matching), "
                                            "computing the same function, so that the two can be merged.")
    align.add_argument("reference", metavar="REFERENCE", help="the model to line up with")
    align.add_argument("model", metavar="MODEL", help="the model to permute")
    align.add_argument("output", metavar="OUTPUT_DIR", help="the directory to create")
    for part in ("residual", "heads", "mlp"):
        align.add_argument(f"--no-{part}", action="store_true", help=f"leave the {part} units in place")
    align.add_argument("--max-iter", type=_positive_int, default=100, help="most sweeps of weight matching (100)")
    align.add_argument("--random-seed", type=_seed, default=0, help="seed of the matching's order (default 0)")
    align.add_argument("--max-shard-size", type=_size, default="5GB", help="largest safetensors shard (default 5GB)")
    align.add_argument("--force", action="store_true", help="replace OUTPUT_DIR if it exists and is not empty")
    align.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _size(text: str) -> str:
    from jaxmerge.checkpoints.safetensors import parse_size
    from jaxmerge.errors import JaxmergeError

    try:
        parse_size(text)
    except JaxmergeError:
        raise argparse.ArgumentTypeError(f"a size in bytes, or like 5GB or 500MB, got {text!r}") from None
    return text


def _dtype(text: str) -> str:
    from jaxmerge.cli.config import parse_dtype

    try:
        return parse_dtype(text.removeprefix("torch."), "the dtype")
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {text}")
    return value


def parse_mesh(text: str):
    """``'data=4,model=2'`` -> a mesh of the current devices with those axes."""
    import jax

    try:
        axes = [(name.strip(), int(size)) for name, size in (part.split("=") for part in text.split(","))]
    except ValueError:
        raise ConfigError(f"--mesh must look like data=4,model=2, got {text!r}") from None
    sizes = tuple(size for _, size in axes)
    if math.prod(sizes) != jax.device_count():
        raise ConfigError(f"--mesh {text} needs {math.prod(sizes)} devices, there are {jax.device_count()}")
    return jax.make_mesh(sizes, tuple(name for name, _ in axes))


def _merge(args) -> None:
    from pathlib import Path

    import jax

    from jaxmerge.checkpoints.stream import largest_axes_sharding
    from jaxmerge.cli.config import load_config

    if not args.no_compilation_cache and os.environ.get("JAXMERGE_NO_COMPILATION_CACHE", "") in ("", "0"):
        _compilation_cache()
    if args.distributed:
        jax.distributed.initialize()
    sharding = largest_axes_sharding(parse_mesh(args.mesh)) if args.mesh else None
    with _adapted_models(args, args.output) as adapted:
        config = load_config(args.config, adapted=adapted)
        for line in config.ignored:
            print(f"jaxmerge: warning: {line}", file=sys.stderr)
        _note_no_effect(args)
        adapted.apply(Path(args.output), args.force)
        _merge_config(args, config, sharding, adapted.names)


def _merge_config(args, config, sharding, names: dict) -> None:
    from pathlib import Path

    from jaxmerge.checkpoints.stream import StreamOptions, stream_groups
    from jaxmerge.cli.card import model_card
    from jaxmerge.cli.chat_templates import resolve_template
    from jaxmerge.cli.slices import output_config, plan_groups
    from jaxmerge.cli.tokenizer import TOKENIZER_FILES, build_vocabulary, tokenizer_files

    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.verbose else None
    options = StreamOptions(dtype=config.dtype, out_dtype=config.out_dtype, output_format=args.output_format,
                            max_shard_size=args.max_shard_size, force=args.force, progress=not args.no_progress,
                            sharding=sharding, log=log)
    models = list(dict.fromkeys(s.model for slice_ in config.slices for s in slice_.sources))
    vocabulary = None
    if config.tokenizer is not None:
        vocabulary = build_vocabulary(config.tokenizer, config.base or models[0], models)
    groups = plan_groups(config, args.random_seed, vocabulary)
    reference = Path(groups[0].base or groups[0].models[0])
    template = None if config.chat_template is None else resolve_template(config.chat_template, models)
    extra_files = {**tokenizer_files(vocabulary, reference, template), "jaxmerge_config.yml": config.text,
                   "README.md": None if args.no_write_model_card else model_card(config, Path(args.output).name, names)}
    if args.no_copy_tokenizer:
        extra_files.update(dict.fromkeys(TOKENIZER_FILES))
    vocab_rows = None if vocabulary is None else vocabulary.rows
    if (model_config := output_config(config, reference, config.out_dtype or config.dtype, vocab_rows)) is not None:
        extra_files["config.json"] = model_config
    read = [args.config, *(m / name for m in models for name in TOKENIZER_FILES if (m / name).exists())]
    output = stream_groups(groups, args.output, options=options, extra_files=extra_files, inputs=read)
    print(f"wrote {output}")


def _compilation_cache() -> None:
    """Keep every compiled kernel on disk, so that a later merge of the same shapes does not
    compile again (JAX's persistent compilation cache; a directory the user set wins)."""
    from pathlib import Path

    import jax

    if jax.config.jax_compilation_cache_dir is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxmerge" / "xla"
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            print(f"jaxmerge: warning: compiled kernels are not kept: cannot create {cache} "
                  f"({error.strerror or error})", file=sys.stderr)
            return
        jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _methods(args) -> None:
    from jaxmerge.merging import method, methods

    for name, record in methods().items() if args.method is None else [(args.method, method(args.method))]:
        print(f"{name}  (jaxmerge.{record.function.__name__}; base model: {record.base})")
        print(f"    {record.summary}")
        for p in record.params:
            if p.key is not None:
                scope = {"model": "per model", "leaf": "per tensor", "option": "global"}[p.scope]
                print(f"    {p.describe(config=True)} ({scope}): {p.doc}")
        if record.statistics:
            print(f"    statistics: per model, required - the model's {record.statistics[:-1]} checkpoint")
        if record.references:
            print(f"    arXiv {', '.join(record.references)}")


def _extract_lora(args) -> None:
    from pathlib import Path

    from jaxmerge.checkpoints.stream import open_checkpoint

    _note_no_effect(args)
    with _adapted_models(args, args.out_path) as adapted:
        base_path, tuned_path = (adapted.resolve(args.base_model, Path.cwd(), "--base-model"),
                                 adapted.resolve(args.model, Path.cwd(), "--model"))
        adapted.apply(Path(args.out_path), args.force)
        _extract_from(args, open_checkpoint(base_path), open_checkpoint(tuned_path))


def _extract_from(args, base, tuned) -> None:
    from jaxmerge.checkpoints.stream import _load
    from jaxmerge.cli.adapted import split_reference
    from jaxmerge.cli.hub import without_revision
    from jaxmerge.lora import extract_lora, save_adapter

    missing = sorted(set(tuned.names) - set(base.names))
    if missing:
        raise ConfigError(f"the base model {args.base_model} has no tensor {missing[0]!r} of {args.model}")
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.verbose else None
    base_name = without_revision(split_reference(args.base_model, "--base-model")[0])  # as mergekit writes it
    adapter, energy = extract_lora(lambda name: _load(base, name, None, None), lambda name: _load(tuned, name, None, None),
                                   names=tuned.names, shapes={n: base.shape_dtype(n)[0] for n in base.names},
                                   max_rank=args.max_rank, sv_epsilon=args.sv_epsilon,
                                   distribute_scale=not args.no_distribute_scale, embed_lora=args.embed_lora,
                                   include=args.include_regex, exclude=args.exclude_regex,
                                   base_model_name_or_path=base_name, log=log)
    output = save_adapter(args.out_path, adapter, force=args.force, inputs=[tuned.path, base.path])
    lowest = min(energy, key=energy.get)
    print(f"wrote {output}: {len(adapter.layers)} LoRA modules, rank up to {adapter.config['r']}, "
          f"{len(adapter.extras)} tensors in full; retained energy mean {sum(energy.values()) / len(energy):.4f}, "
          f"lowest {energy[lowest]:.4f} ({lowest})")


def _merge_adapters(args) -> None:
    import jax

    from jaxmerge.lora import add_weighted_adapter, load_adapter, save_adapter

    weights = args.weights or [1.0] * len(args.adapters)
    adapters = [load_adapter(path) for path in args.adapters]
    merged = add_weighted_adapter(adapters, weights, args.combination_type, svd_rank=args.svd_rank,
                                  svd_clamp=args.svd_clamp, density=args.density,
                                  majority_sign_method=args.majority_sign_method, key=jax.random.key(args.random_seed))
    print(f"wrote {save_adapter(args.output, merged, force=args.force, inputs=args.adapters)}")


def _apply_adapter(args) -> None:
    from jaxmerge.checkpoints.stream import StreamOptions
    from jaxmerge.lora import apply_adapter

    options = StreamOptions(out_dtype=args.out_dtype, force=args.force, progress=not args.no_progress)
    print(f"wrote {apply_adapter(args.base, args.adapter, args.output, weight=args.weight, options=options)}")


def _moe(args) -> None:
    from jaxmerge.checkpoints.stream import StreamOptions
    from jaxmerge.moe import build_moe, load_moe_config

    config = load_moe_config(args.config, allow_all_same=args.allow_all_same)
    _note_no_effect(args)
    options = StreamOptions(force=args.force, progress=not args.no_progress, max_shard_size=args.max_shard_size)
    print(f"wrote {build_moe(config, args.output, seed=args.random_seed, options=options, inputs=[args.config])}")


def _align(args) -> None:
    from jaxmerge.alignment.checkpoint import align_checkpoint
    from jaxmerge.checkpoints.stream import StreamOptions

    options = StreamOptions(force=args.force, progress=not args.no_progress, max_shard_size=args.max_shard_size)
    output = align_checkpoint(args.reference, args.model, args.output, residual=not args.no_residual,
                              heads=not args.no_heads, mlp=not args.no_mlp, max_iter=args.max_iter,
                              seed=args.random_seed, options=options)
    print(f"wrote {output}")


def _inspect(args) -> None:
    import numpy as np

    from jaxmerge.checkpoints.stream import open_checkpoint

    reader = open_checkpoint(args.path)
    rows = [(name if name.isprintable() else ascii(name)[1:-1], *reader.shape_dtype(name)) for name in reader.names]
    width = max([len(name) for name, _, _ in rows] + [6])
    print(f"{'tensor':<{width}}  {'shape':<20}dtype")
    for name, shape, dtype in rows:
        print(f"{name:<{width}}  {tuple(shape)!s:<20}{np.dtype(dtype).name}")
    params = sum(math.prod(shape) for _, shape, _ in rows)
    nbytes = sum(math.prod(shape) * np.dtype(dtype).itemsize for _, shape, dtype in rows)
    print(f"{len(rows)} tensors, {params:,} parameters, {nbytes:,} bytes ({nbytes / 2 ** 30:.2f} GiB), {reader.format}")


def _warn(message, category, filename, lineno, file=None, line=None):
    text = str(message) if issubclass(category, JaxmergeWarning) else f"{category.__name__}: {message}"
    print(f"jaxmerge: warning: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; exit status 0 on success, 2 on a bad config or checkpoint, 128 + n on
    signal n (130 on Ctrl-C, 143 on SIGTERM, 129 on SIGHUP), the output cleaned up in each case."""
    handlers = {}
    try:
        if threading.current_thread() is threading.main_thread():
            handlers = _signals.install()
        with warnings.catch_warnings():
            warnings.simplefilter("always", JaxmergeWarning)
            warnings.showwarning = _warn
            args = _parser().parse_args(argv)
            _signals.raise_if_received()
            {"merge": _merge, "inspect": _inspect, "methods": _methods, "extract-lora": _extract_lora,
             "merge-adapters": _merge_adapters, "apply-adapter": _apply_adapter, "moe": _moe,
             "align": _align}[args.command](args)
    except (ValueError, TypeError, OSError, RecursionError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if isinstance(error, RecursionError):
            message = "the input nests too deeply to read"
        print(f"jaxmerge: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxmerge: interrupted; no output was left behind", file=sys.stderr)
        return 130
    except _signals.Terminated as stop:
        print(f"jaxmerge: {signal.Signals(stop.signum).name} received; no output was left behind", file=sys.stderr)
        return 128 + stop.signum
    finally:
        _signals.restore(handlers)
    return 0


if __name__ == "__main__":
    from jaxmerge.cli.entry import finish

    finish(main())
