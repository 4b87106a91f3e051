"""A timm model's forward and training-step throughput in PyTorch, one JSON line per measurement.

    /path/to/torch/python benchmarks/timm_reference.py --model maxvit_tiny_tf_224 --batch 8
    ... --serve    # build once, then measure once per line read on stdin ("measure")

benchmarks/models.py runs this in the Python given by its --torch_python (one with torch and timm;
the zoo never imports either) to put the PyTorch implementation beside the zoo's model in the same
run, in --serve mode so that zoo and timm measurements can alternate without rebuilding the model.
It measures what models.py measures on the zoo side: `model(x)` in eval mode under
`torch.inference_mode()`, and a training step (train mode, cross-entropy, backward, gradient
clipping at 1.0, AdamW lr 1e-4 weight decay 0.05), float32 NCHW, random weights, `--threads`
intra-op threads. Timing follows benchmarks/ops.py's `time_fn`: warm-up, then the median (and
p10/p90) of `--reps` samples; `cpu_per_wall` is the process's CPU time over the wall time of the
timed calls (about the number of cores kept busy).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import timm
import torch


def time_fn(fn, min_reps: int = 10, min_rep_seconds: float = 0.025) -> dict:
  """Median, p10, p90 seconds per call (the first calls left out) and the cores kept busy."""
  fn()
  start, warm = time.perf_counter(), 0
  while warm < 3 or time.perf_counter() - start < min_rep_seconds:
    fn()
    warm += 1
  inner = max(1, int(np.ceil(min_rep_seconds / max((time.perf_counter() - start) / warm, 1e-9))))
  samples = []
  wall0, cpu0 = time.perf_counter(), time.process_time()
  for _ in range(min_reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      fn()
    samples.append((time.perf_counter() - t0) / inner)
  cpu_per_wall = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
  q10, q90 = np.percentile(samples, [10, 90])
  return dict(median=statistics.median(samples), p10=float(q10), p90=float(q90),
              cpu_per_wall=cpu_per_wall)


class Reference:
  """A timm model with its batch and optimizer, ready to time."""

  def __init__(self, name: str, batch: int, image_size: int, num_classes: int,
               drop_path_rate: float):
    torch.manual_seed(0)
    self.name, self.batch = name, batch
    self.model = timm.create_model(name, pretrained=False, num_classes=num_classes,
                                   drop_path_rate=drop_path_rate)
    self.x = torch.randn(batch, 3, image_size, image_size)
    self.y = torch.randint(0, num_classes, (batch,))
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.05)

  def forward(self):
    with torch.inference_mode():
      return self.model(self.x)

  def train_step(self):
    self.optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.optimizer.step()
    return loss.item()

  def measure(self, reps: int) -> dict:
    self.model.eval()
    forward = time_fn(self.forward, reps)
    self.model.train()
    train = time_fn(self.train_step, reps)
    return dict(model=self.name, params=sum(p.numel() for p in self.model.parameters()),
                batch=self.batch, torch=torch.__version__, timm=timm.__version__,
                threads=torch.get_num_threads(),
                forward_per_s=self.batch / forward["median"], forward_ms=forward["median"] * 1e3,
                forward_p10_p90_ms=[forward["p10"] * 1e3, forward["p90"] * 1e3],
                forward_cpu_per_wall=forward["cpu_per_wall"],
                train_per_s=self.batch / train["median"], train_step_ms=train["median"] * 1e3,
                train_p10_p90_ms=[train["p10"] * 1e3, train["p90"] * 1e3],
                train_cpu_per_wall=train["cpu_per_wall"])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="a timm model name")
  parser.add_argument("--batch", type=int, required=True)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--drop_path_rate", type=float, default=0.0)
  parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
  parser.add_argument("--reps", type=int, default=10, help="timed samples per measurement")
  parser.add_argument("--serve", action="store_true",
                      help="measure once per stdin line instead of once")
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  reference = Reference(args.model, args.batch, args.image_size, args.num_classes,
                        args.drop_path_rate)
  for _ in sys.stdin if args.serve else [None]:
    print(json.dumps(reference.measure(args.reps)), flush=True)


if __name__ == "__main__":
  main()
