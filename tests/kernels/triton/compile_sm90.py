"""Compile every variant of the Triton kernels for an sm_90 (H100) target without a GPU: ``triton.compile`` runs the
whole pipeline (TTIR, TTGIR, LLVM, PTX, ptxas) on this machine, so errors the interpreter cannot see (loop-carried
types, layouts, unsupported ops) show here. Not a test (minutes of CPU); run it after changing a kernel::

    PYTHONPATH=src python tests/kernels/triton/compile_sm90.py [--quick]     (--quick: bfloat16 pointers only)

Prints one line per failing variant, then ``N/M kernel variants compile for sm_90``; exits 1 if any fails.
"""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from normmatters.kernels.triton import batch_norm_kernels as B
from normmatters.kernels.triton import row_norm as RN
from normmatters.kernels.triton import running

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = {"c_const", "se", "momentum", "bessel"}
POINTERS = {"x", "ws", "y", "g", "gx"}


def signature(fn, consts, ptypes):
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a in ptypes:
            sig[a] = ptypes[a]
        elif a in POINTERS or a.endswith("_p"):
            sig[a] = "*fp32"
        elif a in FLOATS:
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
    return sig


def main() -> int:
    errors, count = [], 0

    def run(fn, consts, ptypes=None):
        nonlocal count
        count += 1
        try:
            triton.compile(ASTSource(fn=fn, signature=signature(fn, consts, ptypes or {}), constexprs=consts),
                           target=TARGET)
        except Exception as exc:  # noqa: BLE001 - report every failing variant
            errors.append(f"{fn.__name__} {consts} {ptypes}: {type(exc).__name__}: {str(exc)[-600:]}")
            print(errors[-1], flush=True)

    for dt in (["*bf16"] if "--quick" in sys.argv else ["*fp32", "*bf16"]):
        px = {"x": dt, "y": dt, "g": dt, "gx": dt}
        for rows in (True, False):
            BC, BI = (64, 64) if rows else (4, 1024)
            for mode in (1, 2, 3):
                run(B._bn_stats_kernel, dict(MODE=mode, ROWS=rows, BI=BI, BC=BC, KP=16), px)
            run(B._bn_norm_kernel, dict(ROWS=rows, BI=BI, BC=BC), px)
            for nid in range(6):
                run(B._bn_bwd_reduce_kernel, dict(NORM=nid, ROWS=rows, BI=BI, BC=BC), px)
                run(B._bn_bwd_elem_kernel, dict(NORM=nid, ROWS=rows, BI=BI, BC=BC), px)
        for nid in range(5):
            for centered in (True, False):
                spatial = 1 if centered else 4
                run(RN._row_fwd_kernel, dict(NORM=nid, CENTERED=centered, HAS_W=True, HAS_B=centered,
                                             SPATIAL=spatial, BN=1024, KP=16), px)
                run(RN._row_bwd_kernel, dict(NORM=nid, CENTERED=centered, HAS_W=True, SPATIAL=spatial, BN=1024), px)
        run(RN._row_dw_kernel, dict(BN=256), px)
    for mom_t in (True, False):
        for divides in (True, False):
            run(running._update_kernel, dict(HAS_RM=True, HAS_RV=divides, HAS_NBT=True, HAS_SKIP=True, MOM_T=mom_t,
                                       DIVIDES=divides, BC=256),
                {"nbt_p": "*i64", "skipped_p": "*i64", "status_p": "*i64"})
    print(f"{count - len(errors)}/{count} kernel variants compile for sm_90 (triton {triton.__version__})")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
