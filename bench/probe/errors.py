import os, subprocess, sys
import torch
from torch.utils import cpp_extension
os.makedirs("/tmp/bkprobe", exist_ok=True)
lib = cpp_extension.load(name="bkprobe", sources=["bench/probe/errors.cpp"], build_directory="/tmp/bkprobe",
                         is_python_module=False, extra_cflags=["-O3"])
for name in ("lit", "dev", "i64", "sizes", "tostr", "stdexc", "valerr", "oss"):
    code = ("import torch; torch.ops.load_library('/tmp/bkprobe/bkprobe.so')\ntry:\n    getattr(torch.ops.bkprobe, '%s')"
            "(torch.randn(2))\nexcept Exception as e:\n    print(type(e).__name__, str(e).splitlines()[0][:100])" % name)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    print(f"{name:8} rc={r.returncode} {r.stdout.strip()}")
