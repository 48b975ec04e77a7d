"""Hardware and software facts recorded beside every benchmark result."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from typing import Any


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"load_average_1m": round(os.getloadavg()[0], 2), "cpu": _cpu_model(),
                            "cpu_cores_available": len(os.sched_getaffinity(0)),
                            "torch_threads": torch.get_num_threads(),
                            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        with open("/proc/meminfo") as fh:
            info["memory_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def versions() -> dict[str, str]:
    import lightning
    import timm
    import torch

    import pneumoscope

    commit = ""
    with contextlib.suppress(OSError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
    return {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
            "lightning": lightning.__version__, "pneumoscope": pneumoscope.__version__,
            "git_commit": commit}
