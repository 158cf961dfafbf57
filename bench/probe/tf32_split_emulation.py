"""Probe (CPU): how to split float32 values into tf32 hi + lo for the 3xTF32 products of csrc/grouped_mma.cu.

Emulates, in float64 on the CPU, the tensor cores' exact products of tf32 operands for 7B-shaped factors: the
rescale B T (B [4096, 64] ~ 0.3 N(0, 1), T = N(0, 1) + 2 I) from hi hi + hi lo + lo hi, and the Gram X^T X
(X [1024, 64]) from S + C + C^T (S = hi^T hi, C = hi^T lo), each rounded once to float32, against the float64
product; beside them the plain float32 product. hi is x rounded to tf32 ("rna": to nearest, ties away, as
`(bits + 0x1000) & ~0x1fff`) or cut ("trunc"); lo = x - hi rounded or cut to tf32 (the tensor cores read the 13
low bits of a tf32 operand as zero). Session 16 (2026-12-02): rounded hi, cut lo 7.8e-8 (rescale) / 4.7e-8 (Gram)
relative, against 1.45e-7 / 9.9e-8 for plain float32 and 3.5e-7 / 3.2e-7 with hi cut. (The accumulation of the
tensor cores is not emulated: csrc/grouped_mma.cu keeps their sums short, mma_tf32_zero.)
Usage: python bench/probe/tf32_split_emulation.py
"""
import torch


def rna(x):
    return ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def trunc(x):
    return (x.view(torch.int32) & ~0x1FFF).view(torch.float32)


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def main():
    torch.manual_seed(0)
    r = 64
    splits = {"rna/rna": (rna, rna), "rna/trunc": (rna, trunc), "trunc/trunc": (trunc, trunc)}
    mm = lambda a, b: a.double() @ b.double()  # noqa: E731  (exact products of tf32 values, summed in float64)
    for trial in range(3):
        B = torch.randn(4096, r) * 0.3
        T = (torch.randn(r, r, dtype=torch.float64) + 2 * torch.eye(r, dtype=torch.float64)).float()
        ref = B.double() @ T.double()
        res = {"rescale plain": rel(B @ T, ref)}
        for name, (hf, lf) in splits.items():
            bh, th = hf(B), hf(T)
            bl, tl = lf(B - bh), lf(T - th)
            res[f"rescale {name}"] = rel((mm(bl, th) + mm(bh, tl) + mm(bh, th)).float(), ref)
        X = torch.randn(1024, r) * 0.3
        G = X.double().T @ X.double()
        res["gram plain"] = rel(X.T @ X, G)
        for name, (hf, lf) in splits.items():
            h = hf(X)
            lo = lf(X - h)
            S, C = mm(h.T, h), mm(h.T, lo)
            res[f"gram {name}"] = rel((S + C + C.T).float(), G)
        print(f"trial {trial}: " + ", ".join(f"{k} {v:.2e}" for k, v in res.items()))


if __name__ == "__main__":
    main()
