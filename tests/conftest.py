"""Helpers shared by the test modules."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from internvl_sft.model.convert import upstream_to_native
from internvl_sft.model.tiny import TinySizes, build_tiny_checkpoint

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
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


@contextmanager
def page_in_chromium(page: Path, profile: Path) -> Iterator:
    """A headless Chromium (selenium driver) showing a local HTML file; skips the test without Chromium."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian package chromium); the page is not checked in a browser")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        driver.set_window_size(1280, 2200)
        driver.get(page.as_uri())
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def tiny_native(tmp_path_factory):
    """A tiny InternVL2-1B-layout checkpoint (width 64, 2 layers, 112-px tiles) converted to the native layout."""
    root = tmp_path_factory.mktemp("tiny-native")
    build_tiny_checkpoint(root / "upstream", corpus=CORPUS, seed=1, sizes=TinySizes(vocab_size=300))
    upstream_to_native(root / "upstream", root / "native")
    return root / "native"
