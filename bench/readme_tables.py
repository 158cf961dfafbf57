"""Print the README's result tables (markdown) from the committed JSON in bench/results/.

    python bench/readme_tables.py

Every number in the README's results section is printed here from those files.
"""
import json
import os

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def projection(path=os.path.join(HERE, "projection-h200.json")):
    d = json.load(open(path))
    print(f"Projection — {d['gpu']}, torch {d['torch']}, triton {d['triton']}, CUDA {d['cuda']}, {d['date'][:10]}; "
          f"copy rate {d['copy_TBps']:.2f} TB/s; median ms\n")
    print("| model (adapters) | r | dtype | ours | gram | r x r | rescale | floor | ours / floor | plain batched | paper loop | paper / ours |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    f = lambda c, k: f"{c[k]:.3f}" if k in c else "-"  # noqa: E731
    for c in d["cases"]:
        print(f"| {c['model']} ({c['adapters']}) | {c['r']} | {c['dtype']} | {f(c, 'ours_ms')} | {f(c, 'gram_ms')} | "
              f"{f(c, 'eig_ms')} | {f(c, 'rescale_ms')} | {f(c, 'floor_ms')} | {c['ours_over_floor']:.1f} | "
              f"{f(c, 'torch_batched_ms')} | {c['paper_loop_ms']:.0f} | {c['speedup_vs_paper']:.0f}x |"
              if "paper_loop_ms" in c else
              f"| {c['model']} ({c['adapters']}) | {c['r']} | {c['dtype']} | {f(c, 'ours_ms')} | {f(c, 'gram_ms')} | "
              f"{f(c, 'eig_ms')} | {f(c, 'rescale_ms')} | {f(c, 'floor_ms')} | {c['ours_over_floor']:.1f} | - | - | - |")
    alt = [c for c in d["cases"] if "gram_triton_ms" in c or "rescale_triton_ms" in c]
    if alt:
        print("\nGram and rescale: the kernel ours takes (where it says cuda: csrc/grouped.cu up to r = 16, "
              "csrc/grouped_mma.cu above) beside the Triton kernels, same run, GPU ms\n")
        print("| model | r | dtype | Gram: ours (kernel) | Gram: Triton | rescale: ours (kernel) | rescale: Triton |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for c in alt:
            k = c["kernels"]
            print(f"| {c['model']} | {c['r']} | {c['dtype']} | {c['gram_ms']:.3f} ({k['gram']}) | "
                  f"{c.get('gram_triton_ms', c['gram_ms']):.3f} | {c['rescale_ms']:.3f} ({k['rescale']}) | "
                  f"{c.get('rescale_triton_ms', c['rescale_ms']):.3f} |")
    s = d.get("llama1b_step", {})
    if "step_ms" in s:
        print(f"\n1B Llama, one AdamW step (8 x 1024 tokens, bf16 autocast, PEFT LoRA r=16 on all linear layers): "
              f"{s['step_ms']:.1f} ms; projecting its {s['adapters']} adapters: ours {s['ours_projection_ms']:.2f} ms "
              f"= {100 * s['ours_over_step']:.2f}% of the step"
              + (f" (without the projector's per-call checks, follow_model=False, check_params=False: "
                 f"{s['ours_unchecked_projection_ms']:.2f} ms = {100 * s['ours_unchecked_over_step']:.2f}%)"
                 if "ours_unchecked_projection_ms" in s else "")
              + f"; the paper's loop {s['paper_loop_ms']:.0f} ms "
              f"= {100 * s['paper_over_step']:.0f}%.")


def tune_r64(head=os.path.join(HERE, "tune_projection-h200-r64-head-2026-12-02.json"),
             tree=os.path.join(HERE, "tune_projection-h200-r64-2026-12-02.json")):
    """The Triton Gram / rescale at r = 64: the previous commit's kernels beside this code's (same device call)."""
    if not (os.path.exists(head) and os.path.exists(tree)):
        return
    h, t = json.load(open(head)), json.load(open(tree))
    print(f"\nTriton Gram and rescale at r = 64, 7B adapters — {t['gpu']}, triton {t['triton']}, {t['date'][:10]}; "
          f"GPU ms (CUDA-graph replay of the kernel alone): the previous kernels and this code's, same device call "
          f"(bench/tune_projection.py; 'tuned': the best launch parameters its search found, now the defaults)\n")
    print("| kernel | dtype | before | now, old launch parameters | now, tuned |")
    print("| --- | --- | --- | --- | --- |")
    before = {(c["kernel"], c["dtype"]): c["default_ms"] for c in h["cases"]}
    for c in t["cases"]:
        print(f"| {c['kernel']} | {c['dtype']} | {before[(c['kernel'], c['dtype'])]:.3f} | {c['default_ms']:.3f} | "
              f"{c['best_ms']:.3f} |")


def lora_linear(path=os.path.join(HERE, "lora_linear-H200.json")):
    d = json.load(open(path))
    m = d["meta"]
    print(f"\nLoRA linear, {m['dtype']} — {m['gpu']}, torch {m['torch']}, triton {m['triton']}, {m['date'][:10]}; "
          f"forward + backward (input and adapter gradients), ratio to the frozen nn.Linear of the same run; "
          f"ours and 'unfused, beside ours' are ratios to the frozen layer timed again right beside them "
          f"(clocks drift within a run)\n")
    print("| case | frozen ms | unfused | PEFT | torch.compile | unfused, beside ours | ours | goal | peak MB frozen / unfused / ours |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, c in d["cases"].items():
        sh, rt, pr = c["shape"], c["ratio_to_frozen"], c["providers"]
        goal = c.get("goal_full_ratio")
        goal_s = f"<= {goal} ({'met' if c.get('goal_met') else 'missed'})" if goal else "-"
        print(f"| {sh['N']} tok, {sh['in_features']}->{sh['out_features']}, r{sh['r']} | {pr['frozen']['full']:.3f} | "
              f"{rt['unfused']['full']:.2f} | {rt['peft']['full']:.2f} | {rt['compiled']['full']:.2f} | "
              f"{rt['unfused_final']['full']:.2f} | {rt['ours']['full']:.2f} | {goal_s} | {pr['frozen']['peak_MB']:.0f} / {pr['unfused']['peak_MB']:.0f} / "
              f"{pr['ours']['peak_MB']:.0f} |")
    print("\nForward and backward apart (ratios to the frozen layer's forward / backward in the same run, as above):\n")
    print("| case | fwd: unfused | PEFT | torch.compile | ours | bwd: unfused | PEFT | torch.compile | ours |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, c in d["cases"].items():
        sh, rt = c["shape"], c["ratio_to_frozen"]
        cells = [f"{rt[p][mode]:.2f}" for mode in ("forward", "backward")
                 for p in ("unfused", "peft", "compiled", "ours")]
        print(f"| {sh['N']} tok, {sh['in_features']}->{sh['out_features']}, r{sh['r']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    projection()
    tune_r64()
    lora_linear()
