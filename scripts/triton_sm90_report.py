"""Compile the Triton kernels for sm_90a on a machine without a GPU and report what the compiler made of them.

    python scripts/triton_sm90_report.py            # every InfoNCE partial config (v1 and hopper), both EMAs

Per InfoNCE kernel: wgmma / mma.sync / TMA / cp.async instructions in the PTX, registers and spilled bytes
from ptxas -v (Triton's bundled ptxas), shared memory per program; per EMA kernel: the vector (v4) and
scalar global loads and stores. C=128 with 16-byte aligned pointers and strides, as training calls them.
It compiles only; nothing runs, so it says nothing of speed or correctness (the interpreter tests and the
run-time self-check do that). Must run without TRITON_INTERPRET set.
"""
import importlib
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def load(name: str):
    sys.path.insert(0, ROOT)
    return importlib.import_module(f"moco_fast.kernels.{name}")  # moco_fast/kernels links to kernels/


def compile_ptx(fn, sig: dict, constexprs: dict, options: dict, aligned=()) -> tuple[str, int]:
    sig = {**sig, **{name: "constexpr" for name in constexprs}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig) if sig[n].startswith("*") or n in aligned}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs), target=TARGET,
                            options=options)
    return kernel.asm["ptx"], kernel.metadata.shared


def ptxas(ptx: str) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True).stderr
    os.unlink(f.name)
    regs, spills = re.findall(r"Used (\d+) registers", out), re.findall(r"(\d+) bytes spill stores", out)
    return {"regs": int(regs[0]) if regs else None, "spill_B": int(spills[0]) if spills else None}


def count(ptx: str, patterns: dict) -> dict:
    return {name: len(re.findall(p, ptx)) for name, p in patterns.items()}


def infonce_report() -> None:
    v1, hop = load("infonce"), load("infonce_hopper")
    cases = [("v1 tf32", v1._infonce_partial_kernel, "fp32", "tf32", hop.Config(32, 64, 8, 3, False), True),
             ("v1 bf16", v1._infonce_partial_kernel, "bf16", "tf32", hop.Config(32, 128, 8, 3, False), True)]
    for name, c in hop.CONFIGS.items():
        fam = name.split("-")[0]
        cases.append((name, v1._infonce_partial_kernel, "bf16" if fam == "b16" else "fp32",
                      "ieee" if fam == "ieee" else "tf32", c, True))
    for name, fn, dt, precision, c, hopper in cases:
        sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "queue_ptr": f"*{dt}"}
        if hopper:
            sig["queue_desc"] = f"tensordesc<{dt}[{c.block_k}, 128]>" if c.desc else f"*{dt}"
        sig.update({"ws_acc": "*fp32", "ws_m": "*fp32", "ws_l": "*fp32", "ws_above": "*i32", "pos_ptr": "*fp32",
                    "N": "i32", "C": "i32", "K": "i32", "stride_q": "i32", "stride_k": "i32", "scale2": "fp32",
                    "P_SCALE": "fp32"})
        cst = dict(QUEUE_FP32=dt == "fp32", SPLIT_Q=False, SPLIT_P=False, PRECISION=precision, BLOCK_N=c.block_n,
                   BLOCK_K=c.block_k, BLOCK_C=128, **({"USE_DESC": c.desc} if hopper else {}))
        try:
            ptx, smem = compile_ptx(fn, sig, cst, {"num_warps": c.num_warps, "num_stages": c.num_stages},
                                    aligned=("C", "stride_q", "stride_k"))
        except Exception as err:  # noqa: BLE001 - report and go on
            print(f"{name:26s} FAILED {type(err).__name__}: {str(err)[:200]}")
            continue
        found = count(ptx, {"wgmma": r"wgmma\.mma_async", "mma.sync": r"\bmma\.sync", "tma": r"cp\.async\.bulk\.tensor",
                            "cp.async": r"cp\.async\.c[ag]"})
        print(f"{name:26s} {found} {ptxas(ptx)} smem={smem // 1024} KB", flush=True)


def ema_report() -> None:
    mu = load("momentum_update")
    sig = {"table_ptr": "*i64", "n_tensors": "i32", "m_ptr": "*i64", "m_val": "fp32", "om_val": "fp32"}
    for name, fn, extra in [("ema v1", mu._momentum_update_kernel, {}),
                            ("ema v2", mu._momentum_update_v2_kernel, {"ALIGNED": True})]:
        ptx, _ = compile_ptx(fn, sig, {"HAS_M_TENSOR": False, "BLOCK": mu._BLOCK, **extra},
                             {"num_warps": 8, "enable_fp_fusion": False})
        print(f"{name:26s}", count(ptx, {"ld.v4": r"ld\.global(\.\w+)*\.v4", "ld scalar": r"ld\.global(\.\w+)*\.b32 ",
                                         "st.v4": r"st\.global(\.\w+)*\.v4", "st scalar": r"st\.global(\.\w+)*\.b32 "}))


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: this compiles for sm_90a")
    ema_report()
    infonce_report()
