"""Where a LoRA linear step's time goes on the device: GPU time per kernel, and host time per op.

For each benchmark case and implementation (bf16, forward + backward of x, A, B as in
bench/bench_lora_linear.py): the step replayed from a CUDA graph (GPU time with no host in the way),
the GPU kernels' time per step from torch.profiler (by kernel), and the host time per step
(perf_counter, nothing waits for the GPU). Then the thin rank-r kernels alone, swept over their
launch parameters and timed by CUDA-graph replay of 20 calls (do_bench on one ~20 us kernel measures
the host, not the kernel).

    python bench/probe/lora_profile.py --out $OUT        # on the device
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from balora_kernels import _ext  # noqa: E402
from balora_kernels.ops import lora_linear as L  # noqa: E402

S = 2.0


def graph_us(fn, calls=10, reps=20):
    """Microseconds per call of ``fn`` replayed from a CUDA graph of ``calls`` calls (median of reps)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3 / calls)
    del g
    return sorted(ts)[len(ts) // 2]


def host_us(fn, calls=30, batches=5):
    """Microseconds of host time per call of ``fn`` (the median of ``batches`` batches of ``calls`` calls;
    nothing waits for the GPU inside a batch). Also used by host_gemm.py and host_step.py."""
    ts = []
    for _ in range(batches):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        ts.append((time.perf_counter() - t) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(ts)[batches // 2]


def _profile(fn, activity, iters):
    """torch.profiler's events of ``iters`` calls of ``fn`` (after 3 warm-up calls), recording ``activity``."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[getattr(ProfilerActivity, activity)]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages()


def kernels_us(fn, iters=10):
    """{kernel name: us per call} from torch.profiler (GPU time only), largest first."""
    out = {}
    for e in _profile(fn, "CUDA", iters):
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = e.self_cuda_time_total
        if t > 0:
            out[e.key[:90]] = round(t / iters, 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def host_ops_us(fn, iters=20):
    """{op: host us per call} (self CPU time) from torch.profiler, largest first (top 15)."""
    out = {e.key[:80]: round(e.self_cpu_time_total / iters, 1) for e in _profile(fn, "CPU", iters)}
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:15])


def case(N, in_f, out_f, r, impls, detail):
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(N, in_f, device=dev, dtype=dt, requires_grad=True)
    gy = torch.randn(N, out_f, device=dev, dtype=dt)
    W = torch.randn(out_f, in_f, device=dev, dtype=dt) / in_f ** 0.5
    A = (torch.randn(r, in_f, device=dev, dtype=dt) / in_f ** 0.5).requires_grad_(True)
    B = (torch.randn(out_f, r, device=dev, dtype=dt) * 1e-2).requires_grad_(True)
    provs = {
        "frozen": (lambda: torch.nn.functional.linear(x, W), [x]),
        "unfused": (lambda: torch.nn.functional.linear(x, W) + S * ((x @ A.T) @ B.T), [x, A, B]),
    }
    for impl in impls:
        provs[impl] = ((lambda impl=impl: L.lora_linear(x, W, None, A, B, S, None, impl=impl)), [x, A, B])
    for impl in ("triton", "cublas"):   # v and dB by two cuBLAS calls instead of _dyb_kernel (L.FUSED_DYB)
        if impl in impls:
            provs[impl + ":cublas-vdB"] = ((lambda impl=impl: L.lora_linear(x, W, None, A, B, S, None, impl=impl)),
                                           [x, A, B], False)
    res = {}
    for name, (f, ins, *fused) in provs.items():
        L.FUSED_DYB = fused[0] if fused else True
        step = lambda f=f, ins=ins: torch.autograd.grad(f(), ins, gy)  # noqa: E731
        try:
            row = {"graph_us": round(graph_us(step), 1), "host_us": round(host_us(step), 1)}
            k = kernels_us(step)
            row["kernels_us_sum"] = round(sum(k.values()), 1)
            if detail:
                row["kernels"] = k
                row["host_ops"] = host_ops_us(step)
        except Exception as e:  # recorded, not hidden
            row = {"error": repr(e)[:300]}
        res[name] = row
        L.FUSED_DYB = True
        print(f"    {name:12s} " + " ".join(f"{k} {v}" for k, v in row.items() if not isinstance(v, dict)),
              flush=True)
    return res


def thin_sweep():
    """The rank-r kernels alone at 8192 x 4096 -> 4096 (bf16), over launch parameters, us per call."""
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    N, K, M = 8192, 4096, 4096
    out = {}
    src = torch.empty(2 * 1024 ** 3 // 4, device=dev)
    dst = torch.empty_like(src)
    out["copy_TBps"] = 2 * src.numel() * 4 / graph_us(lambda: dst.copy_(src), calls=3) / 1e6
    del src, dst
    out["floor_one_read_us"] = N * K * 2 / out["copy_TBps"] / 1e6
    for r in (16, 64):
        x = torch.randn(N, K, device=dev, dtype=dt)
        dy = torch.randn(N, M, device=dev, dtype=dt)
        A = torch.randn(r, K, device=dev, dtype=dt)
        B = torch.randn(M, r, device=dev, dtype=dt)
        u = x @ A.T
        v = dy @ B
        items = {"u cuBLAS": lambda: x @ A.T, "v+dB cuBLAS": lambda: (dy @ B, dy.T @ u),
                 "dA cuBLAS": lambda: v.T @ x, "rank-r write cuBLAS": lambda: u @ B.T}
        for bn in (32, 64, 128):
            for sp in (1, 2, 4):
                items[f"u xa bn{bn} s{sp}"] = lambda bn=bn, sp=sp: L.xa_forward(x, A, splits=sp, block_n=bn)
        for bn in (32, 64, 128):
            for bm in (64, 128, 256, 512):
                for g in (None, 8):
                    items[f"v+dB dyb bn{bn} bm{bm} g{g}"] = (lambda bn=bn, bm=bm, g=g: L.dyb_backward(
                        dy, B, u, 1.0, True, groups=g, block_n=bn, block_m=bm))
        for bk in (64, 128, 256):
            for sp in (8, 16, 32):
                items[f"dA vx bk{bk} s{sp}"] = lambda bk=bk, sp=sp: L.vx_backward(v, x, 1.0, splits=sp, block_k=bk)
        items["rank-r write triton"] = lambda: L.lora_gemm(None, None, u, B.T, 1.0)
        for k, fn in items.items():
            try:
                out[f"r{r} {k}"] = round(graph_us(fn), 1)
            except Exception as e:
                out[f"r{r} {k}"] = repr(e)[:200]
        print("  thin r=%d: " % r + ", ".join(f"{k} {v}" for k, v in out.items() if k.startswith(f"r{r} ")), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--no-ext", action="store_true")
    ap.add_argument("--no-thin", action="store_true", help="skip the thin-kernel sweep")
    ap.add_argument("--cases", default="1k_4096x4096_r16,8k_4096x4096_r16,8k_4096to11008_r16,8k_4096x4096_r64")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    impls = ["cublas", "cublas_mm", "triton"]
    if not args.no_ext:
        t = time.time()
        ok = _ext.lora_linear_available()
        print(f"extension: {ok} in {time.time() - t:.0f} s {_ext.error() or ''}", flush=True)
        if ok:
            impls += [i for i in L.EXT_IMPLS]
    if not args.no_thin:
        res["thin"] = thin_sweep()
    res["cases"] = {}
    for name, shp, detail in (("1k_4096x4096_r16", (1024, 4096, 4096, 16), True),
                              ("8k_4096x4096_r16", (8192, 4096, 4096, 16), True),
                              ("8k_4096to11008_r16", (8192, 4096, 11008, 16), False),
                              ("8k_11008to4096_r16", (8192, 11008, 4096, 16), False),
                              ("8k_4096x4096_r64", (8192, 4096, 4096, 64), True)):
        if name not in args.cases.split(","):
            continue
        print(f"  {name}", flush=True)
        res["cases"][name] = case(*shp, impls, detail)
    with open(os.path.join(args.out, "lora_profile.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
