"""Tests run on CPU with 8 fake devices, so sharded steps are exercised without accelerators.

One persistent compilation cache for the whole session (a fresh folder, removed at the end):
the suite compiles the same tiny models' steps in many tests and in the CLI processes they
start, and each program is compiled once instead (the whole suite on the 2-core VM: 814 s
without it, 674 s with it). Programs are the same compiled or loaded, so no result
depends on it.
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()

# Set before JAX is imported, in pytest's first process: its workers and every subprocess a
# test starts inherit the variables, so they share the folder.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fromscratch-lm-tests-")
    os.environ["FROMSCRATCH_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("FROMSCRATCH_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
