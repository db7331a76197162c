import pytest
import torch

from diffusers_fewstep import DEFAULT_MODEL


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The test models are small: one thread runs them fastest, and spare OpenMP threads only spin when the
    2 CPU cores are shared (measured 10× slower with two threads on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fixture_pipe():
    """The vendored Fashion-MNIST DDPM (a real trained model), as a diffusers DDPMPipeline."""
    from diffusers import DDPMPipeline

    return DDPMPipeline.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def fixture_noise():
    return torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
