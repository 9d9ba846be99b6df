"""Helpers shared by the test modules."""

import pytest
import torch


def randomize_lora_b(model: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> None:
    """Give every LoRA B matrix random values: freshly attached adapters are zero and would change nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


@pytest.fixture(scope="session")
def random_lora_b():
    return randomize_lora_b
