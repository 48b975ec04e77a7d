"""Shared fixtures. Tests never touch ../shared or the network: images are synthetic."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Hub calls must fail fast here (no internet in CI), and caches stay inside the test run.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PNEUMOSCOPE_NO_REEXEC", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNEUMOSCOPE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def kermany_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic Kermany-style tree (train/val/test x NORMAL/PNEUMONIA)."""
    from pneumoscope.data.synthetic import write_kermany_tree

    return write_kermany_tree(tmp_path_factory.mktemp("kermany") / "chest_xray", size=96, seed=0)


@pytest.fixture(scope="session")
def learnable_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A larger synthetic tree for the test that training must actually learn."""
    from pneumoscope.data.synthetic import write_kermany_tree

    counts = {"train": (80, 120), "val": (24, 30), "test": (40, 50)}
    return write_kermany_tree(tmp_path_factory.mktemp("learnable") / "chest_xray", counts,
                              size=64, seed=1)
