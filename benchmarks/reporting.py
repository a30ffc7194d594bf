"""Helpers every benchmark report shares: what machine and software measured it, and the command that reproduces it.

Benchmarks run as scripts (``python benchmarks/<name>.py``), so Python puts this folder on ``sys.path`` and they
import this module as ``reporting``. Statistics (Wilson intervals, paired bootstraps) live in the library,
:mod:`gym_libero_vla.evaluate`, because evaluation reports use them too.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import shlex

# The simulator's results depend on these and on the CPU: the same code has made different demos (a few episodes
# of LIBERO-Spatial flip between success and failure) on two machines, and LIBERO's scenes change with MuJoCo.
SIMULATOR_PACKAGES = ("mujoco", "robosuite", "numpy", "scipy")


def package_versions(packages=SIMULATOR_PACKAGES) -> dict[str, str]:
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def machine_info(torch_threads: int | None = None) -> dict:
    """CPU, OS, Python, torch and simulator package versions; the 1-minute load average at the time of the call."""
    info = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if torch_threads is not None:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch_threads)
    info.update(package_versions())
    info["cpu_model"] = cpu_model()
    return info


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line(args, script: str) -> str:
    """The command that runs ``script`` with ``args``, a tyro dataclass (flags only where they differ from its defaults)."""
    parts = ["python", script]
    for field in dataclasses.fields(args):
        value, flag = getattr(args, field.name), "--" + field.name.replace("_", "-")
        if value == field.default:
            continue
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + field.name.replace("_", "-"))
        elif isinstance(value, tuple):
            parts += [flag, *(str(item) for item in value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)
