"""Probe: host time per forward + backward of each layer of entry points into the LoRA linear op, and GPU time.

At one shape (bf16, default 1024 tokens 4096 -> 4096, r = 16): the frozen layer, the C++ op called directly in
each mode, ``ops.lora_linear.lora_linear`` with the implementation forced, the public ``balora_kernels.lora_linear``
(the dispatcher's choice) and ``BaLoRALinear``; host microseconds per step (nothing waits for the GPU inside a
batch), also forward alone, and GPU microseconds per step replayed from a CUDA graph. Where the host, not the GPU,
sets the pace, the larger of the two is what a step costs.

    python bench/probe/host_entry.py --out DIR      # on the device
    python bench/probe/host_entry.py --tokens 8192 --cprofile triton   # and where the triton path's host time goes
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench", "probe"))

import balora_kernels as bk  # noqa: E402
from balora_kernels.ops import lora_linear as L  # noqa: E402
from lora_profile import graph_us, host_us  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--in", dest="in_f", type=int, default=4096)
    ap.add_argument("--out-features", dest="out_f", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--trace", default=None, metavar="IMPL",
                    help="then torch.profiler traces of 5 steps of the frozen layer and of L.lora_linear with IMPL "
                         "forced: the top-level host ops of one step per thread, with start and duration (and the "
                         "chrome traces under --out)")
    ap.add_argument("--cprofile", default=None, metavar="IMPL",
                    help="then cProfile 50 forward + backward steps of L.lora_linear with IMPL forced (host functions "
                         "by own time, top 30)")
    a = ap.parse_args()
    torch.manual_seed(0)
    dev, dt, N, I, O, r = "cuda", torch.bfloat16, a.tokens, a.in_f, a.out_f, a.rank
    x = torch.randn(N, I, device=dev, dtype=dt, requires_grad=True)
    gy = torch.randn(N, O, device=dev, dtype=dt)
    W = torch.randn(O, I, device=dev, dtype=dt) / I ** 0.5
    A = (torch.randn(r, I, device=dev, dtype=dt) / I ** 0.5).requires_grad_(True)
    B = (torch.randn(O, r, device=dev, dtype=dt) * 1e-2).requires_grad_(True)
    layer = bk.BaLoRALinear(I, O, r, bias=False, device=dev, dtype=dt)
    layer.weight.data.copy_(W)
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    lin = torch.nn.Linear(I, O, bias=False, device=dev, dtype=dt).requires_grad_(False)
    with torch.no_grad():
        lin.weight.copy_(W)
    from balora_kernels import _ext
    _ext.load()
    op = torch.ops.balora.lora_linear
    fwds = {"frozen nn.Linear": (lambda: lin(x), [x])}
    for name, mode in L.EXT_IMPLS.items():
        gemm = L.ext_gemm_kernels(dt, x.device, r, 0, 0) if mode in L.EXT_GEMM_MODES else []   # (GEMM config 0)
        fwds[f"op mode {mode} ({name})"] = (lambda mode=mode, gemm=gemm: op(x, W, None, A, B, 2.0, None, mode, gemm),
                                            [x, A, B])
    for name in ("ext_thin", "ext_allthin", "ext_prefill", "ext_triton", "ext_triton_thin", "cublas", "triton"):
        fwds[f"L.lora_linear impl={name}"] = (lambda name=name: L.lora_linear(x, W, None, A, B, 2.0, None, impl=name),
                                              [x, A, B])
    fwds["bk.lora_linear (public, auto)"] = (lambda: bk.lora_linear(x, W, None, A, B, 2.0), [x, A, B])
    fwds["BaLoRALinear module"] = (lambda: layer(x), [x, layer.lora_A, layer.lora_B])
    rows = {}
    for name, (f, params) in fwds.items():
        def step(f=f, params=params):
            return torch.autograd.grad(f(), params, gy)
        row = {"host_fwd_bwd_us": round(host_us(step), 1), "host_fwd_us": round(host_us(f), 1)}
        try:
            row["gpu_graph_us"] = round(graph_us(step), 1)
        except Exception as e:  # noqa: BLE001 -- a probe: report and go on
            row["gpu_graph_us"] = repr(e)[:120]
        rows[name] = row
        print(f"{name:34s} host fwd+bwd {row['host_fwd_bwd_us']:7.1f} us  fwd {row['host_fwd_us']:7.1f} us  "
              f"GPU {row['gpu_graph_us']} us", flush=True)
    print("plan (auto):", L._plan("auto", x, W, A))
    if a.cprofile:
        import cProfile
        import io
        import pstats

        def steps():
            for _ in range(50):
                torch.autograd.grad(L.lora_linear(x, W, None, A, B, 2.0, None, impl=a.cprofile), [x, A, B], gy)
            torch.cuda.synchronize()
        steps()
        prof = cProfile.Profile()
        prof.runcall(steps)
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
        print(f"== cProfile of 50 steps, impl={a.cprofile} (own time per function)")
        print(buf.getvalue())
    if a.trace:
        lora = (lambda: L.lora_linear(x, W, None, A, B, 2.0, None, impl=a.trace), [x, A, B])
        for name, (f, params) in (("frozen", (lambda: lin(x), [x])), (a.trace, lora)):
            trace(name, lambda f=f, params=params: torch.autograd.grad(f(), params, gy), a.out)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"host_entry_{N}.json"), "w") as fh:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [N, I, O, r],
                       "rows": rows}, fh, indent=1)


def trace(name, step, out):
    """Print the host ops of the last of 5 profiled steps of ``step`` (each from an idle GPU) per thread: start
    (us after the step's first op) and duration, top-level ops only (those not inside another op of the thread)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(5):
            torch.cuda.synchronize()
            with record_function(f"step{i}"):
                step()
        torch.cuda.synchronize()
    if out:
        os.makedirs(out, exist_ok=True)
        prof.export_chrome_trace(os.path.join(out, f"trace_{name}.json"))
    ev = [e for e in prof.events() if e.device_type.name == "CPU"]
    last = [e for e in ev if e.name == "step4"][0]
    t0, t1 = last.time_range.start, last.time_range.end
    inside = sorted((e for e in ev if t0 <= e.time_range.start <= t1 and e.name != "step4"),
                    key=lambda e: (e.thread, e.time_range.start))
    print(f"== {name}: one step {t1 - t0:.1f} us of host time (under the profiler)")
    for th in sorted({e.thread for e in inside}):
        ends = []
        for e in (e for e in inside if e.thread == th):
            if ends and e.time_range.start < ends[-1]:
                continue   # inside the previous top-level op
            ends.append(e.time_range.end)
            print(f"  thread {th % 100000:5d}  +{e.time_range.start - t0:7.1f}  {e.time_range.elapsed_us():7.1f} us  "
                  f"{e.name}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
