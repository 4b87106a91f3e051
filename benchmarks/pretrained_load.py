"""What a second load of the same pretrained weights costs: the converted copy against converting.

    python benchmarks/pretrained_load.py --golden ../shared/golden --json out.json

MaxViT-T (`maxvit_tiny_tf_224.in1k`): the golden fixture's state dict is saved as timm's
model.safetensors in a fresh, offline Hugging Face cache (the layout huggingface_hub writes), then
`models.load_pretrained(model, name)` runs `--rounds` times into one built model: the first call
converts and writes the converted copy, the others read it. Each row: seconds per call (median
over the calls of its kind), and the converter's calls counted.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NAME = "maxvit_tiny_tf_224.in1k"


def fake_cache(root: Path, golden: Path) -> None:
  """timm's file of NAME in an offline HF cache at `root`, from the golden fixture."""
  import numpy as np
  from huggingface_hub import constants
  from safetensors.numpy import save_file
  sys.path.insert(0, str(golden))
  import golden as golden_fixtures
  _, state_dict, _ = golden_fixtures.load(str(golden / "maxvit" / "maxvit_tiny_tf_224"))
  repo = root / f"models--timm--{NAME}"
  commit = hashlib.sha1(NAME.encode()).hexdigest()
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(commit)
  (repo / "snapshots" / commit).mkdir(parents=True)
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
            str(repo / "snapshots" / commit / "model.safetensors"))
  constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(root), True


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--golden", type=Path, required=True, help="the golden fixtures' directory")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--json", type=Path)
  args = parser.parse_args(argv)

  import jax
  import models
  from models import maxvit

  with tempfile.TemporaryDirectory() as root:
    fake_cache(Path(root), args.golden.resolve())
    calls = []
    convert = maxvit.checkpoint_filter_fn
    maxvit.checkpoint_filter_fn = lambda *a, **k: calls.append(1) or convert(*a, **k)
    model = models.create_model(NAME.partition(".")[0])
    times, conversions = [], []
    for _ in range(args.rounds):
      start = time.perf_counter()
      jax.block_until_ready(models.load_pretrained(model, NAME))
      times.append(time.perf_counter() - start)
      conversions.append(len(calls) - sum(conversions))
    maxvit.checkpoint_filter_fn = convert
    rows = [dict(load="first (convert, write the copy)", seconds=round(times[0], 3),
                 conversions=conversions[0]),
            dict(load="later (read the copy)", seconds=round(statistics.median(times[1:]), 3),
                 conversions=sum(conversions[1:]))]
  for row in rows:
    print(f"{row['load']:>32}: {row['seconds']:.3f} s, {row['conversions']} conversions")
  if args.json:
    environment = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       command=shlex.join(["python", *sys.argv]), jax=jax.__version__,
                       device=str(jax.devices()[0]), cores=os.cpu_count())
    args.json.write_text(json.dumps(dict(environment=environment, model=NAME, rows=rows),
                                    indent=1))


if __name__ == "__main__":
  main()
