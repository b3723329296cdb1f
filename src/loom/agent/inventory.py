"""What this machine has: CPU, memory, disk, and GPUs.

GPUs come from a `GpuProbe`: NVML on machines with NVIDIA drivers, a declared inventory
file for devices NVML cannot see, or nothing. Whatever is reported is a *claim*: the
coordinator never sells a device on what this module says.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loom.core.catalog import normalize_model
from loom.protocol.messages import GpuInfo, Inventory, Load


class InventoryError(ValueError):
    """A declared inventory file that cannot be used; the message says what to change."""


class GpuProbe(Protocol):
    def gpus(self) -> list[GpuInfo]: ...

    def utilization(self) -> list[float]: ...


def slug_for(display_name: str) -> str:
    """The catalog slug for a driver's display name, or a cleaned-up name if unknown."""
    try:
        return normalize_model(display_name)
    except ValueError:
        return display_name.strip().lower().replace(" ", "-")[:64]


class NoGpus:
    def gpus(self) -> list[GpuInfo]:
        return []

    def utilization(self) -> list[float]:
        return []


class NvmlProbe:
    """GPUs through NVML (nvidia-ml-py). Raises RuntimeError when NVML is unavailable."""

    def __init__(self) -> None:
        import pynvml

        self._nvml: Any = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise RuntimeError(f"NVML unavailable: {exc}") from exc

    def gpus(self) -> list[GpuInfo]:
        nv = self._nvml
        out: list[GpuInfo] = []
        driver = _text(nv.nvmlSystemGetDriverVersion())
        for i in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            name = _text(nv.nvmlDeviceGetName(handle))
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            try:
                major, minor = nv.nvmlDeviceGetCudaComputeCapability(handle)
                cc = f"{major}.{minor}"
            except nv.NVMLError:
                cc = ""
            out.append(
                GpuInfo(
                    index=i,
                    model=slug_for(name),
                    name=name,
                    vram_mb=int(mem.total) // (1 << 20),
                    uuid=_text(nv.nvmlDeviceGetUUID(handle)),
                    driver=driver,
                    compute_capability=cc,
                )
            )
        return out

    def utilization(self) -> list[float]:
        nv = self._nvml
        values: list[float] = []
        for i in range(nv.nvmlDeviceGetCount()):
            try:
                rates = nv.nvmlDeviceGetUtilizationRates(nv.nvmlDeviceGetHandleByIndex(i))
                values.append(float(rates.gpu))
            except nv.NVMLError:
                values.append(0.0)
        return values


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _DeclaredEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(pattern="^(gpu|cpu)$")
    model: str
    vram_gb: float | None = Field(default=None, gt=0, le=4096)
    count: int = Field(default=1, ge=1, le=64)


class DeclaredProbe:
    """Devices an operator declares in a YAML file (`loom worker start --inventory FILE`).

    Each entry: `kind` (gpu|cpu), `model`, for GPUs `vram_gb`, optionally `count`.
    Declared devices are claims like any other and must pass the challenge to be sold.
    """

    def __init__(self, entries: list[GpuInfo], cpu_model: str | None) -> None:
        self._gpus = entries
        self.cpu_model = cpu_model

    @classmethod
    def from_file(cls, path: Path) -> DeclaredProbe:
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise InventoryError(f"cannot read inventory file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise InventoryError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, list):
            raise InventoryError(f"{path}: expected a YAML list of devices (- kind: gpu …)")
        gpus: list[GpuInfo] = []
        cpu_model: str | None = None
        for i, raw in enumerate(data):
            try:
                entry = _DeclaredEntry.model_validate(raw)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"]) or "entry"
                raise InventoryError(f"{path}: [{i}].{where}: {err['msg']}") from None
            if entry.kind == "cpu":
                cpu_model = entry.model
                continue
            if entry.vram_gb is None:
                raise InventoryError(f"{path}: [{i}].vram_gb: required for a gpu entry")
            for _ in range(entry.count):
                gpus.append(
                    GpuInfo(
                        index=len(gpus),
                        model=slug_for(entry.model),
                        name=entry.model,
                        vram_mb=int(entry.vram_gb * 1024),
                        declared=True,
                    )
                )
        return cls(gpus, cpu_model)

    def gpus(self) -> list[GpuInfo]:
        return list(self._gpus)

    def utilization(self) -> list[float]:
        return [0.0 for _ in self._gpus]


def default_probe() -> GpuProbe:
    """NVML when it works here, else no GPUs."""
    try:
        return NvmlProbe()
    except (ImportError, RuntimeError):
        return NoGpus()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0])  # kB
    except (OSError, ValueError, IndexError):
        pass
    return out


def collect(probe: GpuProbe, work_dir: Path, *, runtimes: list[str]) -> Inventory:
    mem = _meminfo()
    work_dir.mkdir(parents=True, exist_ok=True)
    disk = shutil.disk_usage(work_dir)
    declared_cpu = probe.cpu_model if isinstance(probe, DeclaredProbe) else None
    try:
        import ray

        ray_version = str(ray.__version__)
    except ImportError:  # pragma: no cover - ray is a dependency
        ray_version = ""
    return Inventory(
        cpu_model=declared_cpu or cpu_model(),
        cpu_cores=os.cpu_count() or 1,
        ram_mb=mem.get("MemTotal", 0) // 1024,
        disk_free_mb=disk.free // (1 << 20),
        gpus=probe.gpus(),
        hostname=socket.gethostname(),
        os=f"{platform.system()} {platform.release()}",
        ray_version=ray_version,
        runtimes=runtimes,
    )


class LoadSampler:
    """CPU and memory load from /proc, GPU utilization from the probe."""

    def __init__(self, probe: GpuProbe) -> None:
        self.probe = probe
        self._last = self._cpu_times()

    @staticmethod
    def _cpu_times() -> tuple[int, int]:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            values = [int(v) for v in fields]
        except (OSError, ValueError, IndexError):
            return (0, 0)
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return (sum(values), idle)

    def sample(self) -> Load:
        total, idle = self._cpu_times()
        last_total, last_idle = self._last
        self._last = (total, idle)
        dt = total - last_total
        cpu = 100.0 * (1 - (idle - last_idle) / dt) if dt > 0 else 0.0
        mem = _meminfo()
        used_mb = (mem.get("MemTotal", 0) - mem.get("MemAvailable", 0)) // 1024
        return Load(
            cpu_percent=round(cpu, 1),
            mem_used_mb=used_mb,
            gpu_util_percent=self.probe.utilization(),
        )
