"""Ahead-of-time compile of every kernel variant for an NVIDIA target, no GPU needed.

``python -m hieravid_kernels._compile_check [--arch 90] [--quiet]`` runs Triton's whole NVIDIA
pipeline (Python AST -> TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas) for the
launch configurations the dispatch uses, and prints each kernel's registers / spill stack from
the cubin. The interpreter tests check what the kernels compute; this checks that they compile
for the GPU (it catches what the interpreter lets through: types of loop-carried values,
constexpr misuse, register spills). Must run in a process where TRITON_INTERPRET is unset.
Exit status 1 when a variant fails to compile.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile


_DIV16_INTS = ("C", "s_hs", "s_hn")


def _variants():
    from . import dpp, merge, similarity
    out = []
    for dt in ("*bf16", "*fp16", "*fp32"):
        out.append((similarity._similarity_kernel,
                    {"F": dt, "S": "*fp32", "T": "i32", "P": "i32", "C": "i32", "eps": "fp32"},
                    {"BLOCK_T": 4, "BLOCK_P": 8, "BLOCK_C": 128}, 4))
        out.append((merge._merge_features_kernel,
                    {"F": dt, "STATIC": "*u8", "SRC2KEPT": "*i64", "OUT": dt, "T": "i32",
                     "P": "i32", "C": "i32"},
                    {"BLOCK_P": 16, "BLOCK_C": 128, "BF16_RNE": False}, 4))
        out.append((dpp._gram_kernel,
                    {"H": dt, "W": "*fp32", "G": "*fp32", "LENGTHS": "*i64", "n_max": "i32",
                     "C": "i32", "scale": "fp32", "s_hs": "i32", "s_hn": "i32", "s_ws": "i32"},
                    {"HAS_W": True, "IEEE": dt == "*fp32", "EVEN_K": True, "BLOCK_M": 128,
                     "BLOCK_N": 128, "BLOCK_K": 64}, 8))
        out.append((dpp._gram_kernel,
                    {"H": dt, "W": "*fp32", "G": "*fp32", "LENGTHS": "*i64", "n_max": "i32",
                     "C": "i32", "scale": "fp32", "s_hs": "i32", "s_hn": "i32", "s_ws": "i32"},
                    {"HAS_W": False, "IEEE": dt == "*fp32", "EVEN_K": False, "BLOCK_M": 64,
                     "BLOCK_N": 64, "BLOCK_K": 64}, 4))
    for has_fseg, bt, bp in ((True, 8, 256), (True, 4, 512), (False, 1, 2048)):
        out.append((merge._merge_index_kernel,
                    {"STATIC": "*u8", "FSEG": "*i64", "FLAT": "*i64", "THW": "*i64",
                     "SEG": "*i64", "RUNLEN": "*i64", "SRC2KEPT": "*i64", "T": "i32",
                     "P": "i32", "W": "i32"},
                    {"HAS_FSEG": has_fseg, "BLOCK_T": bt, "BLOCK_P": bp}, 8))
    sig = {"G": "*fp32", "H": "*bf16", "W": "*fp32", "FB": "*fp32", "LENGTHS": "*i64",
           "KS": "*i64", "SEL": "*i64", "CBUF": "*fp32", "D2": "*fp32", "FBBUF": "*fp32",
           "RUN_IF": "*i32", "n_max": "i32", "k_max": "i32", "C": "i32", "scale": "fp32", "eps": "fp32",
           "rel_eps": "fp32", "s_hs": "i32", "s_hn": "i32", "s_ws": "i32", "s_fs": "i32"}
    for from_gram, has_fb, bn, cond in ((True, True, 256, False), (True, False, 256, False),
                                        (False, True, 128, False), (True, True, 256, True)):
        out.append((dpp._greedy_kernel, sig,
                    {"FROM_GRAM": from_gram, "HAS_W": not from_gram, "HAS_FB": has_fb,
                     "CONDITIONAL": cond, "BLOCK_N": bn, "BLOCK_S": 32, "BLOCK_C": 32}, 8))
    from . import dpp_coop
    coop = {"G": "*fp32", "FB": "*fp32", "LENGTHS": "*i64", "KS": "*i64", "SEL": "*i64",
            "CBUF": "*fp32", "D2": "*fp32", "SLOTV": "*fp32", "SLOTI": "*i32", "BAR": "*i32",
            "ERR": "*i32", "n_max": "i32", "k_max": "i32", "eps": "fp32", "rel_eps": "fp32",
            "max_spins": "i32", "P": "i32", "SPAN": "i32"}
    for bn, bp in ((64, 128), (128, 256)):
        out.append((dpp_coop._greedy_coop_kernel, coop,
                    {"BLOCK_N": bn, "BLOCK_S": 32, "BLOCK_P": bp}, 4))
    return out


def _usage(ptx: str, arch: int) -> str:
    """Registers / stack / spills as reported by ``ptxas -v`` on the kernel's PTX."""
    import triton
    if not ptx:
        return ""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    txt = ""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for name in ("ptxas", "ptxas-blackwell"):     # the one that knows this PTX version
            tool = os.path.join(bindir, name)
            if not os.path.exists(tool):
                continue
            r = subprocess.run([tool, f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}",
                                "-v", src, "-o", os.path.join(d, "k.cubin")],
                               capture_output=True, text=True)
            if r.returncode == 0:
                txt = r.stderr + r.stdout
                break
    regs = re.search(r"Used (\d+) registers", txt)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", txt)
    stack = re.search(r"(\d+) bytes stack frame", txt)
    if not regs:
        return ""
    return (f"regs {regs.group(1)} stack {stack.group(1) if stack else '?'} B "
            f"spills {spill.group(1) if spill else '?'}/{spill.group(2) if spill else '?'} B")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for fn, sig, consts, warps in _variants():
        full = dict(sig)
        full.update({k: "constexpr" for k in consts})
        name = f"{fn.__name__}[{','.join(f'{k}={v}' for k, v in consts.items())}]"
        jf = triton.jit(fn)
        # what a launch specialises on realistic shapes: 16-byte aligned pointers, channel
        # counts and row strides divisible by 16 (e.g. C = 3584)
        attrs = {(jf.arg_names.index(a),): [["tt.divisibility", 16]]
                 for a, ty in sig.items() if ty.startswith("*") or a in _DIV16_INTS}
        try:
            k = triton.compile(ASTSource(jf, full, consts, attrs=attrs), target=target,
                               options={"num_warps": warps})
            info = _usage(k.asm.get("ptx", ""), args.arch)
            if not args.quiet:
                print(f"ok    {name} {sig.get('F') or sig.get('H') or ''} {info}")
        except Exception as e:  # report every failure, then fail
            failed += 1
            print(f"FAIL  {name}: {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
