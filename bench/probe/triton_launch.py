"""Probe: host time per Triton launch (``kernel[grid](...)``) beside a cuBLAS call and an allocation, and of
``dyb_backward`` as a whole; the installed Triton's launch code.

    python bench/probe/triton_launch.py --out DIR     # on the device

Host microseconds per call (a batch of calls, nothing waits for the GPU inside it; median of 5 batches) of the
package's ``_sum_splits_kernel`` (11 runtime arguments) and ``_dyb_kernel`` (22) on small tensors. The source of
``JITFunction.run``, ``CompiledKernel`` and the CUDA launcher of this Triton goes to DIR. Session 25 measured a
direct launch of the compiled kernel (its ``run``, skipping Triton's binding, behind a Python cache key of the
argument properties) here as well: 21-23 us against Triton's own 19-20 (triton 3.6, H200 machine); not kept (its
rows, and a ``launch_info`` entry, are in that run's ``bench/results/logs/session25-triton-launch-2026-12-03.json``).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import triton  # noqa: E402
from triton.runtime import jit as tjit  # noqa: E402

from balora_kernels.ops import lora_linear as L  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "bench", "probe"))
from lora_profile import host_us  # noqa: E402

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = "cuda"
    rows = {}
    part = torch.randn(3, 4096, device=dev)
    out = torch.empty(4096, device=dev, dtype=torch.bfloat16)
    s_args = (part, out, 3, 4096, 1.0, 4, part, out, 3, 4096, 1.0)
    s_kw = dict(BLOCK=1024)
    N, M, R = 256, 512, 16
    dy = torch.randn(N, M, device=dev, dtype=torch.bfloat16)
    B = torch.randn(M, R, device=dev, dtype=torch.bfloat16)
    u = torch.randn(N, R, device=dev, dtype=torch.bfloat16)
    vp = torch.empty(2, N, R, device=dev)
    dbp = torch.empty(2, M, R, device=dev)
    d_args = (dy, B, u, vp, dbp, N, M, R, 128, 0.5, dy.stride(0), dy.stride(1), B.stride(0), B.stride(1),
              u.stride(0), u.stride(1), *vp.stride(), *dbp.stride())
    d_kw = dict(WITH_DB=True, BLOCK_N=64, BLOCK_M=256, BLOCK_R=16, DOT_PRECISION="tf32", num_warps=4, num_stages=3)
    for name, kern, grid, args, kw in (("sum_splits", L._sum_splits_kernel, (8,), s_args, s_kw),
                                       ("dyb", L._dyb_kernel, (2, 2), d_args, d_kw)):
        kern[grid](*args, **kw)
        rows[f"{name}: kernel[grid](...)"] = host_us(lambda: kern[grid](*args, **kw), calls=200)
    x = torch.randn(64, 64, device=dev, dtype=torch.bfloat16)
    rows["torch.mm 64x64"] = host_us(lambda: torch.mm(x, x))
    rows["torch.empty"] = host_us(lambda: torch.empty(64, 64, device=dev))
    rows["dyb_backward (whole launcher, one reduction launch)"] = host_us(
        lambda: L.dyb_backward(dy, B, u, 0.5, groups=2, block_m=256))
    for k, v in rows.items():
        print(f"{k:55s} {v if isinstance(v, str) else f'{v:7.1f} us'}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "triton_launch.json"), "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__,
                       "gpu": torch.cuda.get_device_name(), "host_us": rows}, f, indent=1)
        srcs = [tjit.JITFunction.run]
        from triton.compiler import compiler as tc
        srcs += [tc.CompiledKernel]
        try:
            from triton.backends.nvidia import driver as nd
            srcs += [nd]
        except Exception:  # noqa: BLE001
            pass
        with open(os.path.join(a.out, "triton_launch_sources.txt"), "w") as f:
            for obj in srcs:
                try:
                    f.write(f"==== {getattr(obj, '__qualname__', getattr(obj, '__name__', obj))}\n")
                    f.write(inspect.getsource(obj) + "\n")
                except Exception as e:  # noqa: BLE001
                    f.write(f"(no source: {e!r})\n")


if __name__ == "__main__":
    main()
