r"""Interrupts training runs in every way a machine stops a process and checks the result is exact.

  python benchmarks/kill_campaign.py --root runs/kill_campaign --data ../shared/data
  python benchmarks/kill_campaign.py --root runs/kill_campaign --recipes digits --interruptions 12

For each recipe, one uninterrupted `train.py` run, then one run of the same command interrupted
again and again (SIGKILL after a random delay, SIGKILL while a checkpoint is being written,
SIGTERM, SIGINT), each time rerun until it finishes. Passes when every interruption ended as it
should (SIGKILL: killed; SIGTERM/SIGINT: exit 128 + signal after saving) and the final params,
optimizer state and final metrics (timings aside) are bitwise those of the uninterrupted run.
Writes <root>/kill_campaign.json and prints a markdown table.
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {  # name -> train.py arguments (the data folder is filled in)
    "digits": ["--config", "configs/itransformer.py:digits"],
    "matlm_tiny_shakespeare": [
        "--config", "configs/matformer.py:lm_tiny_shakespeare",
        "--config.data.manual_dir={data}/tiny_shakespeare", "--config.data.data_dir={root}/tfds",
        "--config.checkpoint.every_steps=10"],
}
KINDS = ("sigkill", "sigkill_during_save", "sigterm", "sigint")


def train_command(recipe: str, workdir: str, data: str, root: str) -> list[str]:
  args = [a.format(data=data, root=root) for a in RECIPES[recipe]]
  return [sys.executable, "train.py", *args, f"--workdir={workdir}"]


def saved_steps(workdir: str) -> list[int]:
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def writing_checkpoint(workdir: str, since: float) -> bool:
  """Whether a checkpoint directory is being written (orbax's tmp name), newer than `since`."""
  path = os.path.join(workdir, "checkpoints")
  return os.path.isdir(path) and any(
      "orbax-checkpoint-tmp" in d and os.path.getmtime(os.path.join(path, d)) > since
      for d in os.listdir(path))


def interrupt(command: list[str], workdir: str, kind: str, rng: random.Random) -> dict:
  """One run of `command` interrupted the `kind` way; what happened."""
  start = time.time()
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  before = saved_steps(workdir)
  # Wait until the loop runs: a checkpoint newer than the ones this run started from.
  while proc.poll() is None and saved_steps(workdir)[-1:] == before[-1:]:
    time.sleep(0.01)
  if kind == "sigkill_during_save":
    since = time.time()
    while proc.poll() is None and not writing_checkpoint(workdir, since):
      time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.3))
  else:
    time.sleep(rng.uniform(0, 2.0))
  sig = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT}.get(kind, signal.SIGKILL)
  finished = proc.poll() is not None
  if not finished:
    proc.send_signal(sig)
  _, err = proc.communicate()
  expected = 0 if finished else (-signal.SIGKILL if sig == signal.SIGKILL else 128 + sig)
  return {"kind": kind, "finished_first": finished, "returncode": proc.returncode,
          "as_expected": proc.returncode == expected, "seconds": round(time.time() - start, 1),
          "saved_after": saved_steps(workdir)[-1:], "stderr_tail": err.strip().splitlines()[-1:]}


def final_state(workdir: str) -> tuple[dict, dict]:
  """The last checkpoint's params and optimizer state as numpy, and the final metrics."""
  import orbax.checkpoint as ocp
  step = saved_steps(workdir)[-1]
  checkpointer = ocp.StandardCheckpointer()
  arrays = {item: checkpointer.restore(os.path.join(workdir, "checkpoints", str(step), item))
            for item in ("params", "opt_state")}
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    metrics = {k: v for k, v in json.load(f).items() if k != "wall_time_sec"}
  return arrays, metrics


def bitwise_equal(a, b) -> bool:
  import jax
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(la, lb))


def campaign(recipe: str, root: str, data: str, interruptions: int, seed: int) -> dict:
  rng = random.Random(seed)
  straight, interrupted = (os.path.join(root, recipe, name) for name in ("straight", "interrupted"))
  if not os.path.exists(os.path.join(straight, "final_metrics.json")):
    subprocess.run(train_command(recipe, straight, data, root), cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
  events = []
  for i in range(interruptions):
    events.append(interrupt(train_command(recipe, interrupted, data, root), interrupted,
                            KINDS[i % len(KINDS)], rng))
    print(recipe, events[-1], flush=True)
    if events[-1]["finished_first"]:
      break
  last = subprocess.run(train_command(recipe, interrupted, data, root), cwd=REPO,
                        capture_output=True, text=True)
  (arrays_a, metrics_a), (arrays_b, metrics_b) = final_state(straight), final_state(interrupted)
  return {"recipe": recipe, "events": events, "last_returncode": last.returncode,
          "params_equal": bitwise_equal(arrays_a["params"], arrays_b["params"]),
          "opt_state_equal": bitwise_equal(arrays_a["opt_state"], arrays_b["opt_state"]),
          "metrics_equal": metrics_a == metrics_b}


def table(results: list[dict]) -> str:
  lines = ["| recipe | " + " | ".join(KINDS) + " | as expected | params | optimizer state | "
           "final metrics |", "|---|" + "---|" * (len(KINDS) + 4)]
  for r in results:
    counts = [sum(e["kind"] == k and not e["finished_first"] for e in r["events"]) for k in KINDS]
    ok = sum(e["as_expected"] for e in r["events"])
    same = ["bitwise equal" if r[k] else "DIFFERENT"
            for k in ("params_equal", "opt_state_equal", "metrics_equal")]
    lines.append(f"| {r['recipe']} | " + " | ".join(map(str, counts)) +
                 f" | {ok}/{len(r['events'])} | " + " | ".join(same) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True, help="where the runs' workdirs go")
  parser.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data"),
                      help="the folder of raw benchmark files (tiny_shakespeare/ for the LM)")
  parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
  parser.add_argument("--interruptions", type=int, default=8, help="per recipe, the kinds in turn")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  results = [campaign(r, os.path.abspath(args.root), os.path.abspath(args.data),
                      args.interruptions, args.seed) for r in args.recipes]
  with open(os.path.join(args.root, "kill_campaign.json"), "w") as f:
    json.dump(results, f, indent=2)
  print(table(results))
  passed = all(r["params_equal"] and r["opt_state_equal"] and r["metrics_equal"] and
               r["last_returncode"] == 0 and all(e["as_expected"] for e in r["events"])
               for r in results)
  sys.exit(0 if passed else 1)


if __name__ == "__main__":
  main()
