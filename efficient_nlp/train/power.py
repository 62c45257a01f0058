"""Power and energy of a run: what the CPU packages, DRAM and GPUs drew, measured where the
machine exposes it, estimated otherwise.

Following Strubell et al. (2019), the energy and emissions of a run of wall time ``t`` are::

    E = PUE x (P_cpu + P_dram + sum_g P_gpu) x t          CO2 = E x carbon intensity

with ``PUE`` the data centre's power usage effectiveness (`energy_kwh` applies it) and each ``P``
the average power over the run.  Each power is obtained as follows:

- ``P_cpu`` and ``P_dram`` **measured**: `RaplReader` reads the RAPL energy counters of the CPU
  packages and of DRAM through the Linux powercap interface (`RAPL_ROOT`; whole machine); `rapl_delta_uj` takes the
  difference of two readings across a counter wrap, so the counters are read every
  `SAMPLE_SECONDS` by a background thread and no wrap is missed.
- ``P_gpu`` **measured**: `NvmlReader` reads NVIDIA's NVML through ``pynvml``: each GPU's energy
  counter, or, without one, its power sampled every `POWER_SAMPLE_SECONDS` and integrated.
- **Estimated** where nothing is readable, as in the Green Algorithms calculator (Lannelongue et
  al. 2021): `estimate_cpu_watts` gives ``P_cpu = watts per core x cores x utilisation`` with the
  utilisation ``process CPU time / (wall time x cores)``; `estimate_memory_watts` gives
  ``P_dram = watts per GB x peak resident memory``; an accelerator is taken at its thermal design
  power (usage factor 1, `efficient_nlp.train.compute.DEVICE_SPECS`).

The defaults of the assumptions (`PUE`, `CARBON_INTENSITY`, `CPU_WATTS_PER_CORE`,
`MEMORY_WATTS_PER_GB`) carry their sources; `efficient_nlp.train.compute.Meter` combines the
readings into the run's summary.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time

# ----------------------------------------------------------------------------- defaults
#: Power usage effectiveness: Strubell et al. 2019, from the Uptime Institute's 2018 survey.
PUE = 1.58
PUE_SOURCE = "Strubell et al. 2019 (Uptime Institute 2018 average data-centre PUE)"
#: kg CO2 per kWh: Strubell et al. 2019, the US EPA average (0.954 lb/kWh).
CARBON_INTENSITY = 0.433
CARBON_INTENSITY_SOURCE = "Strubell et al. 2019 (US EPA average, 0.954 lb CO2/kWh)"
#: Watts per CPU core at full load: the Green Algorithms calculator's value for an unknown
#: processor (Lannelongue et al. 2021); its table of server CPUs spans about 4-24 W per core.
CPU_WATTS_PER_CORE = 12.0
CPU_WATTS_SOURCE = "Green Algorithms default for an unknown CPU, Lannelongue et al. 2021"
#: Watts per GB of memory (Lannelongue et al. 2021).
MEMORY_WATTS_PER_GB = 0.3725
MEMORY_WATTS_SOURCE = "Green Algorithms, Lannelongue et al. 2021"
RAPL_ROOT = "/sys/class/powercap"
SAMPLE_SECONDS = 5.0        # RAPL counters wrap after minutes at full load: read them this often
POWER_SAMPLE_SECONDS = 1.0  # GPU power when no energy counter is readable


def _now():
    """The clock of the energy accounting (seconds; a function so tests can replace it)."""
    return time.perf_counter()


# ----------------------------------------------------------------------------- readers
def rapl_delta_uj(start: int, end: int, max_range_uj: int) -> int:
    """Microjoules between two readings of a RAPL counter that wraps to 0 after ``max_range_uj``
    (at most one wrap between readings: read at least once per wrap period)."""
    start, end = int(start), int(end)
    return end - start if end >= start else int(max_range_uj) - start + end


class RaplReader:
    """The CPU package and DRAM energy counters under ``root`` (Linux powercap, Intel and AMD).

    Zones ``intel-rapl:N`` named ``package-N`` are packages (their ``core`` / ``uncore``
    sub-zones are part of them and skipped, as is ``psys``, the whole platform); a zone named
    ``dram`` is memory.  ``available`` is False when no counter is readable (recent kernels let
    only root read them; ``problem`` says why).  ``sample()`` accumulates ``joules[part]``.
    """

    def __init__(self, root: str = RAPL_ROOT):
        self.zones = []  # [part, energy_uj path, max range, last reading]
        self.problem = None
        self.joules = {"package": 0.0, "dram": 0.0}
        self._lock = threading.Lock()
        try:
            entries = sorted(os.listdir(root))
        except OSError:
            self.problem = "no RAPL counters on this machine"
            return
        for entry in entries:
            if not re.fullmatch(r"intel-rapl:\d+(:\d+)?", entry):
                continue
            path = os.path.join(root, entry)
            try:
                with open(os.path.join(path, "name")) as f:
                    name = f.read().strip()
                part = "package" if name.startswith("package") and entry.count(":") == 1 else (
                    "dram" if name == "dram" else None)
                if part is None:
                    continue
                with open(os.path.join(path, "max_energy_range_uj")) as f:
                    max_range = int(f.read())
                with open(os.path.join(path, "energy_uj")) as f:
                    value = int(f.read())
            except (OSError, ValueError) as e:
                self.problem = f"RAPL counters not readable: {getattr(e, 'strerror', None) or e}"
                continue
            self.zones.append([part, os.path.join(path, "energy_uj"), max_range, value])
        if not self.zones and self.problem is None:
            self.problem = "no RAPL package counter on this machine"

    @property
    def available(self) -> bool:
        return bool(self.zones)

    def parts(self) -> set:
        return {z[0] for z in self.zones}

    def sample(self):
        with self._lock:
            for zone in self.zones:
                try:
                    with open(zone[1]) as f:
                        value = int(f.read())
                except (OSError, ValueError):
                    continue
                self.joules[zone[0]] += rapl_delta_uj(zone[3], value, zone[2]) * 1e-6
                zone[3] = value


class NvmlReader:
    """Energy of the visible NVIDIA GPUs through NVML (``pynvml``): the total-energy counter
    (Volta and later) or, without it, the power sampled every ``POWER_SAMPLE_SECONDS`` and
    integrated.  ``available`` is False without ``pynvml`` or GPUs (``problem`` says why)."""

    def __init__(self, nvml=None):
        self.problem, self.handles, self.names = None, [], []
        self.joules = 0.0
        self.counter = True
        self._lock = threading.Lock()
        self._nvml = nvml
        try:
            if nvml is None:
                import pynvml as nvml  # noqa: PLC0415 - optional dependency
                self._nvml = nvml
            nvml.nvmlInit()
            indices = range(nvml.nvmlDeviceGetCount())
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            if re.fullmatch(r"\d+(,\d+)*", visible.replace(" ", "")):
                indices = [int(i) for i in visible.replace(" ", "").split(",") if int(i) in indices]
            self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
            for h in self.handles:
                name = nvml.nvmlDeviceGetName(h)
                self.names.append(name.decode() if isinstance(name, bytes) else str(name))
        except Exception as e:  # noqa: BLE001 - no pynvml, no driver, no GPU
            self.problem = f"NVML not available ({type(e).__name__}: {e})"
            self.handles = []
            return
        if not self.handles:
            self.problem = "NVML sees no GPU"
            return
        try:
            self._last = [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles]  # mJ
        except Exception:  # noqa: BLE001 - before Volta: power only
            self.counter = False
            self._last = [self._power(h) for h in self.handles]
        self._time = _now()

    @property
    def available(self) -> bool:
        return bool(self.handles)

    def _power(self, handle):
        return self._nvml.nvmlDeviceGetPowerUsage(handle) * 1e-3  # mW -> W

    def sample(self):
        if not self.handles:
            return
        with self._lock:
            now = _now()
            try:
                if self.counter:
                    values = [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles]
                    self.joules += sum(max(v - u, 0) for u, v in zip(self._last, values)) * 1e-3
                else:
                    values = [self._power(h) for h in self.handles]
                    self.joules += sum(0.5 * (u + v) for u, v in zip(self._last, values)) * (now - self._time)
            except Exception:  # noqa: BLE001 - a failed reading is skipped
                return
            self._last, self._time = values, now

    def close(self):
        if self.handles:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass


class _Sampler(threading.Thread):
    """Reads the energy counters every ``interval`` seconds until ``stop()``."""

    def __init__(self, readers, interval):
        super().__init__(name="efficient_nlp-compute-sampler", daemon=True)
        self.readers, self.interval = readers, interval
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.wait(self.interval):
            for reader in self.readers:
                reader.sample()

    def stop(self):
        self._stop_event.set()
        self.join()


def estimate_cpu_watts(cpu_seconds: float, wall_seconds: float, cores: int,
                       watts_per_core: float) -> tuple[float, float]:
    """``(watts, utilisation)``: ``utilisation = cpu_seconds / (wall_seconds x cores)`` (at most
    1) and ``watts = watts_per_core x cores x utilisation`` (Lannelongue et al. 2021)."""
    if wall_seconds <= 0 or cores <= 0:
        return 0.0, 0.0
    utilisation = min(max(cpu_seconds, 0.0) / (wall_seconds * cores), 1.0)
    return watts_per_core * cores * utilisation, utilisation


def estimate_memory_watts(peak_bytes: float, watts_per_gb: float) -> float:
    """``watts_per_gb x peak_bytes / 1e9`` (Lannelongue et al. 2021: power of the memory in use)."""
    return watts_per_gb * max(peak_bytes, 0) / 1e9


def energy_kwh(joules: float, pue: float) -> float:
    """``PUE x joules`` in kWh (1 kWh = 3.6e6 J)."""
    return pue * joules / 3.6e6


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _peak_rss_bytes() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)


def _gb(x):
    return f"{x / 1e9:.2f} GB"


__all__ = [
    "CARBON_INTENSITY", "CARBON_INTENSITY_SOURCE", "CPU_WATTS_PER_CORE", "CPU_WATTS_SOURCE", "MEMORY_WATTS_PER_GB",
    "MEMORY_WATTS_SOURCE", "NvmlReader", "POWER_SAMPLE_SECONDS", "PUE", "PUE_SOURCE", "RAPL_ROOT", "RaplReader",
    "SAMPLE_SECONDS", "energy_kwh", "estimate_cpu_watts", "estimate_memory_watts", "rapl_delta_uj",
]
