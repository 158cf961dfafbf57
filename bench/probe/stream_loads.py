"""How fast the projection's tiles stream into shared memory: per-thread 16-byte cp.async (what csrc/grouped_mma.cu's
Gram and rescale do) against bulk copies (cp.async.bulk), loads alone, on the fp32 adapters of a Llama-2-7B-shaped
model at r = 64 (224 factors each side, tiles of 2048 rows of B / columns of A as the plan cuts them), beside
torch's read (sum) and copy rates of one buffer of the same size. A probe (bench/probe/stream_loads.cu).

    python bench/probe/stream_loads.py --build-only --lib .build/stream_loads.so    # here (nvcc, no GPU needed)
    python bench/probe/stream_loads.py --lib .build/stream_loads.so --json out.json # on the device
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SRC = os.path.join(ROOT, "bench", "probe", "stream_loads.cu")
TILE = 2048


def build(lib):
    os.makedirs(os.path.dirname(os.path.abspath(lib)), exist_ok=True)
    subprocess.check_call(["nvcc", "-O3", "-std=c++17", "-arch=sm_90", "-shared", "-Xcompiler", "-fPIC", SRC,
                           "-o", lib])
    print("built", lib)


def tile_table(torch, factors):
    rows = []   # (address, stride, len, is_b)
    for A, B in factors:
        for k0 in range(0, B.shape[0], TILE):
            rows.append((B.data_ptr() + 4 * k0 * B.stride(0), B.stride(0), min(TILE, B.shape[0] - k0), 1))
        for k0 in range(0, A.shape[1], TILE):
            rows.append((A.data_ptr() + 4 * k0, A.stride(0), min(TILE, A.shape[1] - k0), 0))
    buf = bytearray()
    for addr, stride, n, is_b in rows:
        buf += addr.to_bytes(8, "little") + stride.to_bytes(8, "little") + n.to_bytes(4, "little") + \
            is_b.to_bytes(4, "little")
    return torch.frombuffer(buf, dtype=torch.uint8).cuda(), len(rows)


def run(lib, out_json):
    import torch
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_projection import MODELS, events_ms, llama_shapes, make_adapters
    so = ctypes.CDLL(lib)
    factors = make_adapters(llama_shapes(**MODELS["llama2-7b"]), 64, torch.float32)   # each its own allocation
    nbytes = sum(4 * (A.numel() + B.numel()) for A, B in factors)
    table, n_tiles = tile_table(torch, factors)
    out = torch.empty(n_tiles, device="cuda")
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "MB": nbytes / 1e6, "tiles": n_tiles,
           "cases": []}
    big = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(big)
    t_sum = events_ms(lambda: big.sum(), warm=5, rep=30)
    t_copy = events_ms(lambda: dst.copy_(big), warm=5, rep=30)
    res["torch_sum_ms"], res["torch_read_TBs"] = t_sum, nbytes / t_sum / 1e9
    res["torch_copy_ms"], res["torch_copy_TBs"] = t_copy, 2 * nbytes / t_copy / 1e9
    print(f"{nbytes / 1e6:.0f} MB in {n_tiles} tiles; torch sum {t_sum:.3f} ms ({nbytes / t_sum / 1e9:.2f} TB/s read), "
          f"copy {t_copy:.3f} ms ({2 * nbytes / t_copy / 1e9:.2f} TB/s)")
    for method, name in ((0, "cp.async 16 B"), (1, "bulk")):
        for stages in (2, 3, 4):
            for kb in (stages * 16, 100, 72):
                if kb < stages * 16:
                    continue
                smem = kb * 1024

                def go():
                    rc = so.stream_loads(ctypes.c_void_p(table.data_ptr()), n_tiles, ctypes.c_void_p(out.data_ptr()),
                                         method, stages, smem, stream)
                    assert rc == 0, rc
                ms = events_ms(go, warm=5, rep=30)
                case = {"method": name, "stages": stages, "smem_KB": kb, "ms": ms, "TBs": nbytes / ms / 1e9}
                res["cases"].append(case)
                print(f"{name:14s} stages {stages} smem {kb:3d} KB: {ms:.3f} ms, {nbytes / ms / 1e9:.2f} TB/s")
    if out_json:
        json.dump(res, open(out_json, "w"), indent=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--lib", default=os.path.join(ROOT, ".build", "stream_loads.so"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.build_only:
        build(a.lib)
    else:
        run(a.lib, a.json)
