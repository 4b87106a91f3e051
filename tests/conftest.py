"""One persistent XLA compilation cache for a test session: its pytest workers and the train.py,
eval.py and aot.py processes the tests start compile the same programs again and again (a
resumed run recompiles its step; every digits test builds the same model). Fresh each session, so
a test that counts compiles never sees an earlier session's programs, and removed after it."""
import os
import shutil
import tempfile

# Set before any test imports jax; the workers of one session (pytest-xdist) inherit the variables
# from the process that starts them, and so do the processes the tests start.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # a cache of the user's own is kept
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="zoo-xla-cache-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session):
  # The process that made the cache (the xdist controller, after its workers) removes it.
  if _OWN_CACHE and not hasattr(session.config, "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
