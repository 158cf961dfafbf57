"""Clock and power while one GEMM runs back to back for a few seconds (sampled by nvidia-smi): cuBLAS's x W^T,
the Triton TMA GEMM and bench/probe/wgmma_gemm.cu's variants at 8192 x 4096 -> 4096 r16 bf16, each also timed by
events over the same loop (is a kernel slower than cuBLAS because the card lowers its clock under it?).

    python3 bench/probe/wgmma_power.py [--seconds 3] [variant ...]   # on the device
"""
import argparse
import statistics
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, "bench/probe")
import wgmma_gemm as wg  # noqa: E402
from balora_kernels.ops import lora_linear as ll  # noqa: E402


def sample(stop, out):
    while not stop.is_set():
        r = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True)
        try:   # (the first GPU's line: this probe runs on one)
            c, p = r.stdout.strip().splitlines()[0].split(",")
            out.append((float(c), float(p)))
        except ValueError:
            pass
        time.sleep(0.1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("variants", nargs="*", type=int, default=[114, 1104])
    a = ap.parse_args()
    lib = wg.load(".bkcache/wgmma/wgmma_gemm.so")
    M, K, N, R = 8192, 4096, 4096, 16
    x, w, u, q, y = wg.operands(M, K, N, R)
    prov = {"cublas": lambda: torch.mm(x, w.T, out=y),
            "triton cfg0": lambda: ll.lora_gemm(x, w.T, u, q.T, 2.0, out=y, config=0, tma=True)}
    for v in a.variants:
        prov[f"wgmma {v}"] = (lambda v=v: wg.ours(lib, v, x, w, u, q, None, y, 2.0))
    rows = []
    for _ in range(2):
        for name, fn in prov.items():
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            time.sleep(1.0)   # a short rest between kernels, so each starts from a similar state
            stop, samples = threading.Event(), []
            th = threading.Thread(target=sample, args=(stop, samples))
            th.start()
            t_end = time.time() + a.seconds
            # (events around the whole loop: the host's relaunch gaps after each synchronize count too, most for the
            # ctypes path, which encodes five tensor maps per call)
            n, ev0, ev1 = 0, torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ev0.record()
            while time.time() < t_end:
                for _ in range(20):
                    fn()
                n += 20
                torch.cuda.synchronize()
            ev1.record()
            torch.cuda.synchronize()
            stop.set()
            th.join()
            ms = ev0.elapsed_time(ev1) / n
            late = samples[len(samples) // 2:] or samples
            rows.append((name, ms, statistics.median(c for c, _ in late), statistics.median(p for _, p in late)))
            print(f"{name:14s} {ms:.4f} ms/launch  clock {rows[-1][2]:.0f} MHz  power {rows[-1][3]:.0f} W"
                  f"  ({len(samples)} samples)", flush=True)
    base = {r[0]: r[1] for r in rows[len(prov):]}
    print("second pass, ratio to cuBLAS:", {k: round(v / base["cublas"], 3) for k, v in base.items()})


if __name__ == "__main__":
    main()
