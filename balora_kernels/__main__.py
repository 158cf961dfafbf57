"""``python -m balora_kernels`` / ``balora``: a short demonstration (the CLI grows here)."""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    import torch

    from . import BalancedProjector, BaLoRALinear, backend_info
    torch.manual_seed(args.seed)
    d, r = 64, 4
    teacher = torch.randn(d, d) / d**0.5
    net = torch.nn.Sequential(BaLoRALinear(d, d, r, alpha=2 * r), BaLoRALinear(d, d, r, alpha=2 * r))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=args.lr)
    proj = BalancedProjector(net, mode=args.mode).attach(opt)
    print(f"backend: {backend_info()}")
    print(f"{proj}")
    for step in range(1, args.steps + 1):
        x = torch.randn(256, d)
        loss = (net(x) - x @ teacher.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 10) == 0 or step == 1:
            s = proj.last_stats.as_dict()
            print(f"step {step:4d}  loss {loss.item():.4f}  balance gap before {s['gap_before']:.2e} "
                  f"after {s['gap_after']:.2e}  projected {s['projected']}/{s['pairs']}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="balora", description="Balanced LoRA kernels")
    sub = parser.add_subparsers(dest="cmd")
    demo = sub.add_parser("demo", help="train two BaLoRA layers on a random regression and show the balance")
    demo.add_argument("--steps", type=int, default=100)
    demo.add_argument("--lr", type=float, default=1e-2)
    demo.add_argument("--mode", default="nearest", choices=["nearest", "svd"])
    demo.add_argument("--seed", type=int, default=0)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["demo"] + argv
    args = parser.parse_args(argv)
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
