import os
import tempfile

# Before triton is imported anywhere: kernels run on CPU tensors through the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Prepared-data caches of the test runs stay out of the user's own cache.
os.environ.setdefault("MDPO_FAST_CACHE", tempfile.mkdtemp(prefix="mdpo-fast-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_processor():
    from mdpo_fast.tiny import build_processor

    return build_processor()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from mdpo_fast.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from mdpo_fast.demo_data import write_demo_data

    directory = tmp_path_factory.mktemp("demo-data")
    write_demo_data(directory, n=24)
    return directory


def randomize_lora(policy, seed: int = 1) -> None:
    """Adapters that do something (peft starts them at zero), so the policy differs from the reference."""
    torch.manual_seed(seed)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)


@pytest.fixture
def fresh_dynamo():
    """FlexAttention compiled from scratch: on CPU, inductor's template for the recompile that a second row width
    triggers (dynamic shapes) does not build, so a test compiling FlexAttention must not inherit another's."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
