"""Helpers shared by the test modules."""

import pytest
import torch

from internvl_sft.model.convert import upstream_to_native
from internvl_sft.model.tiny import TinySizes, build_tiny_checkpoint

CORPUS = ("操作：点击\n参数：[481, 472]", "请根据屏幕截图，执行任务：点击微信app图标") * 4


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


@pytest.fixture(scope="session")
def tiny_native(tmp_path_factory):
    """A tiny InternVL2-1B-layout checkpoint (width 64, 2 layers, 112-px tiles) converted to the native layout."""
    root = tmp_path_factory.mktemp("tiny-native")
    build_tiny_checkpoint(root / "upstream", corpus=CORPUS, seed=1, sizes=TinySizes(vocab_size=300))
    upstream_to_native(root / "upstream", root / "native")
    return root / "native"
