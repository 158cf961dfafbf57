"""Builds the optional CUDA extension (``balora_kernels._C``) when it can; otherwise nothing.

The extension is built only when torch with CUDA and a CUDA toolkit are importable in the build
environment (``pip install --no-build-isolation .`` on a CUDA machine) and
``BALORA_SKIP_CUDA_BUILD`` is not set. Without it the package still works: the kernels JIT-build on
first GPU use (see ``balora_kernels._ext``) or fall back to Triton / PyTorch.
"""
import glob
import os

from setuptools import setup


def cuda_extensions():
    if os.environ.get("BALORA_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        return [], {}
    flags = _ext_module()
    ext = CUDAExtension(
        "balora_kernels._C", sources,
        extra_compile_args={"cxx": flags.CXX_FLAGS, "nvcc": ["-O3", *flags.CUDA_ARCH_FLAGS]},
    )
    return [ext], {"build_ext": BuildExtension}


def _ext_module():
    """balora_kernels/_ext.py loaded by path (the package itself is not importable before it is built): the
    compiler flags are the ones its JIT build uses."""
    import importlib.util
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_balora_ext_flags", os.path.join(here, "balora_kernels", "_ext.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def with_csrc_copy(cmdclass):
    """Ship csrc/ inside the package (balora_kernels/_csrc) so a regular install can JIT-build it."""
    from setuptools.command.build_py import build_py

    class BuildPyWithCsrc(build_py):
        def run(self):
            super().run()
            dst = os.path.join(self.build_lib, "balora_kernels", "_csrc")
            os.makedirs(dst, exist_ok=True)
            for path in glob.glob("csrc/*"):
                if os.path.isfile(path):
                    self.copy_file(path, os.path.join(dst, os.path.basename(path)))

    return {**cmdclass, "build_py": BuildPyWithCsrc}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=with_csrc_copy(cmdclass))
