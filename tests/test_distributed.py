"""Multi-process tests: DDP stays bitwise identical; FSDP2-sharded projection equals the unsharded one.

Two ranks are launched like torchrun (RANK / WORLD_SIZE / MASTER_ADDR=127.0.0.1 / a free port) on
``tests/dist_worker.py``, once per backend: gloo on CPU always, NCCL when two GPUs are present. The
worker runs every scenario and writes its measurements; the tests below assert on them.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("peft")
pytest.importorskip("transformers")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")
WORLD = 2
TIMEOUT_S = 240
BACKENDS = ["gloo", pytest.param("nccl", marks=[pytest.mark.gpu, pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL run needs 2 GPUs")])]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(backend, out_dir, attempts=3):
    """Run the workers; the free port is found before they bind it, so another process can take it in
    between: on "address already in use" only, try again on a new port."""
    for attempt in range(attempts):
        try:
            return _launch_once(backend, out_dir)
        except _PortTaken:
            if attempt == attempts - 1:
                raise


class _PortTaken(Exception):
    pass


def _launch_once(backend, out_dir):
    env = dict(os.environ, WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               PYTHONWARNINGS="ignore")
    if backend == "gloo" and os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = []
    for rank in range(WORLD):
        log = open(os.path.join(out_dir, f"log{rank}.txt"), "w")
        procs.append((subprocess.Popen([sys.executable, WORKER, "--backend", backend, "--out", str(out_dir)],
                                       env=dict(env, RANK=str(rank)), stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for p, _ in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for p, _ in procs:
            p.kill()
    finally:
        for p, log in procs:
            p.wait()
            log.close()
    failed = [r for r, (p, _) in enumerate(procs) if p.returncode != 0]
    if failed and any("ddress already in use" in open(os.path.join(out_dir, f"log{r}.txt")).read()
                      for r in range(WORLD)):
        raise _PortTaken()
    if failed:
        tails = "\n".join(f"--- rank {r} ---\n" + open(os.path.join(out_dir, f"log{r}.txt")).read()[-3000:]
                          for r in range(WORLD))
        pytest.fail(f"{backend} workers failed (ranks {failed}, return codes "
                    f"{[p.returncode for p, _ in procs]}):\n{tails}")
    res = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(WORLD)]
    keep = os.environ.get("BALORA_DIST_KEEP")           # bench/gpu_distributed.sh keeps the raw numbers
    if keep:
        os.makedirs(keep, exist_ok=True)
        with open(os.path.join(keep, f"dist_{backend}.json"), "w") as f:
            json.dump(res, f, indent=1)
    return res


@pytest.fixture(scope="module", params=BACKENDS)
def results(request, tmp_path_factory):
    return _launch(request.param, tmp_path_factory.mktemp(f"dist_{request.param}"))


def test_ddp_replicas_stay_bitwise_identical_for_50_steps(results):
    for res in results:
        ddp = res["ddp"]
        assert ddp["bitwise_equal"], "DDP replicas diverged"
        assert ddp["changed"] and ddp["projections"] == 50
        assert ddp["gap_before"] > 1e-3 and ddp["gap_after"] < 1e-6


@pytest.mark.parametrize("placement", ["long", "default"])
def test_fsdp2_projection_equals_unsharded(results, placement):
    gather = "all_gather_single" if "all_gather_single" in results[0][f"fsdp_{placement}"]["collectives"] \
        else "all_gather_into_tensor"
    for res in results:
        f = res[f"fsdp_{placement}"]
        assert f["plan"] == "ShardedProjectionPlan"
        c = f["collectives"]
        assert c["all_reduce"] == 1 and c["broadcast"] == 0 and c["all_gather"] == 0
        if placement == "long":       # no factor gathered: lora_A Shard(1), lora_B Shard(0)
            assert f["kinds"] == [["long", "long"]] and c[gather] == 0
        else:                         # FSDP2 default Shard(0): lora_A split along r -> one batched gather
            assert f["kinds"] == [["gather", "long"]] and c[gather] == 1
        assert f["projected"] == f["ref_projected"] == 14
        # Partial Grams are summed in float64 in another order: at most a few float32 ulps apart.
        assert f["proj_err"] <= 2e-6 and f["gap_after"] < 1e-6
        # 3 SGD steps, each rank half the batch, vs one process on the whole batch.
        assert f["train_err"] <= 1e-5
        assert f["fast_path_calls"] == 3 * 14 and f["train_projections"] == 4
    if placement == "long":           # each rank holds half of every factor's long side
        assert results[0]["fsdp_long"]["local_shapes"] == results[1]["fsdp_long"]["local_shapes"]
        assert all(a[0] == 4 and b[1] == 4 for a, b in results[0]["fsdp_long"]["local_shapes"])


def test_fsdp2_mixed_precision_projects_fp32_masters(results):
    for res in results:
        mp = res["fsdp_mp"]
        assert mp["master_dtypes"] == ["torch.float32"]
        assert mp["gap_after"] < 1e-6 and mp["product_err"] < 1e-6
        assert mp["bf16_copy_carries"], "the next forward did not see the projected masters"


def test_sharded_plan_layouts(results):
    for res in results:
        lay = res["layouts"]
        assert lay["kinds"] == [["gather", "long"], ["long", "full"], ["long", "gather"],
                                ["generic", "generic"], ["long", "long"]]
        assert lay["err"] <= 2e-6
        st = lay["stats"]
        assert st["pairs"] == 6 and st["projected"] == 5 and st["skipped_zero"] == 1 and st["gap_after"] < 1e-6
