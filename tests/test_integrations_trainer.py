"""BaLoRACallback with transformers.Trainer: one projection per optimizer step, after it."""
import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from balora_kernels import reference  # noqa: E402
from balora_kernels.integrations.peft import to_balora  # noqa: E402
from balora_kernels.integrations.transformers import BaLoRACallback  # noqa: E402

VOCAB = 96


def tiny_peft(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seq=12):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Recorder(TrainerCallback):
    """Counts micro-batches (forwards) and optimizer steps as the Trainer reports them."""

    def __init__(self):
        self.optimizer_steps = self.substeps = self.step_ends = 0

    def on_optimizer_step(self, args, state, control, **kw):
        self.optimizer_steps += 1

    def on_substep_end(self, args, state, control, **kw):
        self.substeps += 1

    def on_step_end(self, args, state, control, **kw):
        self.step_ends += 1


@pytest.mark.parametrize("every", [1, 2])
def test_trainer_projects_once_per_optimizer_step(tmp_path, every):
    model = tiny_peft()
    balora = to_balora(model, every=every)
    proj = balora.projector
    seen = []                              # AdamW's step count at each projection
    opt_holder = {}
    orig_project = proj.project

    def project():
        opt = opt_holder["opt"]
        steps = {int(s["step"]) for s in opt.state.values()}
        seen.append(steps)
        return orig_project()
    proj.project = project

    class Grab(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            opt_holder["opt"] = optimizer

    rec = Recorder()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=3,
                             max_steps=4, learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=100,
                             save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(48),
                      callbacks=[Grab(), rec, BaLoRACallback(proj)])
    trainer.train()
    assert trainer.state.global_step == 4 and rec.optimizer_steps == 4 and rec.step_ends == 4
    assert rec.substeps == 4 * 2                      # 3 micro-batches per step: 2 sub-steps each
    assert proj.projections == 4 // every
    # Each projection ran right after optimizer step k (AdamW's per-parameter step == k).
    assert seen == [{k} for k in range(every, 5, every)]
    st = proj.last_stats.as_dict()
    assert st["projected"] == 14 and st["gap_after"] < 1e-5
    for _, A, B in proj.named_pairs:
        assert reference.balance_gap(*reference.grams(A, B)) < 1e-5
    balora.undo()


def test_callback_skips_skipped_steps_and_refuses_double_projection():
    model = tiny_peft(seed=1)
    proj = to_balora(model).projector
    cb = BaLoRACallback(proj)

    class State:
        global_step = 6

    class Skipped:
        step_was_skipped = True

    cb.on_optimizer_step(None, State(), None, optimizer=Skipped())
    assert proj.projections == 0
    cb.on_optimizer_step(None, State(), None, optimizer=object())
    assert proj.projections == 1 and proj.steps == 7
    proj.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="also attached"):
        cb.on_train_begin(None, State(), None)
    with pytest.raises(TypeError):
        BaLoRACallback(model)


def test_load_checkpoint_refused_by_the_optimizer_leaves_everything_as_it_was(tmp_path):
    """An optimizer whose parameter groups do not match the file's raises, and the model's tensors,
    the optimizer and the projector are left exactly as they were (nothing half-loaded)."""
    import balora_kernels as bk
    from balora_kernels.integrations.checkpoint import load_checkpoint, save_checkpoint
    torch.manual_seed(0)
    net = torch.nn.Sequential(bk.BaLoRALinear(12, 10, 3), bk.BaLoRALinear(10, 12, 3))
    for m in net:
        torch.nn.init.normal_(m.lora_B)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    proj = bk.BalancedProjector(net).attach(opt)
    net(torch.randn(4, 12)).sum().backward()
    opt.step()
    path = str(tmp_path / "ckpt.safetensors")
    save_checkpoint(path, net, opt, proj)
    for p in params:                                   # move away from the saved values
        p.data.add_(1.0)
    other = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2)  # 2 groups, file has 1
    before = [p.detach().clone() for p in params]
    opt_before, proj_before = other.state_dict(), proj.state_dict()
    with pytest.raises(ValueError):
        load_checkpoint(path, net, other, proj)
    for p, b in zip(params, before):
        assert torch.equal(p, b), "a model tensor was written before the optimizer refused the file"
    assert other.state_dict() == opt_before and proj.state_dict() == proj_before
