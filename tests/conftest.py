import os

import pytest
import torch


# Tests never reach the network: every model is built from a config, every tokenizer written locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_components():
    """Fresh tiny components (separate branches, 4 classes, ignore_index 255) for one test."""
    from diffusers_uncertainty import build_tiny_components

    return build_tiny_components(num_classes=4, ignore_index=255)


@pytest.fixture
def tiny_pipeline(tiny_components):
    from diffusers_uncertainty import StableDiffusionDualControlPipeline

    pipeline = StableDiffusionDualControlPipeline(**tiny_components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def one_thread():
    """One torch thread, as in the `accelerate launch`ed runs, so that in-process results compare with theirs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
