"""Probe (device): which errors raised by the extension's ops crash the process, and how it was built."""
import glob, os, subprocess, sys
CASES = {
    "lora_ok_cpu": "op(x, W, None, A, B, 1.0, None, False)",
    "lora_bad_shape_cpu": "op(x, W, None, torch.randn(2, 7), B, 1.0, None, False)",
    "lora_bad_shape_cuda": "op(x.cuda(), W.cuda(), None, torch.randn(2, 7, device='cuda'), B.cuda(), 1.0, None, False)",
    "lora_mm_error_cuda": "op(x.cuda(), W.cuda(), None, A.cuda(), B, 1.0, None, False)",
    "balance_bad_rank": "torch.ops.balora.balance_transforms(torch.zeros(1, 2, 16, 16, device='cuda'), "
                        "torch.zeros(1, dtype=torch.float64, device='cuda'), 999, 0, torch.zeros(1, 2, 16, 16, device='cuda'), "
                        "torch.zeros(1, dtype=torch.int32, device='cuda'), torch.zeros(1, 2, dtype=torch.float64, device='cuda'))",
    "aten_error": "torch.mm(torch.randn(2, 3), torch.randn(4, 5))",
}
PRE = ("import torch; from balora_kernels import _ext; assert _ext.load() is not None, _ext.error(); "
       "op = torch.ops.balora.lora_linear; x = torch.randn(4, 6); W = torch.randn(5, 6); A = torch.randn(2, 6); "
       "B = torch.randn(5, 2)\ntry:\n    {}\n    print('no error')\nexcept Exception as e:\n    print(type(e).__name__, str(e).splitlines()[0][:150])")
for name, code in CASES.items():
    r = subprocess.run([sys.executable, "-c", PRE.format(code)], capture_output=True, text=True, timeout=120)
    print(f"{name:22} rc={r.returncode} {r.stdout.strip()[:200]} {(r.stderr.strip().splitlines() or [''])[-1][:150] if r.returncode else ''}")
import torch
print("torch ABI", torch._C._GLIBCXX_USE_CXX11_ABI, torch.__version__)
for f in glob.glob(os.environ.get("BALORA_KERNELS_CACHE_DIR", ".bkcache") + "/*/build.ninja"):
    for line in open(f):
        if line.startswith(("cflags", "post_cflags", "ldflags", "cxx")):
            print(f.split("/")[-2], line.strip()[:600])
print(subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[0])
