"""router_upcycling.mcore.cpu: megatron-core's RNG tracker really forks the CPU generator, nothing queues up."""
import torch

from router_upcycling.mcore.parallel import initialize_distributed


def test_rng_tracker_fork_sets_and_restores_the_cpu_generator_without_queueing():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    initialize_distributed(seed=0)
    model_parallel_cuda_manual_seed(123)
    tracker = get_cuda_rng_tracker()
    queued = len(torch.cuda._queued_calls)
    tracked_state = tracker.get_states()["model-parallel-rng"].clone()

    torch.manual_seed(7)
    outside_expected = torch.rand(4)
    torch.manual_seed(7)
    with tracker.fork():
        inside = torch.rand(4)
    outside = torch.rand(4)

    generator = torch.Generator()
    generator.set_state(tracked_state)
    torch.testing.assert_close(inside, torch.rand(4, generator=generator))  # the fork drew from the tracker's stream
    torch.testing.assert_close(outside, outside_expected)  # and gave the default stream back untouched
    with tracker.fork():
        assert not torch.equal(torch.rand(4), inside)  # the tracker's stream moved on

    for _ in range(1000):
        with tracker.fork():
            pass
    assert len(torch.cuda._queued_calls) == queued  # megatron's lazy CUDA calls no longer pile up on CPU


def test_cuda_names_resolve_to_the_host_inside_megatron_only():
    from megatron.core.optimizer import grad_scaler
    from megatron.core.pipeline_parallel import schedules

    initialize_distributed(seed=0)
    assert grad_scaler.torch.tensor([1.0], device="cuda").device.type == "cpu"
    assert schedules.torch.zeros([], device=torch.device("cuda", 0)).device.type == "cpu"
    assert schedules.torch.Tensor is torch.Tensor and schedules.torch.cuda is torch.cuda
    assert torch.zeros.__module__ != __name__ and torch.empty is grad_scaler.torch.empty.__wrapped__  # torch itself untouched
    x = torch.ones(2)
    assert x.cuda() is x and x.type() == "torch.FloatTensor"  # .type() answers CUDA names only inside megatron's optimizers
