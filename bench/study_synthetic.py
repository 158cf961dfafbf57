"""The paper's synthetic experiment (Fig. 3), with sign descent and with torch.optim.Adam.

20x20 frozen random W0, random target, rank-4 LoRA (B = 0, A ~ N(0, 1)), 100 steps; each method
(LoRA, BaLoRA svd, BaLoRA nearest) at its best learning rate from a grid of eighth decades over
1e-4 .. 10; median and inter-quartile range over the seeds of the loss minus the rank-4 optimum.
The experiment itself is balora_kernels.demo.synthetic (also behind ``balora demo --synthetic``).

    python bench/study_synthetic.py --seeds 32 --out docs/study
Writes synthetic.json and synthetic.png under --out and prints the summary.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import json  # noqa: E402

import torch  # noqa: E402

from balora_kernels.demo import plot, synthetic  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/study")
    args = ap.parse_args(argv)
    lrs = [10 ** (-4 + 0.125 * i) for i in range(41)]          # 1e-4 .. 10, eighth decades
    t0 = time.perf_counter()
    res = synthetic.run_experiment(seeds=args.seeds, steps=args.steps, lrs=lrs, seed=args.seed)
    res["env"] = {"torch": torch.__version__, "python": platform.python_version(), "device": "cpu",
                  "date": datetime.date.today().isoformat(), "seconds": round(time.perf_counter() - t0, 1),
                  "command": " ".join(["python bench/study_synthetic.py", *sys.argv[1:]])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "synthetic.json").write_text(json.dumps(res, indent=1))
    print(synthetic.format_summary(res))
    print("wrote", out / "synthetic.json", plot.synthetic_curves(res, out / "synthetic.png"))


if __name__ == "__main__":
    main()
