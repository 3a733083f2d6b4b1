"""Streaming checkpoint merges through ``jaxmerge merge``: wall time and peak memory.

Writes a base and three Hugging Face-layout checkpoints of about 170M float32 parameters
each (Llama shapes: vocabulary 32000, width 1024, MLP 2816, 8 layers) and merges them with
a linear and a TIES config through the ``jaxmerge`` command, each run in its own process.
In the same run it measures, for comparison:

- reading the input bytes once and writing one model's bytes (plain file I/O): the floor
  for a merge's wall time;
- the straightforward way: load every model into memory, merge with the in-memory
  function, save.

Peak RSS (``VmHWM`` of each process) is reported against the size of one model. The
checkpoints are in the page cache after being written, so the reads do not hit the disk.

Usage: python benchmarks/merge_checkpoints.py [--workdir DIR] [--layers 8] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = """
import sys, time
start = time.perf_counter()
{body}
peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print("RESULT", time.perf_counter() - start, int(peak) * 1024)
"""

IO_ONCE = """
from pathlib import Path
inputs, output = sys.argv[1:-1], Path(sys.argv[-1])
output.mkdir()
for path in inputs:
    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb") as f:
            while f.read(64 << 20):
                pass
source = next(Path(inputs[0]).glob("*.safetensors"))
with open(source, "rb") as f, open(output / source.name, "wb") as g:
    while chunk := f.read(64 << 20):
        g.write(chunk)
"""

STREAMED = """
from jaxmerge.cli.main import main
assert main(["merge", sys.argv[1], sys.argv[2], "--no-progress"]) == 0
"""

IN_MEMORY = """
import json, jax
import jaxmerge
from jaxmerge import checkpoints
config = json.loads(sys.argv[1])
models = [checkpoints.load(p) for p in config["models"]]
if config["method"] == "linear":
    merged = jaxmerge.average(models)
else:
    merged = jaxmerge.ties(checkpoints.load(config["base"]), models, density=0.5)
checkpoints.save(sys.argv[2], merged, format="safetensors")
"""


def child(body: str, *args: str) -> tuple[float, int]:
    result = subprocess.run([sys.executable, "-c", CHILD.format(body=body), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT")][-1]
    _, seconds, rss = line.split()
    return float(seconds), int(rss)


def write_checkpoints(workdir: Path, layers: int) -> list[Path]:
    import jax.numpy as jnp

    from jaxmerge import checkpoints

    d, ffn, vocab = 1024, 2816, 32000
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.{x}_proj.weight": (d, d) for x in "qkvo"})
        shapes.update({f"{p}.mlp.gate_proj.weight": (ffn, d), f"{p}.mlp.up_proj.weight": (ffn, d),
                       f"{p}.mlp.down_proj.weight": (d, ffn), f"{p}.input_layernorm.weight": (d,),
                       f"{p}.post_attention_layernorm.weight": (d,)})
    rng = np.random.default_rng(0)
    base = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    paths = []
    for i, name in enumerate(["base", "model1", "model2", "model3"]):
        tensors = base if i == 0 else {k: v + np.float32(0.01) * rng.standard_normal(v.shape, dtype=np.float32)
                                       for k, v in base.items()}
        path = checkpoints.save(workdir / name, {k: jnp.asarray(v) for k, v in tensors.items()}, format="safetensors",
                                max_shard_size="2GB")
        (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": d}))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="jaxmerge-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        base, *models = write_checkpoints(workdir, args.layers)
        model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        print(f"4 checkpoints of {model_bytes / 2 ** 20:.0f} MiB (float32) in {workdir}; {os.cpu_count()} CPUs")
        rows = []
        for method in ("linear", "ties"):
            config = workdir / f"{method}.yaml"
            parameters = "{weight: 1.0, density: 0.5}" if method == "ties" else "{weight: 1.0}"
            listed = "\n".join(f"  - model: {m}\n    parameters: {parameters}" for m in models)
            config.write_text(f"merge_method: {method}\n" + (f"base_model: {base}\n" if method == "ties" else "")
                              + f"models:\n{listed}\n")
            inputs = models + ([base] if method == "ties" else [])
            io = child(IO_ONCE, *map(str, inputs), str(workdir / f"io-{method}"))
            streamed = child(STREAMED, str(config), str(workdir / f"out-{method}"))
            spec = json.dumps({"method": method, "models": list(map(str, models)), "base": str(base)})
            in_memory = child(IN_MEMORY, spec, str(workdir / f"mem-{method}"))
            for label, (seconds, rss) in (("read inputs + write once", io), ("jaxmerge merge (streamed)", streamed),
                                          ("load all, merge, save", in_memory)):
                rows.append((method, label, seconds, rss))
            for name in (f"io-{method}", f"out-{method}", f"mem-{method}"):
                shutil.rmtree(workdir / name, ignore_errors=True)
        print(f"\n{'merge':<8}{'how':<28}{'seconds':>9}{'vs I/O':>8}{'peak RSS MiB':>14}{'vs model':>10}")
        for method, label, seconds, rss in rows:
            floor = next(t for m, how, t, _ in rows if m == method and how.startswith("read"))
            print(f"{method:<8}{label:<28}{seconds:>9.2f}{seconds / floor:>7.2f}x{rss / 2 ** 20:>14.0f}"
                  f"{rss / model_bytes:>9.2f}x")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
