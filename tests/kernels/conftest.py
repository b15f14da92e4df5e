"""Kernel tests: Triton kernels against the pure-PyTorch references, on CPU under Triton's
interpreter.

The interpreter needs TRITON_INTERPRET=1 when triton is *first imported* (Triton decorates its
standard library -- tl.max, tl.sum, tl.cumsum -- at import, and only the interpreted form runs on
CPU tensors). torch does not import triton, vLLM does. So:

* if triton is not imported yet when this conftest loads (the usual case: ``pytest tests/kernels``
  or the whole suite, where nothing collected before ``tests/kernels`` imports vLLM), it imports
  triton here with TRITON_INTERPRET=1 and restores the variable afterwards (so vLLM engine
  processes started later by other tests do not inherit it); the kernel launcher sets it again
  around each interpreted launch. The tests run in this process.
* otherwise (triton already imported without the interpreter, e.g. by a test module that imports
  vLLM and was collected first) the in-process kernel tests are skipped and
  ``test_kernel_suite_in_subprocess`` runs this directory in a fresh interpreter process with
  TRITON_INTERPRET=1 instead, failing if any test there fails.
"""
import os
import sys

import pytest

if "triton" not in sys.modules:
    _old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except Exception:  # no triton: the interpreter tests skip below
        pass
    finally:
        if _old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _old

import hieravid_kernels  # noqa: E402

IN_PROCESS = hieravid_kernels.interpreter_ready()
SUBPROCESS_TEST = "test_kernel_suite_in_subprocess"


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    if IN_PROCESS:
        return
    reason = ("triton was imported before tests/kernels without TRITON_INTERPRET=1: these run "
              f"in a subprocess ({SUBPROCESS_TEST})")
    if not hieravid_kernels.HAS_TRITON:
        reason = "triton is not installed"
    for item in items:
        if (str(item.fspath).startswith(here) and item.get_closest_marker("interpreter")
                and item.name != SUBPROCESS_TEST):
            item.add_marker(pytest.mark.skip(reason=reason))
