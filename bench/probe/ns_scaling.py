"""Scalar models of the r x r kernel's matrix iterations (csrc/balance_math.cuh), on the CPU: steps to convergence
with and without the mean-eigenvalue scaling (bk::ns_scale) for several caps, and the products the fast path's
inverse fourth root takes against the two coupled square roots it replaced (session 17).

Every matrix in these iterations is a polynomial in one symmetric matrix, so each eigenvalue follows the scalar map:
  polar Newton-Schulz (bk::polar_ns, p = sigma^2 of Q):   p -> p (3 - p)^2 / 4        (3 products per step as a
                                                            coupled square root, 2 as the polar iteration)
  inverse fourth root (bk::inv_fourth_root_ns, p of N):    p -> ((5 - p) / 4)^4 p       (4 products per step)
with the same stopping rule as the kernel (||P - I||_F < 1e-8, then one more update). The polar column runs the
cubic map on the same spectra (a proxy: polar_ns works on C = T^T G_B + T^-1 G_A, whose singular values differ
from M's). Spectra: the benchmark's
Llama-2-7B pairs at r = 16, 64, 128 (M = L^T G_A L of the random factors, scaled by the kernel's bound), and
log-uniform / clustered spectra of condition numbers 1e2 to 1e6.

    python bench/probe/ns_scaling.py [--caps 1.5,1.8,2,2.5]
"""
import argparse
import math

import torch

TOL = 1e-8


def cubic(p):
    return p * (3 - p) ** 2 / 4


def quartic_root(p):
    return ((5 - p) / 4) ** 4 * p


def steps(lam, step, cap):
    """Steps of the scalar iteration from the eigenvalues lam (in (0, 1]) until the kernel stops; cap None: unscaled."""
    p = lam.clone()
    n = len(p)
    for k in range(1, 500):
        res = torch.linalg.norm(p - 1).item()
        s = 1.0 if cap is None else min(max(n / p.sum().item(), 1.0), cap)
        p = step(s * p)
        if res < TOL:
            return k
    return math.inf


def bench_spectrum(o, i, r, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, i, generator=g, dtype=torch.float64) / math.sqrt(i)
    B = torch.randn(o, r, generator=g, dtype=torch.float64) * 1e-2
    L = torch.linalg.cholesky(B.T @ B)
    M = L.T @ (A @ A.T) @ L
    bound = min(torch.linalg.norm(M).item(), M.abs().sum(1).max().item())   # the kernel's bound on lambda_max
    return torch.linalg.eigvalsh(M) / bound


def spectra(r):
    out = {f"7B {o}x{i}": bench_spectrum(o, i, r, 0) for (o, i) in [(4096, 4096), (11008, 4096), (4096, 11008)]}
    for kappa in (1e2, 1e4, 1e6):
        lam = torch.logspace(-math.log10(kappa), 0, r, dtype=torch.float64)
        out[f"log-uniform {kappa:g}"] = lam / lam.norm()
        few = torch.ones(r, dtype=torch.float64)
        few[:-2] = 1 / kappa
        out[f"2 large {kappa:g}"] = few / few.norm()
        few = torch.ones(r, dtype=torch.float64)
        few[:2] = 1 / kappa
        out[f"2 small {kappa:g}"] = few / few.norm()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--caps", default="1.5,1.8,2,2.5")
    ap.add_argument("--ranks", default="16,64,128")
    a = ap.parse_args()
    caps = [None] + [float(c) for c in a.caps.split(",")]
    head = ["unscaled"] + [f"cap {c:g}" for c in caps[1:]]
    for r in (int(x) for x in a.ranks.split(",")):
        print(f"r = {r}: products of M^-1/4 (two coupled square roots, 3 per step | inverse fourth root, 4 per step, "
              f"the first 3, the last X S 1) and the cubic map's steps on it (p: polar_ns's), per cap")
        print(f"  {'spectrum':18s} " + " ".join(f"{h:>17s}" for h in head))
        for name, lam in spectra(r).items():
            row = []
            for cap in caps:
                two = 3 * (steps(lam, cubic, cap) + steps(lam.sqrt(), cubic, cap))
                k = steps(lam, quartic_root, cap)   # full steps k - 1, then the last X S
                one = 4 * (k - 1) if k > 1 else 0   # (converged at once: the first X S is elementwise)
                row.append(f"{two:4.0f} |{one:4.0f} p{steps(lam, cubic, cap):3.0f}")
            print(f"  {name:18s} " + " ".join(f"{x:>17s}" for x in row))


if __name__ == "__main__":
    main()
