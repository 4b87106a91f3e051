"""The test session's set-up.

One persistent XLA compilation cache for a test session: its pytest workers and the train.py,
eval.py and aot.py processes the tests start compile the same programs again and again (a
resumed run recompiles its step; every digits test builds the same model). Fresh each session, so
a test that counts compiles never sees an earlier session's programs, and removed after it.

On the CPU (``JAX_PLATFORMS=cpu``, as the README's test command runs), XLA compiles with LLVM's
optimisations off and its older elemental emitters, unless ``XLA_FLAGS`` is set: the suite's
programs run for milliseconds and compile for seconds, and these flags take a fifth off the suite
(tests/test_hornet.py and tests/test_train.py: 177 -> 142 s). Results stay within every test's
tolerance; benchmarks and users run XLA's defaults.

On a GPU or TPU, a test that names a compiled kernel for a case the kernel refuses is skipped with
the kernel's reason (see ``device_refusal``)."""
import functools
import importlib.util
import os
import re
import shutil
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Set before any test imports jax; the workers of one session (pytest-xdist) inherit the variables
# from the process that starts them, and so do the processes the tests start.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # a cache of the user's own is kept
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="zoo-xla-cache-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
if os.environ.get("JAX_PLATFORMS") == "cpu" and "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 "
                             "--xla_cpu_use_fusion_emitters=false")


def pytest_sessionfinish(session):
  # The process that made the cache (the xdist controller, after its workers) removes it.
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)



def xla_flags(*flags: str) -> str:
  """The session's XLA_FLAGS with ``flags`` added, for the processes tests start."""
  return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()

# On a GPU or TPU, "pallas" means the compiled kernel, which refuses some shapes the interpreter
# runs (Triton's power-of-two tiles of at least 16). A test naming it for such a shape is skipped
# there with the kernel's reason; on CPU the same error fails the test.
_REFUSED = re.compile(r"implementation='pallas' cannot serve this call: (.+)")


def device_refusal(error: BaseException, backend: str) -> str | None:
  """The skip reason when `error` is a compiled kernel refusing a case on a device, else None."""
  match = _REFUSED.search(str(error)) if isinstance(error, ValueError) else None
  if match is None or backend == "cpu":
    return None
  return f"the {backend} kernel refuses this case: {match[1]}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  if call.when != "call" or call.excinfo is None or "jax" not in sys.modules:
    return
  reason = device_refusal(call.excinfo.value, sys.modules["jax"].default_backend())
  if reason is not None:
    report = outcome.get_result()
    report.outcome = "skipped"
    report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {reason}")


def eval_shape(fn, *args):
  """`nnx.eval_shape(fn, *args)` in linear time: a model's structure and shapes, no weights.

  With jax 0.10 tracing an init is quadratic in its parameters (jax-ml/jax#40041): flax's
  `Variable.set_value` probes `value.sharding` at every RNG draw, and a tracer's AttributeError
  message walks every equation traced so far. Without that message (the tracers' origin, for
  error messages only) MaxViT-B builds in 6 s instead of 30 on 2 cores."""
  from flax import nnx
  from jax._src.interpreters import partial_eval
  tracer = partial_eval.DynamicJaxprTracer
  if not hasattr(tracer, "_origin_msg"):  # a jax without it
    return nnx.eval_shape(fn, *args)
  original = tracer._origin_msg
  tracer._origin_msg = lambda self: ""
  try:
    return nnx.eval_shape(fn, *args)
  finally:
    tracer._origin_msg = original


def load_benchmark(name: str):
  """benchmarks/<name>.py as a module (the scripts are not a package; "ops" would clash)."""
  spec = importlib.util.spec_from_file_location(f"benchmark_{name}",
                                                os.path.join(REPO, "benchmarks", f"{name}.py"))
  module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # for its dataclasses
  spec.loader.exec_module(module)
  return module


@functools.cache
def load_golden(family: str, name: str):
  """(spec, official state_dict, arrays) of golden fixture `<family>/<name>` (shared/golden, beside
  the data directory that ZOO_TEST_DATA names); skips without it. Loaded once a process (the
  weights are regenerated from their seeds): callers copy what they change."""
  if "ZOO_TEST_DATA" not in os.environ:
    pytest.skip("ZOO_TEST_DATA (the shared data directory, next to golden/) is not set")
  root = os.path.join(os.environ["ZOO_TEST_DATA"], "..", "golden")
  if root not in sys.path:
    sys.path.insert(0, root)
  import golden
  return golden.load(os.path.join(root, family, name))


def tensorboard_events(logdir) -> dict:
  """{'texts': {tag: text}, 'hparams': [plugin tags]} of the TensorBoard events in `logdir`."""
  from tensorboard.backend.event_processing import event_accumulator

  events = event_accumulator.EventAccumulator(str(logdir), size_guidance={"tensors": 0})
  events.Reload()
  texts = {tag.removesuffix("/text_summary"): events.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
           for tag in events.Tags()["tensors"] if tag.endswith("/text_summary")}
  return {"texts": texts, "hparams": sorted(events.PluginTagToContent("hparams"))}
