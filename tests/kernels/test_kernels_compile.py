"""The kernels compile for the GPU: Triton's NVIDIA pipeline down to an sm_90 cubin with the
bundled ptxas, no GPU needed (catches what the interpreter lets through). Runs in a subprocess
because this process imported triton in interpreter mode."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90():
    try:
        import triton
    except ImportError:
        pytest.skip("triton is not installed")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this triton has no NVIDIA backend / ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"      # silences triton 3.9's default-change warning
    proc = subprocess.run([sys.executable, "-m", "hieravid_kernels._compile_check"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "spills 0/0 B" in proc.stdout, proc.stdout
    spills = [l for l in proc.stdout.splitlines() if " spills " in l and "spills 0/0 B" not in l]
    assert not spills, "register spills:\n" + "\n".join(spills)
