"""Host time of the 1024-token LoRA step, piece by piece, on the device (which part of ~500 us is what).

    python bench/probe/host_step.py
"""
import torch

from lora_profile import host_us  # (bench/probe/, the folder of this script)

from balora_kernels import _ext


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    assert _ext.lora_linear_available(), _ext.error()
    op = torch.ops.balora.lora_linear
    dt = torch.bfloat16
    N, K, M, r, s = 1024, 4096, 4096, 16, 2.0
    x = torch.randn(N, K, device="cuda", dtype=dt, requires_grad=True)
    gy = torch.randn(N, M, device="cuda", dtype=dt)
    W = torch.randn(M, K, device="cuda", dtype=dt)
    A = torch.randn(r, K, device="cuda", dtype=dt, requires_grad=True)
    B = torch.randn(M, r, device="cuda", dtype=dt, requires_grad=True)
    xd, Ad, Bd = x.detach(), A.detach(), B.detach()
    z = torch.empty((), device="cuda", dtype=dt)
    lin = torch.nn.functional.linear
    y_f = lin(x, W)
    y_e = op(x, W, None, A, B, s, None, True)
    u = xd @ Ad.T
    v = gy @ Bd

    def fwd_seq():  # the ext_prefill forward's ATen calls, no autograd
        uu = torch.mm(xd, Ad.T)
        return torch.addmm(z, uu, Bd.T, beta=0, alpha=s).addmm_(xd, W.T)

    def bwd_seq():  # the ext_prefill backward's ATen calls, no autograd
        vv = torch.mm(gy, Bd)
        dB = torch.addmm(z, gy.T, u, beta=0, alpha=s)
        dA = torch.addmm(z, vv.T, xd, beta=0, alpha=s)
        dx = torch.addmm(z, vv, Ad, beta=0, alpha=s).addmm_(gy, W)
        return dB, dA, dx

    cases = {
        "frozen step (linear + grad x)": lambda: torch.autograd.grad(lin(x, W), [x], gy),
        "frozen fwd (graph built)": lambda: lin(x, W),
        "frozen bwd only (retain)": lambda: torch.autograd.grad(y_f, [x], gy, retain_graph=True),
        "frozen mm no grad": lambda: torch.mm(xd, W.T),
        "ext step": lambda: torch.autograd.grad(op(x, W, None, A, B, s, None, True), [x, A, B], gy),
        "ext fwd (graph built)": lambda: op(x, W, None, A, B, s, None, True),
        "ext fwd no_grad inputs": lambda: op(xd, W, None, Ad, Bd, s, None, True),
        "ext bwd only (retain)": lambda: torch.autograd.grad(y_e, [x, A, B], gy, retain_graph=True),
        "fwd ATen sequence (3 GEMMs)": fwd_seq,
        "bwd ATen sequence (6 GEMMs)": bwd_seq,
        "one thin mm": lambda: torch.mm(gy, Bd),
        "one addmm beta0": lambda: torch.addmm(z, v.T, xd, beta=0, alpha=s),
    }
    for name, fn in cases.items():
        print(f"  {name:34s} {host_us(fn, 50, 7):7.1f} us", flush=True)


if __name__ == "__main__":
    main()
