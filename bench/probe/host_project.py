"""Host time of BalancedProjector.project() beyond the plan's graph replay, on the device.

project() checks before each projection that no parameter was re-allocated (TritonProjectionPlan.is_stale: a
Python loop over every pair's address, shape, strides, dtype and device). This times that check alone over the
adapters of the benchmark's 7B and 1B models (CUDA tensors; no kernel runs, no extension needed) and its parts.
    python bench/probe/host_project.py
"""
import os
import sys

import torch

from lora_profile import host_us  # (bench/probe/, the folder of this script)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_projection import MODELS, llama_shapes  # noqa: E402  (bench/)

from balora_kernels.ops.grouped_projection import _signature  # noqa: E402


def main():
    for name, cfg in MODELS.items():
        sh = llama_shapes(**cfg)
        pairs = [(torch.empty(16, i, device="cuda"), torch.empty(o, 16, device="cuda")) for o, i in sh]
        sig = _signature(pairs)
        cases = {
            "is_stale (signature + compare)": lambda: _signature(pairs) != sig,
            "data_ptr() of every factor": lambda: [(A.data_ptr(), B.data_ptr()) for A, B in pairs],
            "shape + stride() of every factor": lambda: [(A.shape, A.stride(), B.shape, B.stride()) for A, B in pairs],
            "dtype + device of every factor": lambda: [(A.dtype, A.device, B.dtype) for A, B in pairs],
        }
        for k, fn in cases.items():
            print(f"  {name} ({len(pairs)} pairs) {k:36s} {host_us(fn, 50, 5):8.1f} us", flush=True)


if __name__ == "__main__":
    main()
