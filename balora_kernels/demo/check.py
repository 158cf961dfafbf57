"""``balora check``: the package's ops on this machine against the float64 reference.

For every device present (CPU, and CUDA when available) and each dtype the device serves well:

* ``lora_linear`` forward and all gradients (x, A, B) on awkward shapes, compared with
  :mod:`balora_kernels.reference` in float64. Tolerance: the op's error may be at most twice the
  error of plain PyTorch computing the same thing in the same dtype (plus a tiny floor);
* ``balance_`` in both modes on pairs of several shapes (one grouped call), compared with
  ``reference.balance`` in float64 on the same inputs: factors and product within twice the error of
  plain PyTorch in the same dtype on the same device (Grams accumulated in that dtype, the r x r math in
  float64, as the anchors' batched baseline), plus twice the dtype's epsilon, on pairs whose singular
  values are kept apart (see :func:`_unbalanced_pair`); and the degenerate
  policy: a zero pair and a NaN pair are left unchanged and counted.

Returns a report dict; the CLI prints it and exits non-zero on any failure.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch

from .. import functional, reference

LINEAR_SHAPES = ((37, 96, 80, 4), (300, 257, 129, 16), (64, 512, 1024, 8))   # N, in, out, r
PAIR_SHAPES = ((80, 96, 4), (129, 257, 16), (1024, 512, 8), (1024, 512, 8))  # out, in, r


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _plain(x, W, b, A, B, s):
    """Plain PyTorch LoRA in the operands' dtype, for the tolerance baseline."""
    return x @ W.T + b + s * ((x @ A.to(x.dtype).T) @ B.to(x.dtype).T)


def check_lora_linear(device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> List[dict]:
    out = []
    for N, fin, fout, r in LINEAR_SHAPES:
        s = 2.0
        mk = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale)  # noqa: E731
        x64, W64, b64 = mk(N, fin), mk(fout, fin, scale=fin ** -0.5), mk(fout)
        A64, B64, dy64 = mk(r, fin, scale=fin ** -0.5), mk(fout, r, scale=0.1), mk(N, fout)
        # float64 truth from the reference (its own autograd-free backward)
        y_ref = reference.lora_linear(x64, W64, b64, A64, B64, s)
        g_ref = reference.lora_linear_backward(dy64, x64, W64, A64, B64, s)
        results = {}
        for label, fn in (("op", lambda *a: functional.lora_linear(*a, name="check")), ("plain", _plain)):
            x = x64.to(device, dtype).requires_grad_()
            W, b = W64.to(device, dtype), b64.to(device, dtype)
            A = A64.to(device, torch.float32 if dtype != torch.float64 else dtype).requires_grad_()
            B = B64.to(device, A.dtype).requires_grad_()
            y = fn(x, W, b, A, B, s)
            y.backward(dy64.to(device, dtype))
            results[label] = {"y": y.detach().cpu(), "dx": x.grad.cpu(), "dA": A.grad.cpu(), "dB": B.grad.cpu()}
        truth = {"y": y_ref, "dx": g_ref.x, "dA": g_ref.lora_A, "dB": g_ref.lora_B}
        floor = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-3
        for k in truth:
            err, base = _rel(results["op"][k], truth[k]), _rel(results["plain"][k], truth[k])
            ok = math.isfinite(err) and err <= 2 * base + floor
            out.append({"op": "lora_linear", "what": k, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                        "shape": f"N={N} in={fin} out={fout} r={r}", "err": err, "plain_err": base, "ok": ok})
    return out


def _unbalanced_pair(fout: int, fin: int, r: int, gen: torch.Generator):
    """(A [r, fin], B [fout, r]) float64 with ``B A = U diag(s) V^T``, ``s`` geometric from 1 down to 0.05,
    spread unevenly between the factors by a random ``M`` (``B = U diag(s)^1/2 M``, ``A = M^-1 diag(s)^1/2 V^T``).

    The singular values are kept apart on purpose: the svd mode's factors are the product's singular
    vectors, whose rounding error grows as 1 / (relative gap of the singular values). With Gaussian factors
    of these shapes the top two singular values can lie within 0.6% of each other, and then any two
    float32 Grams (plain PyTorch's on two CPUs, or the GPU kernel's) give factor errors that differ by 10x
    by luck: the 2x rule would measure the draw, not the op.
    """
    U, _ = torch.linalg.qr(torch.randn(fout, r, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(fin, r, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, math.log10(0.05), r, dtype=torch.float64) if r > 1 else torch.ones(1, dtype=torch.float64)
    M = torch.randn(r, r, generator=gen, dtype=torch.float64) * r ** -0.5 + 2 * torch.eye(r, dtype=torch.float64)
    B = U * s.sqrt() @ M * 0.2
    A = torch.linalg.solve(M, s.sqrt()[:, None] * V.T) * 0.5
    return A, B


def check_projection(device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> List[dict]:
    out = []
    for mode in reference.MODES:
        pairs64 = []
        for fout, fin, r in PAIR_SHAPES:
            pairs64.append(_unbalanced_pair(fout, fin, r, gen))
        zero = (torch.randn(8, 64, generator=gen, dtype=torch.float64), torch.zeros(48, 8, dtype=torch.float64))
        nan = (torch.randn(8, 64, generator=gen, dtype=torch.float64), torch.randn(48, 8, generator=gen, dtype=torch.float64))
        nan[1][3, 2] = float("nan")
        pairs64 += [zero, nan]
        pairs = [(A.to(device, dtype).clone(), B.to(device, dtype).clone()) for A, B in pairs64]
        before = [(A.clone(), B.clone()) for A, B in pairs]
        stats = functional.balance_(pairs, mode=mode).as_dict()
        floor = 2 * torch.finfo(dtype).eps
        for i, (A, B) in enumerate(pairs[:-2]):
            A0, B0 = before[i][0].cpu(), before[i][1].cpu()
            # truth: the reference on the same rounded inputs, so only the op's own error is measured
            Ar, Br = reference.balance(A0.double(), B0.double(), mode)
            # baseline: plain PyTorch in the op's dtype on the op's device (Grams in that dtype, r x r math
            # in float64): the Grams' rounding differs between BLAS libraries, so the baseline is this device's
            Ad, Bd = before[i]
            t = reference.balancing_transforms(*reference.grams(Ad, Bd, dtype=torch.promote_types(dtype, torch.float32)), mode)
            Ap, Bp = (X.cpu() for X in reference.apply_transforms(Ad, Bd, t))
            errs = {"A": (_rel(A.cpu(), Ar), _rel(Ap, Ar)), "B": (_rel(B.cpu(), Br), _rel(Bp, Br)),
                    "product": (_rel((B.double() @ A.double()).cpu(), Br @ Ar), _rel(Bp.double() @ Ap.double(), Br @ Ar))}
            for k, (e, pe) in errs.items():
                out.append({"op": f"balance_({mode})", "what": k, "device": str(device),
                            "dtype": str(dtype).replace("torch.", ""), "shape": f"out={B.shape[0]} in={A.shape[1]} r={A.shape[0]}",
                            "err": e, "plain_err": pe, "ok": math.isfinite(e) and e <= 2 * pe + floor})
        same = lambda t, u: torch.equal(t.isnan(), u.isnan()) and torch.equal(t.nan_to_num(), u.nan_to_num())  # noqa: E731
        unchanged = all(same(p[0], q[0]) and same(p[1], q[1]) for p, q in zip(pairs[-2:], before[-2:]))
        ok = unchanged and stats["skipped_zero"] == 1 and stats["skipped_nonfinite"] == 1 and stats["projected"] == len(PAIR_SHAPES)
        out.append({"op": f"balance_({mode})", "what": "degenerate pairs (zero, NaN) left unchanged and counted",
                    "device": str(device), "dtype": str(dtype).replace("torch.", ""), "shape": "", "err": None,
                    "plain_err": None, "ok": bool(ok), "stats": stats})
    return out


def run_check(devices=None, seed: int = 0) -> Dict:
    """All checks on ``devices`` (default: cpu, and cuda when available). ``report["ok"]`` is the verdict."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for dev in map(torch.device, devices):
        dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if dev.type == "cuda" else [])
        for dt in dtypes:
            for fn in (check_lora_linear, check_projection):
                try:
                    rows += fn(dev, dt, gen)
                except Exception as e:   # report, do not stop: the user wants the whole picture
                    rows.append({"op": fn.__name__.replace("check_", ""), "what": "raised", "device": str(dev),
                                 "dtype": str(dt).replace("torch.", ""), "shape": "", "err": None, "plain_err": None,
                                 "ok": False, "error": f"{type(e).__name__}: {e}"})
    return {"backend_info": functional.backend_info(), "rows": rows, "ok": all(r["ok"] for r in rows),
            "failures": [r for r in rows if not r["ok"]]}


def format_report(rep: Dict) -> str:
    lines = ["backend:"]
    bi = rep["backend_info"]
    for k, v in bi.items():
        lines.append(f"  {k}: {v}")
    lines.append("")
    lines.append(f"{'op':<20} {'check':<10} {'device':<7} {'dtype':<9} {'shape':<26} {'error':>10} {'plain':>10}  result")
    for r in rep["rows"]:
        if r["what"].startswith("degenerate") or r["what"] == "raised":
            lines.append(f"{r['op']:<20} {r['what'][:40]:<40} {r['device']:<7} {r['dtype']:<9} {'ok' if r['ok'] else 'FAIL'}"
                         + (f"  {r.get('error', '')}" if not r["ok"] else ""))
            continue
        pe = "" if r["plain_err"] is None else f"{r['plain_err']:.2e}"
        lines.append(f"{r['op']:<20} {r['what']:<10} {r['device']:<7} {r['dtype']:<9} {r['shape']:<26} "
                     f"{r['err']:>10.2e} {pe:>10}  {'ok' if r['ok'] else 'FAIL'}")
    n_fail = len(rep["failures"])
    lines.append("")
    lines.append(f"{len(rep['rows']) - n_fail} passed, {n_fail} failed" if n_fail else f"all {len(rep['rows'])} checks passed")
    return "\n".join(lines)
