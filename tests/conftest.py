"""One persistent XLA compilation cache for a test session: its pytest workers and the train.py,
eval.py and aot.py processes the tests start compile the same programs again and again (a
resumed run recompiles its step; every digits test builds the same model). Fresh each session, so
a test that counts compiles never sees an earlier session's programs."""
import os
import tempfile

# Set before any test imports jax; the workers of one session (pytest-xdist) share one run id,
# and the processes they start inherit the variables.
_SESSION = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"zoo-xla-cache-{_SESSION}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
