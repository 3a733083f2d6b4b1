"""Aligning one Hugging Face Llama-family checkpoint to another on disk (``jaxmerge align``), so
that the pair can then be merged by ``jaxmerge merge``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from jaxmerge.alignment.llama import llama_permutation_spec
from jaxmerge.alignment.matching import _permuted, weight_matching
from jaxmerge.errors import JaxmergeError

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
PERMUTATION_FILE = "jaxmerge_permutation.json"


def align_checkpoint(reference: str | os.PathLike, model: str | os.PathLike, output: str | os.PathLike, *,
                     residual: bool = True, heads: bool = True, mlp: bool = True, max_iter: int = 100,
                     seed: int = 0, options=None) -> Path:
    """Write ``model`` with its units permuted to line up with ``reference``'s (weight matching).

    Both checkpoints are read whole (the matching sees every tensor at once, in float64: about
    16 bytes per parameter of the pair); the output is written tensor by tensor, in
    ``model``'s dtypes, with a merge's safety rules (a staging directory renamed into place,
    no overwriting an input, ``model``'s config and tokenizer files copied), plus
    ``jaxmerge_permutation.json``: ``{permutation name: index list}`` (see
    :func:`~jaxmerge.llama_permutation_spec` for the names). The aligned model computes the
    same function as ``model``.

    Args:
      reference: the checkpoint to line up with (a Llama, Mistral, Qwen2 or Qwen3 directory of
        safetensors with its ``config.json``).
      model: the checkpoint to permute, of the same architecture and shapes.
      output: the directory to create.
      residual: permute the model dimension (shared by all blocks).
      heads: permute each block's attention heads (key-value groups).
      mlp: permute each block's MLP hidden units.
      max_iter: the most sweeps of weight matching.
      seed: the seed of weight matching's order of permutations.
      options: a :class:`~jaxmerge.checkpoints.StreamOptions` (``force``, shard size, progress).

    Returns:
      The output path.

    Raises:
      JaxmergeError: a checkpoint that is not of the Llama family, models of different
        architectures, tensors or shapes, or an output that would overwrite an input.

    References:
      Ainsworth et al., "Git Re-Basin: Merging Models modulo Permutation Symmetries",
      arXiv 2209.04836.
    """
    from jaxmerge.checkpoints.safetensors import read_config
    from jaxmerge.checkpoints.stream import StreamOptions, open_checkpoint, stream_tensors

    configs = [read_config(path) for path in (reference, model)]
    for path, config in zip((reference, model), configs):
        if config.get("model_type") not in LLAMA_FAMILY:
            raise JaxmergeError(f"{path} is a {config.get('model_type')!r} model; align reads the Llama family: "
                                f"{', '.join(LLAMA_FAMILY)}")
    readers = [open_checkpoint(path) for path in (model, reference)]
    if readers[0].names != readers[1].names:
        different = min(set(readers[0].names) ^ set(readers[1].names))
        raise JaxmergeError(f"{model} and {reference} differ in their tensors, e.g. {different!r}")
    spec = llama_permutation_spec(readers[0].names, configs[1], residual=residual, heads=heads, mlp=mlp)
    named = [key[0] for key in spec.axes]
    tensors = [{name: np.asarray(reader.read(name)) for name in named} for reader in readers]
    perm = weight_matching(spec, tensors[1], tensors[0], max_iter=max_iter, seed=seed)

    def aligned(name):
        if name in tensors[0]:
            return _permuted(tensors[0][name], spec.axes[(name,)], perm)
        return readers[0].read(name)

    planned = [(name, *readers[0].shape_dtype(name)) for name in readers[0].names]
    record = json.dumps({name: np.asarray(p).tolist() for name, p in perm.items()}) + "\n"
    return stream_tensors(planned, aligned, output, readers=readers, options=options or StreamOptions(),
                          extra_files={PERMUTATION_FILE: record})
