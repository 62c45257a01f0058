"""What a run cost: training FLOPs, throughput, MFU, energy and CO2, each number with its source.

Use::

    with compute.Meter(config) as meter:      # `recipes.run_recipe` wraps every recipe in one
        model, history = train.fit(...)       # each executed training step is reported
    summary = meter.summary()                 # a JSON-ready dict
    print(compute.format_summary(summary))

This module holds the options (``config.compute``: `default_compute_config`, `compute_options`),
the table of devices (`DEVICE_SPECS`), the `Meter` and its output (`format_summary`,
`attach_summary`, `report`).  What it combines comes from two modules:

**FLOPs** (`efficient_nlp.train.step_cost`).  ``train.fit`` and ``train.run`` report every step
they execute to the current meters.  The FLOPs of a step come from XLA's cost analysis of the
jitted step, analysed once per compiled signature; when no analysis is available, from the FLOPs
model of `efficient_nlp.models.flops.train_flops` (three forward passes).

**Throughput and MFU.**  Steps, examples (the leading dimension of the batch) and tokens (the
size of ``batch["input_ids"]``) per second are measured over the training steps' own time: from
the end of the first step of a compiled signature (its compilation excluded) to the points where
the loop waits for the device anyway (logging, evaluation, the end), so evaluation and
checkpointing are not counted and no step is synchronised for the meter.  Model FLOPs
utilisation is ``achieved FLOP/s / (devices x peak FLOP/s per device)`` (Chowdhery et al. 2022),
with the bf16 dense peak of the device from `DEVICE_SPECS`; unknown (None, with the reason) for
devices not in the table, CPUs included, unless ``config.compute.peak_flops_per_second`` gives it.

**Energy and CO2** (`efficient_nlp.train.power`; Strubell et al. 2019)::

    E = PUE x (P_cpu + P_dram + sum_g P_gpu) x t          CO2 = E x carbon intensity

over the wall time ``t`` of the whole run (data preparation, compilation and evaluation
included).  Each part is measured where the machine exposes it (RAPL counters for the CPU
packages and DRAM, NVML for NVIDIA GPUs) and otherwise estimated as in the Green Algorithms
calculator (Lannelongue et al. 2021): CPU cores at their watts per core times the process's
utilisation, memory at 0.3725 W/GB of peak resident memory, an accelerator at its thermal design
power.  The summary names the source of every number.

We keep our own small meter rather than depending on ``codecarbon``: it pulls in about twenty
packages (pandas, pydantic, an auth stack, a CLI stack, prometheus_client ...) and looks the
carbon intensity up online, while the measurement itself (RAPL, NVML, a TDP estimate) fits in
`efficient_nlp.train.power`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
import time

import jax

from efficient_nlp.train import power
from efficient_nlp.train.power import (
    CARBON_INTENSITY,
    CARBON_INTENSITY_SOURCE,
    CPU_WATTS_PER_CORE,
    CPU_WATTS_SOURCE,
    MEMORY_WATTS_PER_GB,
    MEMORY_WATTS_SOURCE,
    POWER_SAMPLE_SECONDS,
    PUE,
    PUE_SOURCE,
    RAPL_ROOT,
    SAMPLE_SECONDS,
)
from efficient_nlp.train.step_cost import _ACTIVE

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- options
def default_compute_config():
    """``config.compute`` defaults (the section is optional; any key may be left out)."""
    import ml_collections
    return ml_collections.ConfigDict(dict(
        enabled=True,                    # False: run_recipe adds no compute section
        pue=PUE,                         # data-centre power usage effectiveness (>= 1)
        carbon_intensity_kg_per_kwh=CARBON_INTENSITY,
        cpu_watts_per_core=CPU_WATTS_PER_CORE,    # estimate when RAPL is not readable
        memory_watts_per_gb=MEMORY_WATTS_PER_GB,  # estimate when RAPL has no DRAM counter
        peak_flops_per_second=0.0,       # per device, for MFU; 0: from the device table
    ))


@dataclasses.dataclass(frozen=True)
class ComputeOptions:
    """The resolved ``config.compute``; ``given`` names the keys the config set."""
    enabled: bool = True
    pue: float = PUE
    carbon_intensity_kg_per_kwh: float = CARBON_INTENSITY
    cpu_watts_per_core: float = CPU_WATTS_PER_CORE
    memory_watts_per_gb: float = MEMORY_WATTS_PER_GB
    peak_flops_per_second: float = 0.0
    given: frozenset = frozenset()


def compute_options(config=None) -> ComputeOptions:
    """Reads ``config.compute`` (a config with that section, the section itself as a dict, or
    None) against the defaults; a bad value raises ``ValueError`` naming the key."""
    section = None
    if config is not None:
        try:
            section = config.get("compute") if hasattr(config, "get") else getattr(config, "compute", None)
        except (AttributeError, KeyError):
            section = None
        if section is None and isinstance(config, dict) and "pue" in config:
            section = config
    values, given = {}, set()
    known = [f.name for f in dataclasses.fields(ComputeOptions) if f.name != "given"]
    if section is not None:
        unknown = sorted(set(section.keys()) - set(known))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in config.compute; known keys: {known}")
        for name in known:
            value = section.get(name)
            if value is None:
                continue
            given.add(name)
            if name == "enabled":
                values[name] = bool(value)
                continue
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"config.compute.{name} must be a number, got {value!r}") from None
            lowest = 1.0 if name == "pue" else 0.0
            if not value >= lowest or value == float("inf"):
                raise ValueError(f"config.compute.{name} must be a finite number >= {lowest:g}, got {value!r}")
            values[name] = value
    return ComputeOptions(**values, given=frozenset(given))


# ----------------------------------------------------------------------------- devices
@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Peak dense bf16 FLOP/s of one JAX device and its thermal design power (None: unknown)."""
    name: str
    peak_flops_per_second: float
    tdp_watts: float | None
    source: str


_NV = "NVIDIA {} datasheet, BF16 Tensor Core dense (half the sparse figure)"
_TPU = "Google Cloud TPU documentation, {} bf16 peak per chip"
#: ``(regex on the lower-cased jax device_kind, spec)``, the first match wins.  Values are per
#: JAX device: one chip for these TPUs (one TensorCore, or two as a megacore) and GPUs.
DEVICE_SPECS = (
    (r"^tpu v4$", DeviceSpec("TPU v4", 275e12, None, _TPU.format("TPU v4"))),
    (r"^tpu v5( lite|e)$", DeviceSpec("TPU v5e", 197e12, None, _TPU.format("TPU v5e"))),
    (r"^tpu v5p?$", DeviceSpec("TPU v5p", 459e12, None, _TPU.format("TPU v5p"))),
    (r"^tpu v6( lite|e)$", DeviceSpec("TPU v6e", 918e12, None, _TPU.format("TPU v6e (Trillium)"))),
    (r"h100.*pcie", DeviceSpec("H100 PCIe", 756e12, 350.0, _NV.format("H100 PCIe"))),
    (r"h100.*nvl", DeviceSpec("H100 NVL", 835e12, 400.0, _NV.format("H100 NVL"))),
    (r"h200.*nvl", DeviceSpec("H200 NVL", 835e12, 600.0, _NV.format("H200 NVL"))),
    (r"gh200", DeviceSpec("GH200", 989e12, None, _NV.format("GH200 (H100-class GPU)"))),
    (r"h200", DeviceSpec("H200 SXM", 989e12, 700.0, _NV.format("H200 SXM"))),
    (r"h100", DeviceSpec("H100 SXM", 989e12, 700.0, _NV.format("H100 SXM"))),
    (r"a100.*pcie", DeviceSpec("A100 PCIe", 312e12, 300.0, _NV.format("A100 PCIe 80GB"))),
    (r"a100", DeviceSpec("A100 SXM", 312e12, 400.0, _NV.format("A100 SXM"))),
    (r"\bl4\b", DeviceSpec("L4", 121e12, 72.0, _NV.format("L4"))),
)


def device_spec(device_kind: str) -> DeviceSpec | None:
    """The `DEVICE_SPECS` entry of a ``jax.Device.device_kind`` (None when not in the table)."""
    kind = str(device_kind).strip().lower()
    for pattern, spec in DEVICE_SPECS:
        if re.search(pattern, kind):
            return spec
    return None


def _device_info(options: ComputeOptions) -> dict:
    device = jax.devices()[0]
    kind, platform = str(device.device_kind), device.platform
    spec = device_spec(kind)
    info = {"platform": platform, "kind": kind, "count": jax.device_count(),
            "peak_flops_per_second": None, "peak_source": None}
    if options.peak_flops_per_second:
        info.update(peak_flops_per_second=options.peak_flops_per_second,
                    peak_source="config.compute.peak_flops_per_second")
    elif spec is not None:
        info.update(peak_flops_per_second=spec.peak_flops_per_second, peak_source=spec.source)
    if jax.process_count() > 1:
        info["hosts"] = jax.process_count()
    return info


# ----------------------------------------------------------------------------- the meter
class Meter:
    """Accounts the compute of what runs inside ``with Meter(config) as meter:`` (module doc).

    Args:
      config: a config with an optional ``compute`` section (`default_compute_config`), or None.
      rapl_root: where the RAPL counters are (tests use a fake tree).
      nvml: an NVML module to use instead of ``pynvml`` (tests).
    """

    def __init__(self, config=None, *, rapl_root: str = RAPL_ROOT, nvml=None):
        self.options = compute_options(config)
        self._rapl_root, self._nvml_module = rapl_root, nvml
        self.started_at = None  # time.time() at entry
        self._t0 = self._t1 = None
        self._token = None
        self.steps = self.examples = self.tokens = 0
        self.flops = 0.0
        self.steps_without_flops = 0
        self.flops_sources, self.flops_problems = [], []
        self.timed = {"seconds": 0.0, "device_seconds": 0.0, "steps": 0, "examples": 0, "tokens": 0,
                      "flops": 0.0, "steps_without_flops": 0}
        self._lock = threading.Lock()

    # -- context
    def __enter__(self):
        if self._token is not None:
            raise RuntimeError("a Meter measures one block: make a new Meter for each `with`")
        # No JAX call here: a recipe may still have to initialise multi-host JAX.
        self.device = None
        self.rapl = power.RaplReader(self._rapl_root)
        self.nvml = power.NvmlReader(self._nvml_module)
        readers = [r for r in (self.rapl, self.nvml) if r.available]
        interval = POWER_SAMPLE_SECONDS if self.nvml.available and not self.nvml.counter else SAMPLE_SECONDS
        self._sampler = power._Sampler(readers, interval) if readers else None
        self.started_at = time.time()
        self._cpu0 = power._cpu_seconds()
        self._t0, self._t1 = power._now(), None
        if self._sampler is not None:
            self._sampler.start()
        self._token = _ACTIVE.set(_ACTIVE.get() + (self,))
        return self

    def __exit__(self, *exc):
        _ACTIVE.reset(self._token)
        self._finish()
        return False

    def _finish(self):
        if self._t1 is not None:
            return
        if self._sampler is not None:
            self._sampler.stop()
        for reader in (self.rapl, self.nvml):
            if reader.available:
                reader.sample()
        self._t1 = power._now()
        self._cpu1 = power._cpu_seconds()
        self._peak_rss = power._peak_rss_bytes()
        self.nvml.close()
        self.device = _device_info(self.options)

    # -- what MeteredStep reports
    def _add_step(self, examples, tokens, flops, source):
        with self._lock:
            self.steps += 1
            self.examples += examples or 0
            self.tokens += tokens or 0
            if flops is None:
                self.steps_without_flops += 1
                if source not in self.flops_problems:
                    self.flops_problems.append(source)
            else:
                self.flops += flops
                if source not in self.flops_sources:
                    self.flops_sources.append(source)

    def _add_timed(self, seconds, devices, steps, examples, tokens, flops, unknown):
        with self._lock:
            t = self.timed
            t["seconds"] += seconds
            t["device_seconds"] += seconds * devices
            t["steps"] += steps
            t["examples"] += examples
            t["tokens"] += tokens
            t["flops"] += flops
            t["steps_without_flops"] += unknown

    # -- results
    def summary(self) -> dict:
        """The JSON-ready accounting (while active: up to now).  See docs/compute.md."""
        if self._t0 is None:
            raise RuntimeError("Meter.summary() needs the meter to have been entered (with Meter(...):)")
        active = self._t1 is None
        wall = (power._now() if active else self._t1) - self._t0
        cpu = (power._cpu_seconds() if active else self._cpu1) - self._cpu0
        peak_rss = power._peak_rss_bytes() if active else self._peak_rss
        if self.device is None:
            self.device = _device_info(self.options)
        out = {"wall_seconds": wall, **self._throughput()}
        out.update(self._energy(wall, cpu, peak_rss))
        return out

    def _throughput(self) -> dict:
        t = self.timed
        steps = self.steps
        known = steps - self.steps_without_flops
        out = {"steps": steps, "examples": self.examples, "tokens": self.tokens or None,
               "train_seconds": t["seconds"] or None,
               "flops_per_step": self.flops / known if known else None,
               "flops_source": "; ".join(self.flops_sources) or None,
               "train_flops": self.flops if known else None}
        if self.steps_without_flops:
            out["flops_note"] = (f"{self.steps_without_flops} of {steps} steps without FLOPs: "
                                 + "; ".join(self.flops_problems))
        if steps == 0:
            out["flops_note"] = "no training step ran"
        seconds = t["seconds"]
        rate = (lambda n: n / seconds if seconds > 0 and n else None)
        out.update(steps_per_second=rate(t["steps"]), examples_per_second=rate(t["examples"]),
                   tokens_per_second=rate(t["tokens"]),
                   flops_per_second=rate(t["flops"]) if not t["steps_without_flops"] else None)
        peak = self.device["peak_flops_per_second"]
        out["device"] = dict(self.device)
        out["mfu"], out["mfu_note"] = None, None
        if not steps:
            out["mfu_note"] = "no training step ran"
        elif not t["steps"]:
            out["mfu_note"] = "no timed training step (the loop never waited for the device)"
        elif out["flops_per_second"] is None:
            out["mfu_note"] = "FLOPs of some timed steps unknown"
        elif not peak:
            kind, platform = self.device["kind"], self.device["platform"]
            what = kind if kind.lower() == platform else f"{kind} ({platform})"
            out["mfu_note"] = (f"peak FLOP/s of {what} devices unknown; set "
                               "config.compute.peak_flops_per_second")
        else:
            out["mfu"] = t["flops"] / (t["device_seconds"] * peak)
            out["mfu_note"] = f"achieved / peak dense bf16 FLOP/s ({self.device['peak_source']})"
        return out

    def _energy(self, wall, cpu, peak_rss) -> dict:
        o = self.options
        joules, sources = {}, {}
        rapl_parts = self.rapl.parts() if self.rapl.available else set()
        no_rapl = f" ({self.rapl.problem})" if self.rapl.problem else ""
        # CPU
        if "package" in rapl_parts:
            joules["cpu"] = self.rapl.joules["package"]
            sources["cpu"] = "measured: RAPL package counters (whole machine)"
        else:
            cores = power._cores()
            w, util = power.estimate_cpu_watts(cpu, wall, cores, o.cpu_watts_per_core)
            joules["cpu"] = w * wall
            sources["cpu"] = (f"estimated: {cores} cores x {o.cpu_watts_per_core:g} W/core TDP x "
                              f"{100 * util:.0f}% utilisation{no_rapl}")
        # DRAM
        if "dram" in rapl_parts:
            joules["dram"] = self.rapl.joules["dram"]
            sources["dram"] = "measured: RAPL dram counters (whole machine)"
        elif peak_rss is not None:
            joules["dram"] = power.estimate_memory_watts(peak_rss, o.memory_watts_per_gb) * wall
            sources["dram"] = (f"estimated: {o.memory_watts_per_gb:g} W/GB x {power._gb(peak_rss)} peak resident "
                               "memory of the process")
        else:
            joules["dram"] = 0.0
            sources["dram"] = "not counted: peak resident memory unknown on this platform"
        # accelerators
        platform, kind, n = self.device["platform"], self.device["kind"], jax.local_device_count()
        if platform == "cpu":
            joules["gpu"] = 0.0
            sources["gpu"] = "none: the run used CPU devices"
        elif self.nvml.available:
            joules["gpu"] = self.nvml.joules
            how = "energy counters" if self.nvml.counter else "sampled power"
            sources["gpu"] = f"measured: NVML {how} of {len(self.nvml.handles)} GPU(s) ({self.nvml.names[0]})"
        else:
            spec = device_spec(kind)
            why = f" ({self.nvml.problem})" if self.nvml.problem else ""
            if spec is not None and spec.tdp_watts:
                joules["gpu"] = n * spec.tdp_watts * wall
                sources["gpu"] = f"estimated: {n} x {spec.tdp_watts:g} W TDP ({spec.name}) at full use{why}"
            else:
                joules["gpu"] = 0.0
                sources["gpu"] = f"not counted: no power reading and no known TDP for {kind}{why}"
        kwh = power.energy_kwh(sum(joules.values()), o.pue)

        def assumed(key, source):
            return {"value": getattr(o, key), "source": f"config.compute.{key}" if key in o.given else source}

        return {
            "energy_kwh": kwh,
            "co2_kg": kwh * o.carbon_intensity_kg_per_kwh,
            "power_watts": {k: (v / wall if wall > 0 else 0.0) for k, v in joules.items()},
            "power_sources": sources,
            "pue": o.pue,
            "carbon_intensity_kg_per_kwh": o.carbon_intensity_kg_per_kwh,
            "assumptions": {
                "pue": assumed("pue", PUE_SOURCE),
                "carbon_intensity_kg_per_kwh": assumed("carbon_intensity_kg_per_kwh", CARBON_INTENSITY_SOURCE),
                "cpu_watts_per_core": assumed("cpu_watts_per_core", CPU_WATTS_SOURCE),
                "memory_watts_per_gb": assumed("memory_watts_per_gb", MEMORY_WATTS_SOURCE),
                "gpu": "NVML when readable, else the device's TDP at full use (Green Algorithms' usage factor 1)",
            },
            "method": "E = PUE x (P_cpu + P_dram + sum P_gpu) x wall time (Strubell et al. 2019); "
                      "CO2 = E x carbon intensity",
        }


# ----------------------------------------------------------------------------- output
def _si(x, unit=""):
    """``4.33k``, ``92.4 MFLOP``: three significant digits and an SI prefix."""
    if x is None:
        return "n/a"
    space = " " if unit else ""
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{space}{prefix}{unit}"
    return f"{x:.3g}{space}{unit}"


def format_summary(summary: dict) -> str:
    """Two lines: the training compute and the energy, e.g.::

        compute: 60 steps, 255 MFLOP/step (XLA cost analysis), 15.3 GFLOP in all; 41.2 steps/s, 1.32k examples/s, ...
        energy: 6.1e-06 kWh, 2.6e-06 kg CO2 over 8.9 s (cpu 1.5 W estimated: ...; PUE 1.58, 0.433 kg CO2/kWh)
    """
    s = summary
    if s.get("steps"):
        parts = [f"{s['steps']} steps, {_si(s.get('flops_per_step'), 'FLOP')}/step "
                 f"({s.get('flops_source') or 'FLOPs unknown'}), {_si(s.get('train_flops'), 'FLOP')} in all"]
        rates = [f"{_si(s[k])} {name}/s" for k, name in (("steps_per_second", "steps"),
                                                          ("examples_per_second", "examples"),
                                                          ("tokens_per_second", "tokens")) if s.get(k)]
        if s.get("flops_per_second"):
            rates.append(f"{_si(s['flops_per_second'], 'FLOP')}/s")
        if rates:
            parts.append(", ".join(rates) + f" over {s['train_seconds']:.3g} s of training")
        parts.append(f"MFU {100 * s['mfu']:.1f}%" if s.get("mfu") is not None else f"MFU n/a ({s.get('mfu_note')})")
        line = "compute: " + "; ".join(parts)
    else:
        line = "compute: no training step"
    powers = "; ".join(f"{k} {w:.3g} W {s['power_sources'][k]}" for k, w in s["power_watts"].items()
                       if w or not s["power_sources"][k].startswith(("none", "not counted")))
    energy = (f"energy: {s['energy_kwh']:.3g} kWh, {s['co2_kg']:.3g} kg CO2 over {s['wall_seconds']:.3g} s wall "
              f"({powers}; PUE {s['pue']:g}, {s['carbon_intensity_kg_per_kwh']:g} kg CO2/kWh)")
    return line + "\n" + energy


def attach_summary(summary: dict, results, workdir, *, since: float | None = None):
    """Adds ``summary`` as ``results["compute"]`` (when ``results`` is a dict) and to
    ``workdir/results.json`` when that file exists and, with ``since`` (a ``time.time()``), was
    written after it (a file left by an earlier run is not touched): the file is read, the key
    added and the file replaced, other keys kept.  Returns ``results``."""
    if isinstance(results, dict):
        results["compute"] = summary
    path = os.path.join(str(workdir), "results.json")
    if not os.path.isfile(path) or (since is not None and os.path.getmtime(path) < since - 2.0):
        return results
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    if isinstance(saved, dict):
        saved["compute"] = summary
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(saved, f, indent=2)
        os.replace(tmp, path)
    return results


def report(meter: Meter, results, workdir):
    """What `efficient_nlp.recipes.run_recipe` does after a recipe ran inside ``meter``: on the
    main process, adds the summary to ``results`` and ``results.json`` (`attach_summary`) and
    prints `format_summary`.  A failure here is logged, never raised: the run's own results stand."""
    from efficient_nlp.train import distributed
    if not distributed.is_main_process():
        return results
    try:
        summary = meter.summary()
        attach_summary(summary, results, workdir, since=meter.started_at)
        print(format_summary(summary), flush=True)
    except Exception as e:  # noqa: BLE001 - accounting never fails a finished run
        log.warning("compute accounting failed (%s: %s); the run's results are unaffected", type(e).__name__, e)
    return results


__all__ = [
    "ComputeOptions", "DEVICE_SPECS", "DeviceSpec", "Meter", "attach_summary", "compute_options",
    "default_compute_config", "device_spec", "format_summary", "report",
]
