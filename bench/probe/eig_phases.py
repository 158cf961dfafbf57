"""Where the r x r kernel's time goes: clock64() per phase of csrc/balance_math.cuh, on the device.

Builds an instrumented copy of csrc/balance.cu (the same math; thread 0 of each block adds the clock cycles
since the previous mark to that phase's counter) as a plain CUDA shared library, so no torch extension build
is needed, then runs it on the Grams of balanced Llama-2-7B adapters (the benchmark's steady state) and prints
the mean cycles per pair of each phase and the kernel time (CUDA events) next to the uninstrumented copy, to
the launch-shape VARIANTS of the working tree and (with --baseline) to another tree's csrc/; each case says
whether every build wrote the same bits as the working tree's.

    python bench/probe/eig_phases.py --build-only --out .bkcache/eig_phases   # here (nvcc, no GPU needed)
    python bench/probe/eig_phases.py --lib .bkcache/eig_phases                # on the device
    python bench/probe/eig_phases.py --lib .bkcache/eig_phases --ranks 48,64 --pairs 224,112
      (--pairs: time the first P of the 224 adapters too; the r x r kernel's launch shape depends on P)
"""
import argparse
import ctypes
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# (the fp32 write of T, T^-1 at the end of a pair is not counted in any phase). In the nearest mode full-rank
# pairs take the Newton inverse fourth root (inv_fourth_root_ns), which returns before the eigendecomposition's
# marks: their time is in the "NS: ..." phases (M = L^T G_A L is in "NS: M, bound"; "M=L^T G_A L" and "jacobi
# eig(M)" read 0). (In session 17's first log the labels "NS: root's last X S (+ gate)" and "NS: T, T^-1" stood for
# what are now "NS: root's last X S" and "NS: gate, T, T^-1".)
# (Since session 18 the gap after is computed right after C, from T before the rotation: its products are in "C,
# gap_after", and "T Q" holds T Q, Q^T T^-1 and the guard; before, those phases were "C" and "T Q, gap_after".)
PHASES = ["load+gap_before", "cholesky", "M=L^T G_A L", "jacobi eig(M)", "T, T^-1", "C + polar", "T Q",
          "(reset)", "NS: M, bound", "NS: root's last X S", "(unused)", "NS: gate, T, T^-1", "C, gap_after",
          "NS steps: X N, N^2", "NS steps: S^4, S^4 N, sums"]
NSLOT = 16
# Launch-shape variants of the working tree's kernel, timed beside it: (name, nvcc flags).
# (cols_consecutive, -DBK_MATMUL_STRIDED_COLS=0, was dropped in session 15: the GPU kernels' products left matmul_tiles)
VARIANTS = [("never_one_per_sm", ["-DBK_BLOCKED_ONE_PER_SM=0"]),
            ("legacy_carve", ["-DBK_CARVE_LEGACY=1"]),
            ("max_mats_0", ["-DBK_BLOCKED_MAX_MATS=0"]),     # ranks >= 33: all matrices in global memory (L1)
            ("max_mats_1", ["-DBK_BLOCKED_MAX_MATS=1"]),
            ("max_mats_3", ["-DBK_BLOCKED_MAX_MATS=3"]),
            ("no_fixed_64", ["-DBK_FIXED_N64=0"]),          # r = 64 by the run-time-rank kernel
            ("cuda_core_products", ["-DBK_TENSOR_F64=0"]),  # every product on the CUDA cores (matmul_tiles)
            ("unscaled", ["-DBK_NS_SCALE_CAP=1.0"]),         # Newton-Schulz iterations without bk::ns_scale
            ("dmma_m8n8k4", ["-DBK_DMMA_K=0"]),             # the blocked products by m8n8k4 (before session 18)
            ("dmma_k8", ["-DBK_DMMA_K=8"]),                 # by m16n8k8
            ("dmma_k16", ["-DBK_DMMA_K=16"])]               # by m16n8k16
JOBS = int(os.environ.get("JOBS", "2"))

# (anchor in balance_math.cuh, phase that ends at the anchor): a mark is inserted before each anchor.
MARKS = [
    ("  // Cholesky, column by column: L into Y", 0),
    ("  // M = L^T G_A L, symmetrized, and its eigendecomposition (ascending).", 1),
    ("  sym_eig(c, b.AW, b.VW, b.M1, c.v1, n);\n  const double lmin", 2),
    ("  const double lmin = c.v1[0], lmax = c.v1[n - 1];", 3),
    ("  // 5. C = T^T G_B + T^-1 G_A.", 4),
    ("  double* Q = b.M2;\n  double* Tq = b.M1;", 5),
    ("  write_out(c, outT, R, Tq, n);", 6),
    # finer marks of the Newton-Schulz fast path (their phases then hold parts of "T, T^-1" / "C + polar")
    ("  double* buf[6] = {b.M1, b.M2, b.M3, b.VW, b.W, b.T};", 8),
    ("  // M^-1/4 = bound^-1/4 X (symmetrized) into M1", 9),
    ("  if (mode == 0) {\n    if (!polar_ns(", 12),
    # inside inv_fourth_root_ns's loop: its two halves (the phase "NS: root's last X S" then holds only the rest)
    ("    matmul(c, S4, S2, false, S2, false, n, n, n, n, n);           // S^4", 13),
    ("    double* tmp = N; N = Nn; Nn = tmp;", 14),
]
# marks that end a phase at the end of a block (appended after the anchor)
MARKS_AFTER = [
    ("  mm(c, b.T, b.M2, false, b.M3, false, n);                       // T\n  return true;", 11),
]


def build(out, baseline=None, variants=True, only=None):
    """prof: the instrumented working tree; plain: the working tree; base: csrc/ of another tree (optional).
    only: build just these names (e.g. some variants, added to an earlier build's folder)."""
    os.makedirs(out, exist_ok=True)
    src = open(os.path.join(ROOT, "csrc", "balance_math.cuh")).read()
    hook = ('__device__ unsigned long long bk_prof[16 * 8192];\n__device__ unsigned long long bk_last[8192];\n'
            '__device__ __forceinline__ void bk_mark(int ph) {\n  __syncthreads();\n'
            '  if (threadIdx.x == 0) {\n    const unsigned long long now = clock64();\n'
            '    bk_prof[16 * blockIdx.x + ph] += now - bk_last[blockIdx.x];\n    bk_last[blockIdx.x] = now;\n  }\n'
            '  __syncthreads();\n}\n')
    src = src.replace("namespace bk {", hook + "namespace bk {", 1)
    for anchor, ph in MARKS:
        assert src.count(anchor) == 1, anchor
        src = src.replace(anchor, f"  bk_mark({ph});\n" + anchor)
    for anchor, ph in MARKS_AFTER:
        assert src.count(anchor) == 1, anchor
        head, tail = anchor.split("  return true;", 1)
        src = src.replace(anchor, head + f"  bk_mark({ph});\n  return true;" + tail)
    # the pair starts: reset the clock at the top of balance_pair
    anchor = "  const int n = c.n;\n  c.ns_steps = 0;"
    assert src.count(anchor) == 1
    src = src.replace(anchor, "  bk_mark(7);\n" + anchor)
    open(os.path.join(out, "balance_math.cuh"), "w").write(src)
    cu = open(os.path.join(ROOT, "csrc", "balance.cu")).read()
    cu += ('\nextern "C" int bk_prof_read(unsigned long long* host, int n) {\n'
           '  return (int)cudaMemcpyFromSymbol(host, bk_prof, sizeof(unsigned long long) * n);\n}\n'
           'extern "C" int bk_prof_reset() {\n  static unsigned long long zeros[16 * 8192];\n'
           '  return (int)cudaMemcpyToSymbol(bk_prof, zeros, sizeof(zeros));\n}\n')
    open(os.path.join(out, "balance.cu"), "w").write(cu)
    for f in ("balance_kernel.cuh", "balance_fixed.cu", "launch_config.h"):   # the rest of the sources, as they are
        if os.path.exists(os.path.join(ROOT, "csrc", f)):
            open(os.path.join(out, f), "w").write(open(os.path.join(ROOT, "csrc", f)).read())
    # one translation unit, so that the fixed-rank kernels add to the same bk_prof as the others
    fixed = os.path.exists(os.path.join(out, "balance_fixed.cu"))
    with open(os.path.join(out, "prof_all.cu"), "w") as f:
        f.write('#include "balance.cu"\n' + '#include "balance_fixed.cu"\n' * fixed)
    builds = [("prof", out, []), ("plain", os.path.join(ROOT, "csrc"), [])]
    builds += [("base", baseline, [])] * bool(baseline)
    builds += [(name, os.path.join(ROOT, "csrc"), flags) for name, flags in VARIANTS if variants]
    if only:
        builds = [b for b in builds if b[0] in only]
    procs = []
    for name, d, flags in builds:
        cus = [os.path.join(d, f) for f in ("balance.cu", "balance_fixed.cu") if os.path.exists(os.path.join(d, f))]
        if name == "prof":
            cus = [os.path.join(d, "prof_all.cu")]
        procs.append(subprocess.Popen(["nvcc", "-O3", "-std=c++17", "-arch=sm_90", "-shared", "-Xcompiler", "-fPIC",
                                       "-I", d] + flags + cus + ["-o", os.path.join(out, f"libbk_{name}.so")]))
        if len(procs) >= JOBS:
            assert procs.pop(0).wait() == 0
    assert all(p.wait() == 0 for p in procs)
    print("built", out)


def run(libdir, ranks=(8, 16, 64), pairs=(224,)):
    import torch
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_projection import MODELS, llama_shapes
    from balora_kernels import reference
    from balora_kernels.ops.grouped_projection import padded_rank
    dev = torch.device("cuda")
    vp, ip = ctypes.c_void_p, ctypes.c_int
    names = ["plain", "prof", "base"] + [name for name, _ in VARIANTS]
    libs = {k: ctypes.CDLL(os.path.join(libdir, f"libbk_{k}.so")) for k in names
            if os.path.exists(os.path.join(libdir, f"libbk_{k}.so"))}
    if "plain" not in libs or "prof" not in libs:
        raise SystemExit(f"{libdir} needs libbk_plain.so and libbk_prof.so (run with --build-only first)")
    res = {"gpu": torch.cuda.get_device_name(), "phases": PHASES, "cases": []}
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for r in ranks:
        torch.manual_seed(r)
        shapes = llama_shapes(**MODELS["llama2-7b"])
        GB, GA = [], []
        for (o, i) in shapes:
            A = torch.randn(r, i, device=dev, dtype=torch.float64) / math.sqrt(i)
            B = torch.randn(o, r, device=dev, dtype=torch.float64) * 1e-2
            A, B = reference.balance(A, B)                  # the benchmark's steady state: balanced pairs
            A, B = A.float(), B.float()
            GB.append(B.T @ B)
            GA.append(A @ A.T)
        P_all, R = len(shapes), padded_rank(r)
        grams_all = torch.zeros(P_all, 2, R, R, device=dev)
        grams_all[:, 0, :r, :r] = torch.stack(GB)
        grams_all[:, 1, :r, :r] = torch.stack(GA)
        for P in pairs:
            grams = grams_all[:P].contiguous()
            eps = torch.full((P,), 2.0 ** -24, device=dev, dtype=torch.float64)
            case = {"r": r, "pairs": P}
            for name, lib in libs.items():
                th, gr, sm, ms = ip(), ip(), ip(), ip()
                scr = ctypes.c_longlong()
                lib.bk_balance_config(P, r, sms, ctypes.byref(th), ctypes.byref(gr), ctypes.byref(sm), ctypes.byref(ms),
                                      ctypes.byref(scr))
                scratch = torch.empty(scr.value, device=dev, dtype=torch.float64)
                tw = torch.empty(P, 2, R, R, device=dev)
                st = torch.empty(P, device=dev, dtype=torch.int32)
                gaps = torch.empty(P, 2, device=dev, dtype=torch.float64)

                def launch():
                    err = lib.bk_balance_launch(vp(grams.data_ptr()), vp(eps.data_ptr()), P, r, R, 0, vp(tw.data_ptr()),
                                                vp(st.data_ptr()), vp(gaps.data_ptr()), vp(scratch.data_ptr()), th, gr,
                                                sm, ms, vp(0))
                    assert err == 0, err
                launch()
                torch.cuda.synchronize()
                if name == "prof":
                    lib.bk_prof_reset()
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
                reps = 20
                ev[0].record()
                for _ in range(reps):
                    launch()
                ev[1].record()
                torch.cuda.synchronize()
                case[f"{name}_ms"] = ev[0].elapsed_time(ev[1]) / reps
                case[f"{name}_status_full_rank"] = int(((st & 7) == 0).sum())
                case[f"{name}_gap_after_max"] = float(gaps[:, 1].max())
                if name == "plain":
                    ref_tw, ref_gaps = tw.clone(), gaps.clone()
                else:
                    case[f"{name}_bitwise_equal_plain"] = bool(torch.equal(tw, ref_tw))
                    # the gaps (before, after) against the working tree's: largest difference relative to the gap
                    rel = (gaps - ref_gaps).abs() / ref_gaps.abs().clamp_min(1e-300)
                    case[f"{name}_gaps_max_rel_diff"] = [float(rel[:, 0].max()), float(rel[:, 1].max())]
                if name == "prof":
                    buf = (ctypes.c_ulonglong * (NSLOT * 8192))()
                    assert lib.bk_prof_read(buf, NSLOT * 8192) == 0
                    per = [0.0] * NSLOT
                    for b in range(min(gr.value, P)):
                        for ph in range(NSLOT):
                            per[ph] += buf[NSLOT * b + ph]
                    n_runs = reps * P
                    case["cycles_per_pair"] = {PHASES[ph]: per[ph] / n_runs for ph in range(len(PHASES)) if ph != 7}
                    case["threads"], case["grid"], case["mats_in_smem"] = th.value, gr.value, ms.value
            res["cases"].append(case)
            print(json.dumps(case))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, ".bkcache", "eig_phases"))
    ap.add_argument("--lib", default=None)
    ap.add_argument("--baseline", default=None, help="a csrc/ folder to build as 'base' beside the working tree")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-variants", action="store_true", help="build only prof, plain (and base)")
    ap.add_argument("--only", default="", help="build only these (comma-separated: prof, plain, base or a VARIANTS name)")
    ap.add_argument("--ranks", default="8,16,64", help="ranks to time (comma-separated)")
    ap.add_argument("--pairs", default="224", help="numbers of pairs (the first of the 7B adapters) to time")
    a = ap.parse_args()
    if a.build_only:
        build(a.out, a.baseline, not a.no_variants, set(a.only.split(",")) - {""})
    else:
        res = run(a.lib or a.out, tuple(int(r) for r in a.ranks.split(",")), tuple(int(p) for p in a.pairs.split(",")))
        if a.json:
            json.dump(res, open(a.json, "w"), indent=1)
