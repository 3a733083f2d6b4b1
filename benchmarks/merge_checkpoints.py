"""``jaxmerge merge`` against mergekit and against the machine's I/O limit: wall time and peak memory.

Writes a base and three Hugging Face-layout Llama checkpoints (``--shape``), then, for each
method (``--methods``), runs one mergekit config through

- the I/O limit: every input read once into one reused, pre-touched buffer, and one model's
  bytes written once (what any merge must at least do);
- ``jaxmerge merge CONFIG OUT`` as its own process, twice: with an empty compilation cache
  (compiling every kernel) and again with the kernels it kept (see the README);
- ``mergekit-yaml CONFIG OUT`` as its own process, the same config file, when mergekit is
  installed (``pip install mergekit``, or ``--mergekit PATH``);
- the same ``jaxmerge merge`` on tiny models of the same layout (one layer of width 64), kernels
  cached: its start-up, which the row "merge itself" subtracts from the cached run's time (its
  "vs I/O" is at most 2.00x when the merge runs at half the I/O limit or better);

and prints wall time and peak RSS (``ru_maxrss`` of each process), the times as ratios against
the I/O limit and mergekit's measured in the same run, the memory against one model's size.
``jaxmerge --help``'s time is printed first.
Methods with a base merge the base and two models; the others three models (slerp two). Every
run's inputs are read once, untimed, just before it, so that each starts with them in the page
cache (memory allowing), whatever the machine paged out since.

Shapes: ``small`` is 170M float32 parameters a model (vocabulary 32000, width 1024, MLP 2816,
8 layers: 0.7 GB); ``1b`` the TinyLlama 1.1B layout in bfloat16 (2.2 GB); ``7b`` the Llama 2 7B
layout in bfloat16 (13.5 GB a model: about 60 GB of disk for the four checkpoints and an output).
``--layers`` changes the number of layers of any shape.

Usage: python benchmarks/merge_checkpoints.py [--shape small|1b|7b] [--layers N] [--reps 1]
         [--methods linear,ties,...|all] [--mergekit PATH|none] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {  # vocabulary, width, MLP width, key/value width, layers, dtype
    "small": (32000, 1024, 2816, 1024, 8, "float32"),
    "1b": (32000, 2048, 5632, 256, 22, "bfloat16"),
    "7b": (32000, 4096, 11008, 4096, 32, "bfloat16"),
    "tiny": (256, 64, 128, 64, 1, "float32"),  # start-up
}
METHODS = {  # name: (needs a base, number of models, parameters per model, global parameters)
    "linear": (False, 3, "{weight: 1.0}", ""),
    "slerp": (True, 1, "{}", "parameters: {t: 0.4}\n"),
    "ties": (True, 2, "{weight: 1.0, density: 0.5}", ""),
    "dare_ties": (True, 2, "{weight: 1.0, density: 0.5}", ""),
    "breadcrumbs_ties": (True, 2, "{weight: 1.0, density: 0.8, gamma: 0.01}", ""),
    "della": (True, 2, "{weight: 1.0, density: 0.5, epsilon: 0.1}", ""),
    "sce": (True, 2, "{}", "parameters: {select_topk: 0.5}\n"),
    "model_stock": (True, 2, "{}", ""),
    "karcher": (False, 3, "{}", ""),
    "nuslerp": (False, 2, "{weight: 1.0}", ""),
    "arcee_fusion": (True, 1, "{}", ""),
    "nearswap": (True, 1, "{}", "parameters: {t: 0.001}\n"),
}
DEFAULT_METHODS = "linear,ties,della,dare_ties,breadcrumbs_ties,sce,model_stock,karcher,slerp"
CHUNK = 64 << 20

IO_LIMIT = """
import sys
from pathlib import Path
import numpy as np
*inputs, output = sys.argv[1:]
buffer = np.ones({chunk}, np.uint8)  # touched once, reused for every read
view = memoryview(buffer)
for path in inputs:
    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
Path(output).mkdir()
with open(Path(output) / "model.safetensors", "wb", buffering=0) as g:
    remaining = sum(f.stat().st_size for f in Path(inputs[0]).glob("*.safetensors"))
    while remaining > 0:
        remaining -= g.write(view[:min(remaining, len(view))])
"""


def measure(command: list[str], env: dict | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of ``command`` run as its own process (its peak counts the
    pages it shared with this process before ``exec``: keep this process small)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=None if env is None else {**os.environ, **env})
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr.decode(errors='replace')[-3000:]}")
    return seconds, usage.ru_maxrss * 1024


def warm(paths: list[Path]) -> None:
    """Read every safetensors file of ``paths`` (untimed), so that each timed run finds its inputs
    in the page cache: some machines page out idle page cache in the background."""
    measure(["cat", *(str(f) for path in paths for f in sorted(path.glob("*.safetensors")))])


def llama_shapes(shape: str, layers: int | None) -> tuple[dict, str]:
    vocab, d, ffn, kv, default_layers, dtype = SHAPES[shape]
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in range(default_layers if layers is None else layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.q_proj.weight": (d, d), f"{p}.self_attn.k_proj.weight": (kv, d),
                       f"{p}.self_attn.v_proj.weight": (kv, d), f"{p}.self_attn.o_proj.weight": (d, d),
                       f"{p}.mlp.gate_proj.weight": (ffn, d), f"{p}.mlp.up_proj.weight": (ffn, d),
                       f"{p}.mlp.down_proj.weight": (d, ffn), f"{p}.input_layernorm.weight": (d,),
                       f"{p}.post_attention_layernorm.weight": (d,)})
    return shapes, dtype


def write_checkpoints(workdir: Path, shape: str, layers: int | None) -> tuple[list[Path], int]:
    """A base and three models near it, tensor by tensor (never a whole model in memory)."""
    import ml_dtypes

    from jaxmerge.checkpoints import SafetensorsWriter

    shapes, dtype_name = llama_shapes(shape, layers)
    dtype = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)
    vocab, d, ffn, kv, _, _ = SHAPES[shape]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
              "intermediate_size": ffn, "num_attention_heads": d // 64, "num_key_value_heads": kv // 64,
              "num_hidden_layers": sum(n.endswith("input_layernorm.weight") for n in shapes), "vocab_size": vocab,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": dtype_name}
    paths = [workdir / name for name in ("base", "model1", "model2", "model3")]
    writers = []
    for path in paths:
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
        writers.append(SafetensorsWriter(path, [(n, s, dtype) for n, s in shapes.items()], max_shard_size="5GB"))
    rng = np.random.default_rng(0)
    for name, s in shapes.items():
        base = rng.standard_normal(s, dtype=np.float32) * np.float32(0.02)
        for i, writer in enumerate(writers):
            noise = 0 if i == 0 else rng.standard_normal(s, dtype=np.float32) * np.float32(0.002)
            writer.write(name, (base + noise).astype(dtype))
    for writer in writers:
        writer.close()
    return paths, sum(f.stat().st_size for f in paths[0].glob("*.safetensors"))


def write_config(workdir: Path, method: str, base: Path, models: list[Path]) -> tuple[Path, list[Path]]:
    """The mergekit config of ``method`` and the checkpoints it reads."""
    with_base, count, parameters, extra = METHODS[method]
    chosen = models[:count]
    listed = "".join(f"  - model: {m}\n    parameters: {parameters}\n" for m in chosen)
    if method == "slerp":
        listed = "".join(f"  - model: {m}\n" for m in (base, *chosen))
    text = f"merge_method: {method}\n" + (f"base_model: {base}\n" if with_base else "") + f"models:\n{listed}{extra}"
    config = workdir / f"{method}.yaml"
    config.write_text(text)
    return config, ([base] if with_base else []) + chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(set(SHAPES) - {"tiny"}), default="small")
    parser.add_argument("--layers", type=int, default=None, help="layers a model (default: the shape's)")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, or 'all' ({', '.join(METHODS)})")
    parser.add_argument("--mergekit", default=shutil.which("mergekit-yaml"),
                        help="path of mergekit-yaml ('none' to skip; default: the one on the PATH)")
    parser.add_argument("--reps", type=int, default=1, help="runs of each, the best time reported (default 1)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="a new or empty directory for the checkpoints (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = parser.parse_args()
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    mergekit = None if args.mergekit in (None, "none") else args.mergekit
    jaxmerge = shutil.which("jaxmerge") or str(Path(sys.executable).with_name("jaxmerge"))
    if args.workdir and args.workdir.exists() and (not args.workdir.is_dir() or any(args.workdir.iterdir())):
        parser.error(f"--workdir {args.workdir} is not an empty directory: give a new or empty one (it is removed "
                     "at the end unless --keep)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="jaxmerge-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        (workdir / "tiny").mkdir()
        with multiprocessing.get_context("spawn").Pool(1) as pool:  # this process stays small: children's
            (base, *models), model_bytes = pool.apply(write_checkpoints, (workdir, args.shape, args.layers))  # RSS
            tiny, _ = pool.apply(write_checkpoints, (workdir / "tiny", "tiny", None))
        warm([base, *models])  # model1 starts as a copy of the base
        print(f"shape {args.shape}: 4 checkpoints of {model_bytes / 2 ** 30:.2f} GiB in {workdir}; "
              f"{os.cpu_count()} CPUs; mergekit: {mergekit or 'not installed'}")
        measure([jaxmerge, "--help"])  # warm the file cache of the installed packages
        print(f"jaxmerge --help: {min(measure([jaxmerge, '--help'])[0] for _ in range(3)):.2f} s")
        print(f"\n{'method':<18}{'how':<23}{'seconds':>9}{'vs I/O':>8}{'mergekit/this':>15}{'peak RSS GiB':>14}"
              f"{'vs model':>10}")
        for method in methods:
            config, inputs = write_config(workdir, method, base, models)
            tiny_config, tiny_inputs = write_config(workdir / "tiny", method, tiny[0], tiny[1:])
            out = workdir / f"out-{method}"
            merge = [jaxmerge, "merge", str(config), str(out), "--no-progress"]
            tiny_merge = [jaxmerge, "merge", str(tiny_config), str(out), "--no-progress"]
            runs = {
                "I/O limit": [sys.executable, "-c", IO_LIMIT.format(chunk=CHUNK), *map(str, inputs), str(out)],
                "jaxmerge, compiling": merge,
                "jaxmerge, cached": merge,
                **({"mergekit-yaml": [mergekit, str(config), str(out), "--quiet"]} if mergekit else {}),
                "jaxmerge, tiny, compiling": tiny_merge,
                "jaxmerge, start-up": tiny_merge,
            }
            rows = {}
            for rep in range(args.reps):  # the best time and the largest peak of each
                cache = {"JAX_COMPILATION_CACHE_DIR": str(workdir / f"xla-{method}-{rep}")}  # empty, then filled
                for how, command in runs.items():
                    warm(tiny_inputs if command is tiny_merge else inputs)
                    seconds, rss = measure(command, cache if how.startswith("jaxmerge") else None)
                    shutil.rmtree(out)
                    best = rows.get(how, (seconds, rss))
                    rows[how] = (min(best[0], seconds), max(best[1], rss))
            del rows["jaxmerge, tiny, compiling"]  # it fills the cache the start-up run reads
            rows["jaxmerge, merge itself"] = (rows["jaxmerge, cached"][0] - rows["jaxmerge, start-up"][0],
                                              rows["jaxmerge, cached"][1])
            for how, (seconds, rss) in rows.items():
                versus = f"{rows['mergekit-yaml'][0] / seconds:>14.2f}x" if mergekit else f"{'':>15}"
                print(f"{method:<18}{how:<23}{seconds:>9.2f}{seconds / rows['I/O limit'][0]:>7.2f}x{versus}"
                      f"{rss / 2 ** 30:>14.2f}{rss / model_bytes:>9.2f}x", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
