import torch

import balora_kernels as bk


def test_projector_balances_a_small_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(bk.BaLoRALinear(16, 24, 4), bk.BaLoRALinear(24, 16, 4))
    for m in net:
        torch.nn.init.normal_(m.lora_B)
    before = [(m.lora_B @ m.lora_A).detach().clone() for m in net]
    stats = bk.BalancedProjector(net).project().as_dict()
    assert stats["projected"] == 2 and stats["gap_after"] < 1e-6
    for m, p in zip(net, before):
        torch.testing.assert_close(m.lora_B @ m.lora_A, p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.lora_B.T @ m.lora_B, m.lora_A @ m.lora_A.T, rtol=1e-4, atol=1e-5)
