"""python -m models.convert FAMILY SRC DST [--model NAME] [--n-heads H]

Converts an official `.pth`/`.pt`/`.safetensors` checkpoint into a zoo params directory (see models.pretrained).
Without --model the hyper-parameters are read from the tensor shapes.
"""
from __future__ import annotations

import argparse
import sys

from flax import nnx


def convert_file(family: str, src, dst, *, model_name: str | None = None, n_heads: int | None = None) -> dict:
  """Converts `src` and writes `dst`; returns the constructor kwargs of the model the params belong to."""
  import models
  from models.convert import get_converter, read_state_dict
  from models.pretrained import assign_params, save_params

  known = {}
  if model_name is not None:
    info = models.model_info(model_name)
    if info.family != family:
      raise ValueError(f"--model {model_name} is a {info.family} model, not {family}")
    known = dict(info.defaults)
  if n_heads is not None:
    known["n_heads"] = n_heads
  params, model_class, kwargs = get_converter(family)(read_state_dict(src), **known)
  model = nnx.eval_shape(lambda: model_class(**kwargs, rngs=nnx.Rngs(0)))  # structure only, no init
  assign_params(model, params)  # checks the converted tree against the real module structure
  save_params(model, dst, name=model_name, kwargs=kwargs)
  return kwargs


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m models.convert", description=__doc__.split("\n\n")[1])
  parser.add_argument("family", help="model family, e.g. itransformer")
  parser.add_argument("src", help="official checkpoint: .pth, .pt, .safetensors, flax msgpack")
  parser.add_argument("dst", help="output params directory (must not exist)")
  parser.add_argument("--model", help="registered variant the checkpoint belongs to, e.g. itransformer_etth1_96")
  parser.add_argument("--n-heads", type=int, help="attention heads (not visible in the shapes; default 8)")
  args = parser.parse_args(argv)
  try:
    kwargs = convert_file(args.family, args.src, args.dst, model_name=args.model, n_heads=args.n_heads)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.dst} ({args.family}, {kwargs})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
