r"""Executes notebooks top to bottom in a Jupyter kernel and saves their outputs into the .ipynb files.

  pip install -e ".[notebooks]" nbclient ipykernel   # nbclient drives an ipykernel kernel
  python notebooks/regenerate.py                     # every notebook, full settings
  python notebooks/regenerate.py itransformer transnormer
  python notebooks/regenerate.py --tiny maxvit       # CI's tiny settings (ZOO_NOTEBOOK_TINY=1)
  python notebooks/regenerate.py --check             # run, report, write nothing

Full settings are the notebook as written: real models, full training runs, data and weights
downloaded when the environment gives no local copy (ETT_DIR, TINY_SHAKESPEARE_DIR, ZOO_TEST_DATA,
BIFORMER_WEIGHTS, HORNET_WEIGHTS, MAXVIT_WEIGHTS: each notebook says which it reads). Tiny
settings are what CI runs: small randomly initialised vision models, a few training steps.

Each notebook runs in a fresh kernel whose working directory is a new temporary folder (what the
notebook downloads, prepares and trains under runs/ goes there and is deleted afterwards), with
this checkout first on PYTHONPATH, so that the zoo it imports, and the install cell finds, is this
one. Plots are saved as PNG (matplotlib's inline backend, `--dpi`). Progress bars are saved as a
terminal shows them at the end (text after a carriage return replaces the line's text before it).
The script prints, and writes into the notebook's metadata (`metadata.zoo.outputs`), the settings
that produced the outputs: full or tiny, which local-data variables were set (names only),
platform and device, jax version, date and wall time. Every notebook goes to the end or the
script stops with the cell's error and leaves that notebook as it was.

The committed outputs came from a 2-core CPU machine without network access, where the vision
notebooks' weights cannot be fetched; what ran there, from the checkout's root:

  ETT_DIR=<ETT-small folder> TINY_SHAKESPEARE_DIR=<folder of input.txt> JAX_PLATFORMS=cpu \
      python notebooks/regenerate.py itransformer transnormer matformer
  JAX_PLATFORMS=cpu python notebooks/regenerate.py --tiny biformer hornet maxvit

With network access (or the weights in the Hugging Face cache), `python notebooks/regenerate.py`
runs everything at full settings.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent
REPO = NOTEBOOKS.parent
# Variables that point a notebook at local data or weights; recorded by name only (their values
# are paths of the machine that ran it).
LOCAL_INPUTS = ("ETT_DIR", "TINY_SHAKESPEARE_DIR", "ZOO_TEST_DATA", "BIFORMER_WEIGHTS",
                "HORNET_WEIGHTS", "MAXVIT_WEIGHTS", "HF_HOME", "HF_HUB_OFFLINE")
_OVERWRITTEN = re.compile(r"[^\n]*\r(?=[^\n])")   # a line's text up to its last carriage return


def terminal_text(text: str) -> str:
  """What a terminal shows of `text`: each line's last carriage-return-separated part."""
  return _OVERWRITTEN.sub("", text.replace("\r\n", "\n"))


def tidy_outputs(nb: nbformat.NotebookNode, replacements: dict[str, str]) -> None:
  """Merges a cell's consecutive stream outputs of one stream, keeps the progress bars' final
  state, and writes local paths as the notebook would name them (`replacements`)."""
  for cell in nb.cells:
    if cell.cell_type != "code":
      continue
    merged = []
    for output in cell.outputs:
      if (output.output_type == "stream" and merged and merged[-1].output_type == "stream"
          and merged[-1].name == output.name):
        merged[-1].text += output.text
      else:
        merged.append(output)
    for output in merged:
      if output.output_type == "stream":
        output.text = _replace(terminal_text(output.text), replacements)
      for key, value in output.get("data", {}).items():
        if key.startswith("text/"):
          output.data[key] = _replace(value, replacements)
    cell.outputs = [o for o in merged if o.output_type != "stream" or o.text.strip()]


def _replace(text: str, replacements: dict[str, str]) -> str:
  for old, new in replacements.items():
    text = text.replace(old, new)
  return text


# Run after the notebook in its kernel: the jax and devices that produced the outputs.
_DEVICE_PROBE = """import jax as _jax, json as _json, os as _os
_devices = _jax.devices()
_device = (f"CPU, {_os.cpu_count()} cores" if _devices[0].platform == "cpu"
           else f"{len(_devices)} x {_devices[0].device_kind}")
print(_json.dumps({"jax": _jax.__version__, "device": _device}))"""


def run(path: Path, tiny: bool, dpi: int, timeout: int, write: bool) -> dict:
  nb = nbformat.read(path, as_version=4)
  settings = "tiny" if tiny else "full"
  env = {"ZOO_NOTEBOOK_TINY": "1"} if tiny else {}
  saved_env = dict(os.environ)
  os.environ.pop("ZOO_NOTEBOOK_TINY", None)
  os.environ.pop("MPLBACKEND", None)   # the kernel's inline backend, which saves the plots
  os.environ.update(env)
  os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                           saved_env.get("PYTHONPATH")]))
  start = time.perf_counter()
  try:
    with tempfile.TemporaryDirectory(prefix=f"notebook-{path.stem}-") as workdir:
      client = NotebookClient(
          nb, timeout=timeout, kernel_name="python3", allow_errors=False, record_timing=False,
          resources={"metadata": {"path": workdir}})

      def unrecorded(source):
        # A cell run in the kernel but kept out of the notebook and its execution counts.
        nb.cells.append(nbformat.v4.new_code_cell(source))
        client.execute_cell(nb.cells[-1], len(nb.cells) - 1, store_history=False)
        return nb.cells.pop()

      with client.setup_kernel():
        unrecorded(f"import matplotlib\nmatplotlib.rcParams['figure.dpi'] = {dpi}")  # PNG size
        for index, cell in enumerate(nb.cells):
          client.execute_cell(cell, index)
        probe = unrecorded(_DEVICE_PROBE)
        device = json.loads(probe.outputs[-1].text.strip().splitlines()[-1])
      real = os.path.realpath(workdir)
      tidy_outputs(nb, {real + os.sep: "", workdir + os.sep: "", real: ".", workdir: ".",
                        str(REPO) + os.sep: ""})
  finally:
    os.environ.clear()
    os.environ.update(saved_env)
  seconds = time.perf_counter() - start
  record = {
      "settings": settings,
      "command": f"python notebooks/regenerate.py {'--tiny ' if tiny else ''}{path.stem}",
      "local_inputs": sorted(name for name in LOCAL_INPUTS if os.environ.get(name)),
      "device": device["device"], "jax": device["jax"], "python": platform.python_version(),
      "date": datetime.date.today().isoformat(), "wall_s": round(seconds),
  }
  nb.metadata.setdefault("zoo", {})["outputs"] = record
  nb.metadata.pop("widgets", None)
  if write:
    nbformat.write(nb, path)
  return record


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n", 1)[1])
  parser.add_argument("names", nargs="*", help="notebooks/<name>.ipynb to run (default: all)")
  parser.add_argument("--tiny", action="store_true",
                      help="CI's tiny settings (ZOO_NOTEBOOK_TINY=1) instead of the full ones")
  parser.add_argument("--dpi", type=int, default=80, help="resolution of the saved PNG plots")
  parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per cell")
  parser.add_argument("--check", action="store_true", help="run and report, write nothing")
  args = parser.parse_args(argv)
  available = {p.stem: p for p in sorted(NOTEBOOKS.glob("*.ipynb"))}
  unknown = [name for name in args.names if name not in available]
  if unknown:
    parser.error(f"no notebook {', '.join(unknown)}; expected some of {', '.join(available)}")
  for name in args.names or available:
    settings = "tiny settings (ZOO_NOTEBOOK_TINY=1)" if args.tiny else "full settings"
    print(f"{name}: running on {settings} ...", flush=True)
    record = run(available[name], args.tiny, args.dpi, args.timeout, write=not args.check)
    size = available[name].stat().st_size
    print(f"{name}: {record['settings']} settings, {record['wall_s']} s on {record['device']}, "
          f"jax {record['jax']}; local inputs: {', '.join(record['local_inputs']) or 'none'}; "
          f"{'checked, not written' if args.check else f'written, {size / 1e3:.0f} kB'}",
          flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
