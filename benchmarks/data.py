"""Input-pipeline throughput per host process, against what one host of a TPU slice consumes.

  python -m benchmarks.data [--data-dir DIR] [--batch 64] [--seconds 20] [--cores 1 2]
      [--file-format array_record|tfrecord] [--tokenizer gpt2_bpe|words] [--train-examples N]
      [--slice v5p:2x4x4] [--demand-batch 2048]

Prepares glide_shapes/size64 and glide_shapes/size256 in --data-dir/<file format> if needed
(timing the preparation), then for each core count runs each pipeline in a subprocess pinned to
that many cores (sched_setaffinity, and a tf.data thread pool of that size) and prints images/second
after a warm-up: what one host process feeding the trainer produces. 64 px: the base stage (read,
decode, tokens, mask). 256 px: the upsample stage (+ the 64 px area-downsampled low-res input).

Next to it, what one host of the slice consumes (`host_demand`): the step-time lower bound of
`glide-jax plan` (model FLOPs = 3 x the analytic forward FLOPs per example x batch, over the
slice's bf16 peak; glide_jax/plan.py), for the released base (64 px) and the released upsampler
(256 px), so batch / bound / hosts images/s per host, and the ratio. The bound assumes 100% MFU, so
the demand is an upper bound on what a host really eats.

Tokenizer: `gpt2_bpe` (default) is the released models' tokenizer type, run on a byte-level BPE
trained here on the dataset's captions (GPT-2's files ship with glide-text2im and are not
downloaded; the encoding work per caption is that of the same library and pre-tokenizer); `words`
is the tiny word-level one.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
PIPELINES = {  # name -> (dataset, stage, image size, extra data config)
    "64px base": ("glide_shapes/size64", "base", 64, {}),
    "256px upsample": ("glide_shapes/size256", "upsample", 256, {"low_res_size": 64}),
    "64px inpaint": ("glide_shapes/size64", "inpaint", 64, {"masks": {"kind": "random"}}),
}
# The released model each pipeline feeds (for the per-host demand).
RELEASED = {"64px base": "configs/base.py:variant=released",
            "256px upsample": "configs/upsample.py:variant=released"}
TEXT_CTX = 128  # the released models' text context


def hosts_per_slice(generation: str, dims: tuple[int, ...]) -> tuple[int, int]:
  """(hosts, chips per host) of a slice, from launch/gke.py (the launcher's table)."""
  spec = importlib.util.spec_from_file_location("_glide_jax_gke", ROOT / "launch" / "gke.py")
  gke = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gke)
  return gke.hosts_per_slice(generation, "x".join(map(str, dims)))


def images_per_host(forward_flops: float, batch: int, peak_flops: float, chips: int, hosts: int) -> float:
  """Images/s one host consumes at the plan's step-time bound: model FLOPs 3 x forward x batch over
  the slice's peak (`glide-jax plan`'s model bound), batch / bound / hosts."""
  model_flops = 3.0 * forward_flops * batch
  bound_s = model_flops / (peak_flops * chips)
  return batch / bound_s / hosts


def host_demand(config: str, topology: str = "v5p:2x4x4", batch: int = 2048) -> dict:
  """Per-host demand of a config's model on a TPU slice (analytic: no compile, no TPU needed)."""
  import flax.linen as nn
  import jax

  from glide_jax import config_lib
  from glide_jax import plan as plan_lib
  from glide_jax.train import stages

  cfg = config_lib.load_config(config, [f"--config.batch_size={batch}"])
  stage = stages.make_stage(cfg)
  params = nn.meta.unbox(jax.eval_shape(stage.init, jax.random.key(0)))
  fwd = plan_lib.forward_flops(stage, params)
  gen, dims = plan_lib.parse_topology(topology)
  chips = math.prod(dims)
  hosts, per_host = hosts_per_slice(gen, dims)
  peak = plan_lib.CHIPS[gen].peak_flops
  need = images_per_host(fwd, batch, peak, chips, hosts)
  return {"config": config, "topology": topology, "chips": chips, "hosts": hosts, "chips_per_host": per_host,
          "batch": batch, "forward_flops": fwd, "peak_flops": peak,
          "step_bound_s": 3.0 * fwd * batch / (peak * chips), "images_per_s_per_host": need}


def prepare(data_dir: str, names: list[str] | None = None, file_format: str | None = None,
            train_examples: int | None = None) -> dict[str, float]:
  from glide_jax.data import pipeline, shapes

  seconds = {}
  for name in names or sorted({v[0] for v in PIPELINES.values()}):
    config = name.split("/")[1]
    validation = max(64, train_examples // 10) if train_examples else None
    builder = shapes.GlideShapes(config=config, data_dir=data_dir, train_examples=train_examples,
                                 validation_examples=validation)
    if builder.is_prepared():
      continue
    t, cpu = time.perf_counter(), time.process_time()
    builder.download_and_prepare(file_format=file_format or pipeline.DEFAULT_FILE_FORMAT)
    seconds[name] = time.perf_counter() - t
    cpu = time.process_time() - cpu
    print(f"prepared {name} ({builder.info.file_format.value}) in {seconds[name]:.1f} s wall, {cpu:.1f} s CPU "
          f"({', '.join(f'{k} {v.num_examples}' for k, v in builder.info.splits.items())})", flush=True)
  return seconds


def train_bpe(data_dir: str, out_dir: str, dataset: str = "glide_shapes/size64", vocab_size: int = 2000) -> dict:
  """A byte-level BPE in GPT-2's file format (encoder.json, vocab.bpe), trained on the captions."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  from glide_jax.commands import data as data_cmd

  os.makedirs(out_dir, exist_ok=True)
  enc, merges = os.path.join(out_dir, "encoder.json"), os.path.join(out_dir, "vocab.bpe")
  if not (os.path.exists(enc) and os.path.exists(merges)):
    captions = [c.lower() for c in data_cmd.iter_captions(dataset, data_dir, "train", "caption", 20_000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(captions, trainer)
    model = json.loads(tok.to_str())["model"]
    pieces = sorted((i, t) for t, i in model["vocab"].items() if t != "<|endoftext|>")
    vocab = {t: n for n, (_, t) in enumerate(pieces)}
    vocab["<|endoftext|>"] = len(vocab)  # GPT-2: the end token is the last id (the pad id)
    with open(enc, "w") as f:
      json.dump(vocab, f)
    with open(merges, "w") as f:
      f.write("#version: 0.2\n" + "".join(f"{' '.join(m) if isinstance(m, list) else m}\n" for m in model["merges"]))
  return {"type": "gpt2_bpe", "files": {"encoder.json": enc, "vocab.bpe": merges}, "text_ctx": TEXT_CTX}


def measure(name: str, data_dir: str, batch: int, seconds: float, cores: int, tokenizer: dict) -> dict:
  """Runs in a child process pinned to `cores` cores."""
  os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
  from glide_jax.data import pipeline

  dataset, stage, size, extra = PIPELINES[name]
  cfg = {"name": dataset, "data_dir": data_dir, "split": "train", "num_threads": cores,
         "tokenizer": tokenizer, **extra}
  it = pipeline.make_train_iterator(cfg, stage, batch, size, seed=0, process_index=0, process_count=1)
  t0 = time.perf_counter()
  next(it)
  first = time.perf_counter() - t0
  for _ in range(5):  # warm-up: let AUTOTUNE settle
    next(it)
  n, t = 0, time.perf_counter()
  while time.perf_counter() - t < seconds:
    next(it)
    n += batch
  dt = time.perf_counter() - t
  return {"pipeline": name, "cores": cores, "images_per_s": n / dt, "images": n, "first_batch_s": first,
          "file_format": it.source.file_format}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "glide_jax_bench_tfds"))
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seconds", type=float, default=20.0)
  p.add_argument("--cores", type=int, nargs="+", default=[1, 2])
  p.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
  p.add_argument("--file-format", choices=("array_record", "tfrecord"), default="array_record")
  p.add_argument("--tokenizer", choices=("gpt2_bpe", "words"), default="gpt2_bpe")
  p.add_argument("--train-examples", type=int, default=None,
                 help="train examples to prepare per dataset (validation: a tenth; default: the "
                      "registered sizes); kept in a data dir of its own")
  p.add_argument("--slice", default="v5p:2x4x4", help="TPU slice for the per-host demand (v5p-64 = v5p:2x4x4)")
  p.add_argument("--demand-batch", type=int, default=2048, help="global batch for the per-host demand")
  p.add_argument("--no-demand", action="store_true", help="skip the per-host demand")
  p.add_argument("--prepare-only", action="store_true", help="only prepare (and time) the datasets")
  p.add_argument("--datasets", nargs="+", default=None, help="datasets to prepare (default: those the pipelines read)")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  p.add_argument("--child-tokenizer", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  data_dir = os.path.join(args.data_dir, args.file_format + (f"_{args.train_examples}" if args.train_examples else ""))
  if args.child:
    name, cores = args.child.rsplit(":", 1)
    print(json.dumps(measure(name, data_dir, args.batch, args.seconds, int(cores), json.loads(args.child_tokenizer))),
          flush=True)
    # Exit without tearing down the running tf.data iterator: its destructor once hung here for
    # good (seen with the gpt2_bpe tokenizer: a worker thread in the tokenising numpy_function).
    os._exit(0)
  print(f"machine: {os.cpu_count()} cores visible; batch {args.batch}; {args.seconds:.0f} s per run; "
        f"{args.file_format}; tokenizer {args.tokenizer}")
  names = args.datasets or sorted({PIPELINES[n][0] for n in args.pipelines})
  prepare(data_dir, names, args.file_format, args.train_examples)
  if args.prepare_only:
    return 0
  if args.tokenizer == "gpt2_bpe":
    tokenizer = train_bpe(data_dir, os.path.join(data_dir, "bpe"))
  else:
    tokenizer = {"type": "words", "text_ctx": TEXT_CTX}
  demand = {}
  if not args.no_demand:
    for name in args.pipelines:
      if name in RELEASED:
        demand[name] = host_demand(RELEASED[name], args.slice, args.demand_batch)
        d = demand[name]
        print(f"demand {name:16s} {d['config']}: forward {d['forward_flops'] / 1e9:.1f} GFLOP/example; "
              f"{d['topology']} = {d['chips']} chips, {d['hosts']} hosts of {d['chips_per_host']}; "
              f"batch {d['batch']}: step >= {d['step_bound_s'] * 1e3:.0f} ms, "
              f"so {d['images_per_s_per_host']:.0f} images/s per host", flush=True)
  rows = []
  for name in args.pipelines:
    for cores in args.cores:
      out = subprocess.run([sys.executable, "-m", "benchmarks.data", "--child", f"{name}:{cores}",
                            "--child-tokenizer", json.dumps(tokenizer), "--data-dir", args.data_dir,
                            "--file-format", args.file_format, "--batch", str(args.batch),
                            "--seconds", str(args.seconds)]
                           + (["--train-examples", str(args.train_examples)] if args.train_examples else []),
                           capture_output=True, text=True, check=False, timeout=args.seconds + 900)
      if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return out.returncode
      row = json.loads(out.stdout.strip().splitlines()[-1])
      line = (f"{name:16s} cores={cores}  {row['images_per_s']:8.0f} images/s per host process  "
              f"({row['images']} images; first batch {row['first_batch_s']:.1f} s)")
      if name in demand:
        need = demand[name]["images_per_s_per_host"]
        row.update(needed_per_host=need, ratio=row["images_per_s"] / need,
                   cores_to_keep_up=need / (row["images_per_s"] / cores))
        line += (f"; one {args.slice} host needs {need:.0f}: ratio {row['ratio']:.2f}, "
                 f"~{row['cores_to_keep_up']:.1f} cores at this rate per core")
      rows.append(row)
      print(line, flush=True)
  print(json.dumps({"summary": True, "slice": args.slice, "demand": list(demand.values()), "results": rows}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
