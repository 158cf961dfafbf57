"""Probe (device): does the C++ standard the op is compiled with decide whether its errors crash?"""
import os, subprocess, sys, re
import torch.utils.cpp_extension as ce
src = open(ce.__file__).read()
print("cpp_extension std flags:", sorted(set(re.findall(r"-std=c\+\+\d+", src))))
CHILD = """
import torch, sys
from torch.utils import cpp_extension
ns, flags = sys.argv[1], sys.argv[2].split()
cpp_extension.load(name='probe_' + ns, sources=['csrc/lora_linear.cpp'], build_directory='/tmp/probe_' + ns,
                   is_python_module=False, extra_cflags=['-O3', '-DBK_OP_NAMESPACE=' + ns] + flags)
op = getattr(torch.ops, ns).lora_linear
try:
    op(torch.randn(4, 6), torch.randn(5, 6), None, torch.randn(2, 7), torch.randn(5, 2), 1.0, None, False)
except RuntimeError as e:
    print('raised', str(e).splitlines()[0][:120])
"""
for ns, flags in (("p17", "-std=c++17"), ("p20", "-std=c++20"), ("pdef", "")):
    os.makedirs("/tmp/probe_" + ns, exist_ok=True)
    r = subprocess.run([sys.executable, "-c", CHILD, ns, flags], capture_output=True, text=True, timeout=200)
    print(ns, repr(flags), "rc", r.returncode, r.stdout.strip()[-200:], (r.stderr.strip().splitlines() or [""])[-1][-200:])
for f in ("/tmp/probe_pdef/build.ninja",):
    if os.path.exists(f):
        for line in open(f):
            if line.startswith(("cflags", "post_cflags", "ldflags")):
                print(line.strip()[:700])
