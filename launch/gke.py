#!/usr/bin/env python
r"""Write a JobSet manifest that runs a command on every host of one or more TPU slices on GKE.

  python launch/gke.py --name glide-base --image us-docker.pkg.dev/p/r/glide-jax:latest \
      --tpu-type v5p --topology 4x4x4 --num-slices 2 \
      -- glide-jax train --config configs/base.py:variant=full --workdir gs://bucket/base \
      | kubectl apply -f -

One replicated Job per slice, one pod per TPU VM host (4 chips each), all started together and
failed together (JobSet). Inside a slice JAX finds its peers from the TPU environment GKE sets;
across slices the MEGASCALE_* variables below point every host at slice 0's first pod, and the
config's `mesh.dcn_*` sizes (product = number of slices) put the replica axis across slices.
Needs the JobSet controller and a TPU node pool per slice of the given type and topology.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys

# GKE node selector values and chips per host (VM) for multi-host slices.
ACCELERATORS = {
    "v4": ("tpu-v4-podslice", 4),
    "v5e": ("tpu-v5-lite-podslice", 4),
    "v5p": ("tpu-v5p-slice", 4),
    "v6e": ("tpu-v6e-slice", 4),
}


def hosts_per_slice(tpu_type: str, topology: str) -> tuple[int, int]:
  """(hosts, chips per host) of one slice."""
  if tpu_type not in ACCELERATORS:
    raise ValueError(f"unknown --tpu-type {tpu_type!r}; choose from {sorted(ACCELERATORS)}")
  if not re.fullmatch(r"\d+(x\d+)+", topology):
    raise ValueError(f"--topology {topology!r} is not of the form AxB or AxBxC")
  chips = math.prod(int(d) for d in topology.split("x"))
  per_host = min(ACCELERATORS[tpu_type][1], chips)  # single-host slices may have 1 or 2 chips
  if chips % per_host or per_host == 3:
    raise ValueError(f"topology {topology} ({chips} chips) is not a whole number of "
                     f"{ACCELERATORS[tpu_type][1]}-chip hosts (nor a 1- or 2-chip single host)")
  return chips // per_host, per_host


def jobset(name: str, image: str, command: list[str], tpu_type: str, topology: str, num_slices: int = 1,
           env: dict[str, str] | None = None, max_restarts: int = 0) -> dict:
  """The JobSet object (a plain dict; print it as YAML or JSON)."""
  if not re.fullmatch(r"[a-z]([a-z0-9-]{0,38}[a-z0-9])?", name):
    raise ValueError(f"--name {name!r} must be a lower-case DNS label of at most 40 characters")
  if num_slices < 1:
    raise ValueError(f"--num-slices must be >= 1, got {num_slices}")
  if not command:
    raise ValueError("give the command to run after '--'")
  hosts, chips = hosts_per_slice(tpu_type, topology)
  variables = [
      {"name": "JOBSET_NAME", "valueFrom": {"fieldRef": {
          "fieldPath": "metadata.annotations['jobset.sigs.k8s.io/jobset-name']"}}},
      {"name": "REPLICATED_JOB_NAME", "valueFrom": {"fieldRef": {
          "fieldPath": "metadata.annotations['jobset.sigs.k8s.io/replicatedjob-name']"}}},
  ]
  if num_slices > 1:
    variables += [
        {"name": "MEGASCALE_NUM_SLICES", "value": str(num_slices)},
        {"name": "MEGASCALE_SLICE_ID", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}},
        # slice 0, pod 0 of this JobSet, through the headless service JobSet creates
        {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)"},
    ]
  variables += [{"name": k, "value": v} for k, v in sorted((env or {}).items())]
  container = {
      "name": "glide-jax",
      "image": image,
      "imagePullPolicy": "Always",
      "command": ["bash", "-c", shlex.join(command)],
      "ports": [{"containerPort": 8471}, {"containerPort": 8080}],  # TPU ICI/DCN and the JAX coordinator
      "securityContext": {"privileged": True},
      "env": variables,
      "resources": {"limits": {"google.com/tpu": chips}},
  }
  pod = {
      "metadata": {"labels": {"app": name}},
      "spec": {
          "restartPolicy": "Never",
          "hostNetwork": True,
          "dnsPolicy": "ClusterFirstWithHostNet",
          "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": ACCELERATORS[tpu_type][0],
                           "cloud.google.com/gke-tpu-topology": topology},
          "containers": [container],
      },
  }
  return {
      "apiVersion": "jobset.x-k8s.io/v1alpha2",
      "kind": "JobSet",
      "metadata": {"name": name,
                   # one slice per node pool: JobSet places each replicated job on its own pool
                   "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
      "spec": {
          "failurePolicy": {"maxRestarts": max_restarts},
          "replicatedJobs": [{
              "name": "slice",
              "replicas": num_slices,
              "template": {"spec": {
                  "parallelism": hosts, "completions": hosts, "backoffLimit": 0,
                  "template": pod}},
          }],
      },
  }


def to_yaml(value, indent: int = 0) -> str:
  """A small YAML emitter for plain dicts/lists/scalars (strings are JSON-quoted, valid YAML)."""
  pad = "  " * indent
  if isinstance(value, dict):
    if not value:
      return pad + "{}\n"
    out = ""
    for k, v in value.items():
      if isinstance(v, (dict, list)) and v:
        out += f"{pad}{k}:\n" + to_yaml(v, indent + 1)
      else:
        out += f"{pad}{k}: {_scalar(v)}\n"
    return out
  if isinstance(value, list):
    if not value:
      return pad + "[]\n"
    out = ""
    for v in value:
      if isinstance(v, (dict, list)) and v:
        body = to_yaml(v, indent + 1)
        out += f"{pad}- " + body[len(pad) + 2:]
      else:
        out += f"{pad}- {_scalar(v)}\n"
    return out
  return pad + _scalar(value) + "\n"


def _scalar(v) -> str:
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, (int, float)):
    return str(v)
  if v is None:
    return "null"
  if isinstance(v, (dict, list)):
    return json.dumps(v)
  return json.dumps(str(v))


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  command: list[str] = []
  if "--" in argv:
    split = argv.index("--")
    argv, command = argv[:split], argv[split + 1:]
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--name", required=True, help="JobSet name (lower-case DNS label)")
  parser.add_argument("--image", required=True, help="container image with glide-jax[tpu] installed")
  parser.add_argument("--tpu-type", default="v5p", choices=sorted(ACCELERATORS))
  parser.add_argument("--topology", default="4x4x4", help="slice topology, e.g. 4x4x4 (v5p), 16x16 (v5e)")
  parser.add_argument("--num-slices", type=int, default=1)
  parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment")
  parser.add_argument("--max-restarts", type=int, default=0, help="JobSet restarts of the whole job")
  parser.add_argument("--json", action="store_true", help="print JSON instead of YAML")
  args = parser.parse_args(argv)
  env = {}
  for item in args.env:
    key, eq, value = item.partition("=")
    if not eq:
      parser.error(f"--env {item!r} is not KEY=VALUE")
    env[key] = value
  try:
    obj = jobset(args.name, args.image, command, args.tpu_type, args.topology, args.num_slices, env,
                 args.max_restarts)
  except ValueError as e:
    parser.error(str(e))
  sys.stdout.write(json.dumps(obj, indent=2) + "\n" if args.json else to_yaml(obj))
  return 0


if __name__ == "__main__":
  sys.exit(main())
