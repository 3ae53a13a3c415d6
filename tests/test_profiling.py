"""medgen.profiling.TensorMemory against allocation patterns whose byte counts are known."""

import torch

from medgen.profiling import TensorMemory

MIB = 2**20


def test_counts_allocations_views_and_frees():
    with TensorMemory() as mem:
        a = torch.empty(MIB, dtype=torch.uint8)
        b = torch.empty(2 * MIB, dtype=torch.uint8)
        view = a.view(-1)[10:]  # same storage: not counted again
        assert mem.current_bytes == 3 * MIB
        c = a + 1  # new storage
        assert mem.current_bytes == mem.peak_bytes == 4 * MIB
        del a, view, c
        assert mem.current_bytes == 2 * MIB  # `a` goes only with its last view
        d = torch.empty(MIB // 2, dtype=torch.uint8)
        assert mem.current_bytes == 2 * MIB + MIB // 2
        assert mem.peak_bytes == 4 * MIB
        mem.reset_peak()
        assert mem.peak_bytes == mem.current_bytes
    del b, d


def test_autograd_saved_tensors_and_backward():
    n, numel = 5, 256 * 1024
    nbytes = numel * 4
    x = torch.randn(numel, requires_grad=True)
    with TensorMemory() as mem:
        mem.track(x)
        h = x
        for _ in range(n):
            h = torch.sin(h)  # sin saves its input for backward
        # x, the n - 1 intermediate outputs (saved by the next sin) and the last output
        assert mem.current_bytes == (n + 1) * nbytes
        h.sum().backward()
        del h
        assert mem.current_bytes == 2 * nbytes  # x and x.grad
        assert mem.peak_bytes >= (n + 1) * nbytes
    with TensorMemory() as mem, torch.no_grad():
        mem.track(x)
        h = x
        for _ in range(n):
            h = torch.sin(h)  # nothing saved: each output frees the previous one
        assert mem.current_bytes == 2 * nbytes
        assert mem.peak_bytes <= 3 * nbytes


def test_optimizer_state_after_a_training_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 256)
    opt = torch.optim.Adam(model.parameters(), foreach=False)
    x = torch.randn(64, 512)
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    with TensorMemory() as mem:
        mem.track(model, x)
        assert mem.current_bytes == param_bytes + x.numel() * 4
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        # parameters, input, Adam's exp_avg and exp_avg_sq, and one fp32 `step` scalar per parameter
        assert mem.current_bytes == 3 * param_bytes + x.numel() * 4 + 4 * 2
        assert mem.peak_bytes >= mem.current_bytes + param_bytes  # the gradients lived during the step
