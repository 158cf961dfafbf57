"""Probe: does running the backward's dB and dA on a side stream, beside the big dx GEMM, hide them?

Plain PyTorch (cuBLAS products only, no extension), bf16, fwd+bwd of one LoRA linear as the
prefill implementation issues it (u, rank-r term, big GEMM with beta=1; v, dB, dA, rank-r term, big
GEMM with beta=1), timed as CUDA-graph replays (so stream concurrency is what the GPU does, no host
cost) beside the frozen layer, with variants that move dB and dA to a side stream.

    python bench/probe/overlap.py --out DIR

(bench/results/logs/session13-overlap-probe-2026-12-02.json came from the first version, commit 8fa4f84, which
had its own CUDA-graph timer: 20 steps a graph, the median of 7 replays; it now uses lora_profile.graph_us.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_profile import graph_us  # noqa: E402


def graph_ms(fn):
    return graph_us(fn) / 1e3


CASES = {"8k_4096x4096_r16": (8192, 4096, 4096, 16), "8k_4096to11008_r16": (8192, 4096, 11008, 16),
         "8k_11008to4096_r16": (8192, 11008, 4096, 16), "8k_4096x4096_r64": (8192, 4096, 4096, 64),
         "1k_4096x4096_r16": (1024, 4096, 4096, 16)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--cases", default=",".join(CASES))
    a = ap.parse_args()
    dt, dev = torch.bfloat16, "cuda"
    side = torch.cuda.Stream(priority=0)
    res = {}
    for name in a.cases.split(","):
        N, K, O, r = CASES[name]
        torch.manual_seed(0)
        x = torch.randn(N, K, device=dev, dtype=dt)
        W = torch.randn(O, K, device=dev, dtype=dt) / K ** 0.5
        A = torch.randn(r, K, device=dev, dtype=dt) / K ** 0.5
        B = torch.randn(O, r, device=dev, dtype=dt) * 1e-2
        dy = torch.randn(N, O, device=dev, dtype=dt)
        s = 2.0
        e = x.new_empty(())
        y = torch.empty(N, O, device=dev, dtype=dt)
        dx = torch.empty(N, K, device=dev, dtype=dt)
        u = torch.empty(N, r, device=dev, dtype=dt)
        v = torch.empty(N, r, device=dev, dtype=dt)
        dA = torch.empty(r, K, device=dev, dtype=dt)
        dB = torch.empty(O, r, device=dev, dtype=dt)

        def frozen():
            torch.mm(x, W.T, out=y)
            torch.mm(dy, W, out=dx)

        def fwd():
            torch.mm(x, A.T, out=u)
            torch.addmm(e, u, B.T, beta=0, alpha=s, out=y)
            y.addmm_(x, W.T)

        def serial():
            fwd()
            torch.mm(dy, B, out=v)
            torch.addmm(e, dy.T, u, beta=0, alpha=s, out=dB)
            torch.addmm(e, v.T, x, beta=0, alpha=s, out=dA)
            torch.addmm(e, v, A, beta=0, alpha=s, out=dx)
            dx.addmm_(dy, W)

        def overlap(side_first: bool, st):
            def run():
                fwd()
                torch.mm(dy, B, out=v)
                ev = torch.cuda.Event()
                ev.record()
                if not side_first:
                    torch.addmm(e, v, A, beta=0, alpha=s, out=dx)
                    dx.addmm_(dy, W)
                st.wait_event(ev)
                with torch.cuda.stream(st):
                    torch.addmm(e, dy.T, u, beta=0, alpha=s, out=dB)
                    torch.addmm(e, v.T, x, beta=0, alpha=s, out=dA)
                if side_first:
                    torch.addmm(e, v, A, beta=0, alpha=s, out=dx)
                    dx.addmm_(dy, W)
                torch.cuda.current_stream().wait_stream(st)
            return run

        variants = {"frozen": frozen, "serial": serial, "overlap_gemm_first": overlap(False, side),
                    "overlap_side_first": overlap(True, side)}
        row = {}
        for k, fn in variants.items():
            try:
                row[k] = graph_ms(fn)
            except Exception as ex:   # noqa: BLE001 -- a probe: report and go on
                row[k] = repr(ex)[:200]
        # eager (host issuing) for the two main ones
        for k in ("frozen", "serial", "overlap_side_first"):
            fn = variants[k]
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(20):
                fn()
            t1.record()
            torch.cuda.synchronize()
            row["eager_" + k] = t0.elapsed_time(t1) / 20
        res[name] = row
        f = row["frozen"]
        print(f"{name:22s} " + "  ".join(f"{k} {v:.4f} ({v / f:.3f}x)" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in row.items()), flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "overlap.json"), "w") as fh:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": res}, fh, indent=1)


if __name__ == "__main__":
    main()
