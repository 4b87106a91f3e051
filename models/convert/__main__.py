"""python -m models.convert FAMILY SRC DST [--model NAME] [--set KEY=VALUE ...]

Converts an official `.pth`/`.pt`/`.safetensors` checkpoint into a zoo params directory (see models.pretrained).
Without --model the hyper-parameters are read from the tensor shapes; --set gives one they do not
show (e.g. `--set n_heads=4` for an iTransformer trained with 4 heads).
"""
from __future__ import annotations

import argparse
import ast
import sys

from flax import nnx


def convert_file(family: str, src, dst, *, model_name: str | None = None,
                 known: dict | None = None) -> dict:
  """Converts `src` and writes `dst`; returns the constructor kwargs of the model the params belong
  to. `known`: hyper-parameters the shapes do not show, over those of `model_name`."""
  import models
  from models.convert import get_converter, read_state_dict
  from models.pretrained import assign_params, save_params

  defaults = {}
  if model_name is not None:
    info = models.model_info(model_name)
    if info.family != family:
      raise ValueError(f"--model {model_name} is a {info.family} model, not {family}")
    defaults = dict(info.defaults)
  known = {**defaults, **(known or {})}
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
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=_setting,
                      help="a hyper-parameter the shapes do not show, e.g. n_heads=4; repeatable")
  args = parser.parse_args(argv)
  try:
    kwargs = convert_file(args.family, args.src, args.dst, model_name=args.model,
                          known=dict(args.set))
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.dst} ({args.family}, {kwargs})")
  return 0


def _setting(text: str) -> tuple[str, object]:
  """KEY=VALUE, the value a Python literal (4, 0.1, True, 'gelu') or else the text itself."""
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


if __name__ == "__main__":
  sys.exit(main())
