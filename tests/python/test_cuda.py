"""The CUDA path from Python: the kernel switch (everywhere), and DDP with the C++ hook on one NCCL rank with
the kernels on, against plain all-reduce (skipped without a GPU)."""
import os

import pytest
import torch
import torch.distributed as dist

import gradiveq


def test_kernel_switch_is_off_by_default_and_refuses_a_build_without_kernels():
    if os.environ.get("GRADIVEQ_CUDA_KERNELS") is None:
        assert not gradiveq.cuda_kernels_enabled()
    if gradiveq.cuda_kernels_built():
        gradiveq.set_cuda_kernels_enabled(True)
        assert gradiveq.cuda_kernels_enabled()
    else:
        with pytest.raises(ValueError, match="enabled"):
            gradiveq.set_cuda_kernels_enabled(True)
    gradiveq.set_cuda_kernels_enabled(False)
    assert not gradiveq.cuda_kernels_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kernels", [False, True])
def test_ddp_hook_on_one_nccl_rank_averages_like_plain_all_reduce(tmp_path, kernels):
    if kernels and not gradiveq.cuda_kernels_built():
        pytest.skip("built without the CUDA kernels")
    gradiveq.set_cuda_kernels_enabled(kernels)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Flatten(),
                                    torch.nn.Linear(16 * 8 * 8, 10)).cuda()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        state = gradiveq.GradiVeQState(energy=1.0, min_ratio=0.0, max_components=0, coeff_dtype=torch.float32,
                                       uncompressed_dtype=torch.float32, warmup_iters=1, sample_iters=2,
                                       compress_iters=3, sample_quantizer="none")
        gradiveq.register_hook(ddp, state)
        for step in range(6):  # warm-up, sampling, compressed: one rank's average is its own gradient
            x = torch.randn(4, 3, 8, 8, device="cuda")
            want = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
            ddp.zero_grad()
            ddp(x).square().mean().backward()
            for w, p in zip(want, model.parameters()):
                assert torch.allclose(p.grad, w, rtol=1e-4, atol=1e-6), f"step {step}"
    finally:
        dist.destroy_process_group()
        gradiveq.set_cuda_kernels_enabled(False)
