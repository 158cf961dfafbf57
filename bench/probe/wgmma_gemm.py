"""Probe (#4): bench/probe/wgmma_gemm.cu's hand-written Hopper GEMM with the LoRA rank-r term (TMA + wgmma,
warp-specialised, persistent) against cuBLAS's plain ``x W^T`` and the package's Triton TMA GEMM
(``lora_gemm(..., tma=True)``), in interleaved rounds (median of each), after a correctness check of every
variant (outputs poisoned first; error against float64 within 2x cuBLAS's own in the same dtype).

    nvcc -gencode arch=compute_90a,code=sm_90a -O3 -std=c++17 -shared -Xcompiler -fPIC \\
        -o .bkcache/wgmma/wgmma_gemm.so bench/probe/wgmma_gemm.cu          # here (no GPU needed)
    python3 bench/probe/wgmma_gemm.py --lib .bkcache/wgmma/wgmma_gemm.so --out DIR   # on the device
"""
import argparse
import ctypes
import json
import os
import statistics

import torch
import triton

from balora_kernels.ops import lora_linear as ll

# stages + 10 * wait depth + 100 * epilogue (0 registers, 1 TMA store, 2 none) + 1000 * cluster of 2
# + 10000 * K steps of 32 + 100000 * ping-pong consumers (64-row tiles)
# + 1000000 * rank and K steps as two loops. Those with two loops (codes >= 1000000, the ping-pong ones among them)
# hung in their first check on the H200 in session 30, cause not found (bench/results/logs/session30-*): run them
# only under `timeout -s ABRT` (bench/probe/session30_probe.sh).
DEFAULT_VARIANTS = (114, 1114, 1104)   # (--variants: others; the logs' sets differ by run)


def variant_name(code):
    epi = {0: " reg-epi", 1: "", 2: " no-epi"}[code // 100 % 10]
    return (f"s{code % 10} k{32 if code // 10000 % 10 else 64} w{code // 10 % 10}"
            + (" c2" if code // 1000 % 10 else "") + (" ping" if code // 100000 % 10 else "")
            + (" split" if code // 1000000 % 10 else "") + epi)


def timing_only(code):
    """Variants that store no output (what the epilogue costs): timed, not checked."""
    return code // 100 % 10 == 2


VARIANTS = {variant_name(v): v for v in DEFAULT_VARIANTS}


def load(path):
    lib = ctypes.CDLL(path)
    lib.wg_set_diag.argtypes = [ctypes.c_void_p]
    lib.wg_lora_fwd.restype = ctypes.c_int
    lib.wg_lora_fwd.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 6 + [ctypes.c_int] * 4 + \
        [ctypes.c_long] * 5 + [ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return lib


def ours(lib, variant, x, w, u, q, bias, y, s, group_m=8, grid=None):
    M, K = x.shape
    N, R = q.shape
    assert w.shape == (N, K) and u.shape == (M, R) and y.shape == (M, N) and (bias is None or bias.shape == (N,))
    assert all(t.stride(-1) == 1 and t.dtype == x.dtype for t in (x, w, u, q, y)), "row-major operands of one dtype"
    grid = grid or torch.cuda.get_device_properties(x.device).multi_processor_count
    err = lib.wg_lora_fwd(
        variant, 1 if x.dtype == torch.bfloat16 else 2, ctypes.c_void_p(x.data_ptr()),
        ctypes.c_void_p(w.data_ptr()), ctypes.c_void_p(u.data_ptr()), ctypes.c_void_p(q.data_ptr()),
        ctypes.c_void_p(bias.data_ptr() if bias is not None else 0), ctypes.c_void_p(y.data_ptr()),
        M, N, K, R, x.stride(0), w.stride(0), u.stride(0), q.stride(0), y.stride(0), ctypes.c_float(s),
        group_m, grid, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
    if err:
        raise RuntimeError(f"wg_lora_fwd returned {err}")
    return y


DIAG = None   # pinned int32 words the kernel's hung waits record themselves in (--diag)


def sync_or_report():
    """torch.cuda.synchronize(); with --diag, a launch that trapped on a wait that never ended prints where each
    recorded thread waited (the barrier's offset in the 1024-byte-aligned block: full[s] at 8 s, empty[s] at 32 + 8 s)
    and exits (the CUDA context is lost)."""
    try:
        torch.cuda.synchronize()
    except RuntimeError:
        if DIAG is None:
            raise
        n = int(DIAG[0])
        print(f"launch failed; {n} hung wait(s) recorded:")
        for k in range(min(n, 1024)):
            blk, thr, addr, par = (int(v) & 0xFFFFFFFF for v in DIAG[1 + 4 * k: 5 + 4 * k])
            off = addr % 1024
            bar = f"full[{off // 8}]" if off < 32 else f"empty[{(off - 32) // 8}]"
            print(f"  block {blk} thread {thr} (warpgroup {thr // 128}) on {bar} parity {par}")
        raise SystemExit(3)


def rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def check(lib, M, K, N, R, dtype, bias_on, s=2.0):
    g = torch.Generator(device="cuda").manual_seed(M * 7 + K * 3 + N + R)
    x, w, u, q, _ = operands(M, K, N, R, dtype, g)
    b = torch.randn(N, device="cuda", dtype=dtype, generator=g) if bias_on else None
    ref = x.double() @ w.double().T + s * (u.double() @ q.double().T)
    if b is not None:
        ref += b.double()
    plain = x @ w.T + s * (u @ q.T)
    if b is not None:
        plain = plain + b
    out = {"plain": rel(plain, ref)}
    for name, v in VARIANTS.items():
        if timing_only(v):
            continue
        y = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
        print(f"  checking {name}", flush=True)
        ours(lib, v, x, w, u, q, b, y, s)
        sync_or_report()
        out[name] = rel(y, ref) if torch.isfinite(y).all() else float("nan")
    # u taken pre-scaled (s = 2: s u is exact in the same dtype), the kernel told s = 1: no scaling step
    y = torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
    ours(lib, 1114, x, w, u * s, q, b, y, 1.0)
    sync_or_report()
    out["prescaled c2"] = rel(y, ref) if torch.isfinite(y).all() else float("nan")
    ok = all(out[n] <= 2 * out["plain"] for n in out if n != "plain")
    return ok, out


def operands(M, K, N, R, dtype=torch.bfloat16, generator=None):
    """Fresh random x [M, K], W [N, K], u [M, R], B [N, R] (scaled so that y stays O(1)) and an empty y [M, N]."""
    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=generator)
    return rnd(M, K), rnd(N, K) / K ** 0.5, rnd(M, R), rnd(N, R) / R ** 0.5, \
        torch.empty(M, N, device="cuda", dtype=dtype)


def bench_case(lib, M, K, N, R, rounds, dtype=torch.bfloat16, s=2.0):
    x, w, u, q, y = operands(M, K, N, R, dtype)
    prov = {
        "cublas xW^T": lambda: torch.mm(x, w.T, out=y),
        "cublas beta=1": lambda: y.addmm_(x, w.T),
        "triton tma cfg0": lambda: ll.lora_gemm(x, w.T, u, q.T, s, out=y, config=0, tma=True),
        "triton tma cfg3": lambda: ll.lora_gemm(x, w.T, u, q.T, s, out=y, config=3, tma=True),
    }
    for name, v in VARIANTS.items():   # s = 2, and s = 1 (u taken pre-scaled: no drain before the scaling)
        prov[f"wgmma {name}"] = (lambda v=v: ours(lib, v, x, w, u, q, None, y, s))
        prov[f"wgmma {name} s=1"] = (lambda v=v: ours(lib, v, x, w, u, q, None, y, 1.0))
    times = {k: [] for k in prov}
    grids = {}
    for k, fn in prov.items():
        fn()
        if k.startswith("wgmma"):
            torch.cuda.synchronize()
            grids[k] = (lib.wg_last_grid(), lib.wg_max_clusters())
    print("grids (grid, max clusters of 2):", grids)
    for _ in range(rounds):
        for k, fn in prov.items():
            times[k].append(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    med = {k: statistics.median(v) for k, v in times.items()}
    return med, times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default=".bkcache/wgmma/wgmma_gemm.so")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", type=int, nargs="*", help="wg_lora_fwd codes to check and time (default: VARIANTS)")
    ap.add_argument("--diag", action="store_true",
                    help="a wait that never ends traps and says where (see sync_or_report)")
    ap.add_argument("--checks-only", action="store_true", help="check, do not time")
    a = ap.parse_args()
    if a.variants:
        VARIANTS.clear()
        VARIANTS.update({variant_name(v): v for v in a.variants})
    lib = load(a.lib)
    if a.diag:
        global DIAG
        DIAG = torch.zeros(1 + 4 * 1024, dtype=torch.int32).pin_memory()
        assert lib.wg_set_diag(ctypes.c_void_p(DIAG.data_ptr())) == 0
    print(f"loaded {a.lib} on {torch.cuda.get_device_name()}", flush=True)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "checks": [], "bench": {}}
    all_ok = True
    for (M, K, N, R, dt, bias_on) in [(1000, 1000, 1000, 8, torch.bfloat16, True),
                                      (333, 264, 520, 16, torch.float16, False),
                                      (2048, 4096, 4096, 16, torch.bfloat16, False),
                                      (2048, 4096, 4096, 64, torch.bfloat16, True),
                                      (1024, 4096, 11008, 32, torch.float16, True),
                                      (300, 11008, 4096, 128, torch.bfloat16, False),
                                      # 3 output chunks in the last column tile and CTAs with several tiles (the
                                      # epilogue's buffers reused across tiles), a short K
                                      (2048, 256, 4000, 16, torch.bfloat16, True)]:
        ok, errs = check(lib, M, K, N, R, dt, bias_on)
        all_ok &= ok
        res["checks"].append({"shape": [M, K, N, R], "dtype": str(dt), "bias": bias_on, "ok": ok, "errors": errs})
        print(f"check M={M} K={K} N={N} R={R} {dt} bias={bias_on}: {'ok' if ok else 'FAIL'} "
              + " ".join(f"{k}={v:.2e}" for k, v in errs.items()), flush=True)
    if not all_ok:
        print("correctness failed: no timing")
    elif not a.checks_only:
        for (M, K, N, R) in [(8192, 4096, 4096, 16), (8192, 4096, 4096, 64), (8192, 4096, 11008, 16),
                             (8192, 11008, 4096, 16)]:
            med, times = bench_case(lib, M, K, N, R, a.rounds)
            key = f"{M}x{K}->{N} r{R}"
            res["bench"][key] = {"median_ms": med, "rounds": times}
            base = med["cublas xW^T"]
            print(f"\n{key}")
            for k, v in med.items():
                print(f"  {k:34s} {v:.4f} ms  {v / base:.3f}x cuBLAS xW^T")
    with open(os.path.join(a.out, "wgmma_gemm_probe.json"), "w") as f:
        json.dump(res, f, indent=1)
    if not all_ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
