"""``balora bench``: what BaLoRA costs on this machine, against what a user would otherwise run.

Two sections, on the model shapes chosen (``llama2-7b``, ``llama-1b``, ``tiny``) at rank r:

* projection of every adapter of the model (q, k, v, o, gate, up, down per layer), float32
  adapters: the paper's per-module loop (thin SVDs of both factors, polar parts, SVD of the r x r
  core, as its ProjectionCallback), plain PyTorch batched by shape (Grams + float64 eigh +
  rescale), and the package's :class:`~balora_kernels.BalancedProjector` (reused plan, adapters
  already balanced by a first call, as in training);
* one adapted linear layer (hidden -> hidden, then hidden -> intermediate), forward + backward
  (input and adapter gradients), in bf16 on a GPU and float32 on CPU: the frozen ``nn.Linear``
  alone, the unfused LoRA ``x W^T + s (x A^T) B^T`` (PEFT's math), its ``torch.compile``, PEFT's
  LoRA ``Linear`` when peft is installed, and :func:`balora_kernels.lora_linear`.

Times are medians (CUDA events on a GPU, ``perf_counter`` on CPU). On CPU every package op runs its
PyTorch fallback path; the table says so. This is a quick look: ``bench/bench_projection.py`` and
``bench/bench_lora_linear.py`` are the full GPU benchmarks.
"""
from __future__ import annotations

import datetime
import math
import platform
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .. import functional
from ..baselines import batched_project, paper_project, peft_lora_layer
from ..projector import BalancedProjector

SHAPES = {
    "llama2-7b": dict(layers=32, hidden=4096, intermediate=11008),
    "llama-1b": dict(layers=16, hidden=2048, intermediate=5632),
    "tiny": dict(layers=2, hidden=256, intermediate=688),
}


def adapter_shapes(layers: int, hidden: int, intermediate: int):
    """(out, in) of every adapted linear: q, k, v, o (h x h), gate, up (h -> f), down (f -> h)."""
    return ([(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]) * layers


def _timer(device: torch.device, reps: int, warm: int = 1) -> Callable[[Callable], float]:
    def run(fn) -> float:
        for _ in range(warm):
            fn()
        ts = []
        for _ in range(reps):
            if device.type == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                torch.cuda.synchronize(device)
                ts.append(s.elapsed_time(e))
            else:
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
        ts.sort()
        return ts[len(ts) // 2]
    return run


# ---- projection baselines: balora_kernels.baselines ----------------------------------------
def bench_projection(shape: str, rank: int, device: torch.device, reps: int, paper_loop: bool = True) -> List[dict]:
    cfg = SHAPES[shape]
    shapes = adapter_shapes(**cfg)
    gen = torch.Generator(device="cpu").manual_seed(0)
    pairs = [((torch.randn(rank, i, generator=gen) / math.sqrt(i)).to(device),
              (torch.randn(o, rank, generator=gen) * 1e-2).to(device)) for o, i in shapes]
    timer = _timer(device, reps)
    rows = []
    tag = f"{shape} ({len(pairs)} adapters, r={rank})"
    if paper_loop:
        ms = timer(lambda: [paper_project(A, B) for A, B in pairs]) if device.type == "cuda" else _timer(device, 1, 0)(
            lambda: [paper_project(A, B) for A, B in pairs])
        rows.append({"section": f"projection {tag}", "name": "paper per-module loop (SVDs)", "ms": ms})
    by: Dict[tuple, list] = {}
    for A, B in pairs:
        by.setdefault((A.shape, B.shape), []).append((A, B))
    groups = [(torch.stack([a for a, _ in v]), torch.stack([b for _, b in v])) for v in by.values()]
    rows.append({"section": f"projection {tag}", "name": "plain PyTorch batched (eigh)", "ms": timer(lambda: batched_project(groups))})
    for mode in ("nearest", "svd"):
        proj = BalancedProjector([(f"p{i}", A.clone(), B.clone()) for i, (A, B) in enumerate(pairs)], mode=mode)
        proj.project()
        rows.append({"section": f"projection {tag}", "name": f"balora_kernels BalancedProjector ({mode})",
                     "ms": timer(proj.project), "package": True,
                     "backend": type(proj._current_plan()).__name__})
    nbytes = sum(A.numel() + B.numel() for A, B in pairs) * 4
    rows.append({"section": f"projection {tag}", "name": "adapter memory (MB)", "ms": None, "value": nbytes / 1e6})
    return rows


def _peft_layer(base: nn.Linear, A, B, rank: int, scaling: float):
    """PEFT's LoRA ``Linear`` around a copy of ``base`` with the same adapters (None without peft)."""
    import copy
    try:
        return peft_lora_layer(copy.deepcopy(base), A, B, scaling)
    except ImportError:
        return None


# ---- fused linear -----------------------------------------------------------------------------
def bench_linear(shape: str, rank: int, tokens: int, device: torch.device, reps: int, compile_: bool = True) -> List[dict]:
    cfg = SHAPES[shape]
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for fin, fout in ((cfg["hidden"], cfg["hidden"]), (cfg["hidden"], cfg["intermediate"])):
        sect = f"linear {fin}->{fout}, {tokens} tokens, r={rank}, {str(dt).replace('torch.', '')}, fwd+bwd"
        gen = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(tokens, fin, generator=gen).to(device, dt).requires_grad_()
        gy = torch.randn(tokens, fout, generator=gen).to(device, dt)
        base = nn.Linear(fin, fout, bias=False).to(device, dt).requires_grad_(False)
        A = nn.Parameter((torch.randn(rank, fin, generator=gen) / math.sqrt(fin)).to(device, dt))
        B = nn.Parameter((torch.randn(fout, rank, generator=gen) * 1e-2).to(device, dt))
        s = 2.0

        def unfused(x):
            return base(x) + s * ((x @ A.T) @ B.T)

        def package(x):
            return functional.lora_linear(x, base.weight, None, A, B, s)

        candidates = [("frozen nn.Linear (no adapter)", base, False), ("unfused LoRA (PEFT's math)", unfused, False)]
        if compile_:
            candidates.append(("torch.compile(unfused LoRA)", torch.compile(unfused), False))
        pl = _peft_layer(base, A, B, rank, s)
        if pl is not None:
            candidates.append(("PEFT LoRA Linear", pl, False))
        candidates.append(("balora_kernels.lora_linear", package, True))
        timer = _timer(device, reps, warm=3 if compile_ else 1)
        base_ms = None
        for name, f, is_pkg in candidates:
            def go(f=f):
                x.grad = None
                f(x).backward(gy)
            try:
                ms = timer(go)
            except Exception as e:  # e.g. torch.compile without a working compiler
                rows.append({"section": sect, "name": name, "ms": None, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            base_ms = ms if base_ms is None else base_ms
            rows.append({"section": sect, "name": name, "ms": ms, "over_frozen": ms / base_ms, "package": is_pkg})
    return rows


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "date": datetime.date.today().isoformat(),
           "device": str(device), "backend_info": functional.backend_info()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu"], env["cuda"] = torch.cuda.get_device_name(device), torch.version.cuda
    else:
        env["cpu_threads"] = torch.get_num_threads()
        env["note"] = "CPU: every package op runs its PyTorch fallback path (no GPU kernels here)"
    return env


def run_bench(shapes, rank: int = 16, device: Optional[str] = None, tokens: Optional[int] = None, reps: Optional[int] = None,
              compile_: bool = True, paper_loop: bool = True, log=print) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reps = reps or (20 if dev.type == "cuda" else 3)
    tokens = tokens or (8192 if dev.type == "cuda" else 256)
    rows = []
    for shape in shapes:
        if shape not in SHAPES:
            raise ValueError(f"unknown shapes {shape!r}; choose from {sorted(SHAPES)}")
        log(f"bench: projection, {shape} ...")
        rows += bench_projection(shape, rank, dev, reps, paper_loop)
        log(f"bench: linear layers, {shape} ...")
        rows += bench_linear(shape, rank, tokens, dev, reps, compile_)
    return {"kind": "balora_bench", "env": environment(dev), "settings": {"shapes": list(shapes), "rank": rank,
            "tokens": tokens, "reps": reps, "torch_compile": compile_}, "rows": rows}


def format_table(res: dict) -> str:
    env = res["env"]
    lines = [f"device: {env.get('gpu', env['device'])}  torch {env['torch']}  {env.get('note', '')}".rstrip()]
    sect = None
    for r in res["rows"]:
        if r["section"] != sect:
            sect = r["section"]
            lines.append(f"\n{sect}")
        if r.get("ms") is None:
            val = f"{r['value']:.1f}" if "value" in r else f"failed: {r.get('error', '')}"
            lines.append(f"  {r['name']:<44} {val}")
            continue
        extra = f"  {r['over_frozen']:.2f}x frozen" if "over_frozen" in r else ""
        extra += f"  [{r['backend']}]" if "backend" in r else ""
        lines.append(f"  {r['name']:<44} {r['ms']:10.3f} ms{extra}")
    return "\n".join(lines)
