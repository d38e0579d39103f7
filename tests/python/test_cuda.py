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


def _ddp_steps(ddp, inputs, strict):
    """One DDP step per input; strict(step) says whether that step runs under torch's sync-debug mode "error"
    (any .item(), copy into pageable host memory or stream synchronisation raises)."""
    for step, x in enumerate(inputs):
        ddp.zero_grad()
        torch.cuda.set_sync_debug_mode("error" if strict(step) else "default")
        try:
            ddp(x).square().mean().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _small_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Flatten(),
                               torch.nn.Linear(16 * 8 * 8, 10)).cuda()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_ddp_hook_steps_without_a_fit_never_wait_for_the_device(tmp_path):
    """The hook's steps (error feedback, verification, adaptive-window vote, the default 4-bit QSGD sampling
    with the kernels on) never make the host wait for the device, except the first two (DDP rebuilds its
    buckets after the first) and those that open with a fit, provided DDP's own steps do not either."""
    if not gradiveq.cuda_kernels_built():
        pytest.skip("built without the CUDA kernels")
    gradiveq.set_cuda_kernels_enabled(True)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        inputs = [torch.randn(4, 3, 8, 8, device="cuda") for _ in range(14)]
        try:
            _ddp_steps(torch.nn.parallel.DistributedDataParallel(_small_cnn()), inputs[:5],
                       strict=lambda step: step > 1)
        except RuntimeError as e:
            pytest.skip(f"DDP's own steps wait for the device here: {e}")
        ddp = torch.nn.parallel.DistributedDataParallel(_small_cnn())
        state = gradiveq.GradiVeQState(energy=0.9, min_ratio=0.0, max_components=0, warmup_iters=1,
                                       sample_iters=2, compress_iters=3, error_feedback=True, verify_bases=True,
                                       restart_error_growth=1e6)
        gradiveq.register_hook(ddp, state)
        schedule = gradiveq.Schedule(1, 2, 3)
        _ddp_steps(ddp, inputs, strict=lambda step: step > 1 and not schedule.fits_after(step - 1))
        assert all(v["fits"] >= 2 for v in state.stats()["layers"].values() if v["compressible"])
    finally:
        dist.destroy_process_group()
        gradiveq.set_cuda_kernels_enabled(False)
