#!/usr/bin/env python
r"""Start N processes on this machine that form one multi-host JAX job over `jax.distributed`.

  python launch/local.py --processes 2 --devices-per-process 4 -- \
      glide-jax train --config configs/base.py:variant=tiny,runlocal --workdir /tmp/mh

Each process gets, in its environment:
  JAX_COORDINATOR_ADDRESS  localhost:<port>   (read by jax.distributed.initialize itself)
  JAX_NUM_PROCESSES, JAX_PROCESS_ID           (pass them on: JAX does not read these two)
  GLIDE_JAX_COORDINATOR, GLIDE_JAX_NUM_PROCESSES, GLIDE_JAX_PROCESS_ID
                                              (read by glide_jax.parallel.multihost.initialize)
  JAX_PLATFORMS=cpu, XLA_FLAGS with --xla_force_host_platform_device_count=M
and the strings {process_id}, {num_processes}, {coordinator} in the command are replaced, for
programs that take them as flags. Output lines are prefixed with `[i]`. If one process exits
non-zero, the others are terminated and this script exits with that code; a timeout does the same.
`glide-jax train` processes prepare a missing glide_shapes once between them (a file lock in the
data dir, glide_jax/data/pipeline.py), so a fresh data dir needs no preparation step first.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], process_id: int, num_processes: int, coordinator: str,
                devices: int) -> dict[str, str]:
  env = dict(base)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  env.update({
      "XLA_FLAGS": " ".join(flags),
      "JAX_PLATFORMS": "cpu",
      "JAX_COORDINATOR_ADDRESS": coordinator,
      "JAX_NUM_PROCESSES": str(num_processes),
      "JAX_PROCESS_ID": str(process_id),
      # the names glide_jax.parallel.multihost.initialize() reads
      "GLIDE_JAX_COORDINATOR": coordinator,
      "GLIDE_JAX_NUM_PROCESSES": str(num_processes),
      "GLIDE_JAX_PROCESS_ID": str(process_id),
      "PYTHONUNBUFFERED": "1",
  })
  return env


def substitute(command: list[str], process_id: int, num_processes: int, coordinator: str) -> list[str]:
  return [c.replace("{process_id}", str(process_id)).replace("{num_processes}", str(num_processes))
          .replace("{coordinator}", coordinator) for c in command]


def _pump(stream, prefix: str, out, lock: threading.Lock) -> None:
  for line in iter(stream.readline, ""):
    with lock:
      out.write(f"{prefix}{line}")
      out.flush()
  stream.close()


def _terminate(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
  # Each child leads its own process group, so its own children go too.
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGTERM)
      except ProcessLookupError:
        pass
  deadline = time.time() + grace
  for p in procs:
    try:
      p.wait(timeout=max(0.1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


def run(command: list[str], processes: int, devices_per_process: int, port: int | None = None,
        timeout: float | None = None, env: dict[str, str] | None = None) -> int:
  """Runs `command` as `processes` cooperating processes; returns the job's exit code."""
  if processes < 1 or devices_per_process < 1:
    raise ValueError(f"--processes ({processes}) and --devices-per-process ({devices_per_process}) must be >= 1")
  if not command:
    raise ValueError("no command given after '--'")
  coordinator = f"localhost:{port or free_port()}"
  base_env = dict(os.environ if env is None else env)
  lock = threading.Lock()
  procs: list[subprocess.Popen] = []
  pumps: list[threading.Thread] = []
  for i in range(processes):
    p = subprocess.Popen(
        substitute(command, i, processes, coordinator),
        env=process_env(base_env, i, processes, coordinator, devices_per_process),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    procs.append(p)
    t = threading.Thread(target=_pump, args=(p.stdout, f"[{i}] ", sys.stdout, lock), daemon=True)
    t.start()
    pumps.append(t)

  start = time.time()
  code = 0
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        print(f"[local.py] process {i} exited with code {code}; stopping the other processes",
              file=sys.stderr, flush=True)
        _terminate(procs)
        break
      if all(c == 0 for c in codes):
        break
      if timeout is not None and time.time() - start > timeout:
        print(f"[local.py] timeout after {timeout:.0f}s; stopping all processes", file=sys.stderr, flush=True)
        _terminate(procs)
        code = 124
        break
      time.sleep(0.1)
  except KeyboardInterrupt:
    _terminate(procs)
    code = 130
  for t in pumps:
    t.join(timeout=5)
  return code


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" in argv:
    split = argv.index("--")
    own, command = argv[:split], argv[split + 1:]
  else:
    own, command = argv, []
  parser = argparse.ArgumentParser(
      description="Run a command as N jax.distributed processes on this machine (CPU devices).",
      usage="%(prog)s --processes N [--devices-per-process M] [--port P] [--timeout S] -- COMMAND ...")
  parser.add_argument("--processes", type=int, required=True, help="number of processes (hosts)")
  parser.add_argument("--devices-per-process", type=int, default=1, help="CPU devices per process")
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  parser.add_argument("--timeout", type=float, default=None, help="kill the job after this many seconds")
  args = parser.parse_args(own)
  if not command:
    parser.error("give the command to run after '--'")
  try:
    return run(command, args.processes, args.devices_per_process, args.port, args.timeout)
  except ValueError as e:
    parser.error(str(e))
    return 2


if __name__ == "__main__":
  sys.exit(main())
