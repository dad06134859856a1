"""The GPUs of this host through NVML (nvidia-ml-py), without torch: what the worker registry reports,
the ``ncs_gpu_*`` figures, and the Xid errors a device fault leaves behind.

``pynvml`` imports anywhere; ``nvmlInit`` fails where there is no driver. :class:`Nvml` tries once and
then answers nothing: no GPU means no GPU series and no error. Indices are NVML's, which are also
CUDA's because runner.py starts trainers with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.

Xid errors arrive as NVML events: :meth:`Nvml.watch_xids` runs a daemon thread that waits on an event
set and counts them per GPU (``ncs_gpu_xid_errors_total``) and keeps their times, so the supervisor can
tell a trainer that died of a fallen GPU (:meth:`Nvml.xids_since`) from one that crashed on its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

# Xids that name the application's own fault (a bad kernel, an illegal address it computed), not the
# card's: they count in the metric but do not quarantine a GPU. NVIDIA's Xid catalogue; the Kubernetes
# device plugin skips the same ones when it marks devices unhealthy.
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})


class Nvml:
    """This process's NVML session (one per process: :func:`nvml`). ``module`` is pynvml, or a stand-in
    with the same functions in tests (there is no GPU on the test machines)."""

    def __init__(self, module: Any = None) -> None:
        self._module = module
        self._lock = threading.Lock()
        self._ready: bool | None = None
        self._xids: dict[int, list[tuple[float, int]]] = {}  # index -> [(monotonic time, xid)]
        self._watcher: threading.Thread | None = None
        self._on_xid: list[Callable[[int, int], None]] = []

    @property
    def nv(self) -> Any:
        if self._module is None:
            import pynvml

            self._module = pynvml
        return self._module

    def available(self) -> bool:
        """Whether NVML answers here (initialised once; a failure is remembered, not retried)."""
        with self._lock:
            if self._ready is None:
                try:
                    self.nv.nvmlInit()
                    self._ready = True
                except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
                    log.debug("NVML is not available: %s", exc)
                    self._ready = False
            return self._ready

    def indices(self) -> list[int]:
        if not self.available():
            return []
        try:
            return list(range(int(self.nv.nvmlDeviceGetCount())))
        except Exception as exc:
            log.warning("NVML could not count the GPUs: %s", exc)
            return []

    def info(self, index: int) -> dict[str, Any] | None:
        """{"device_name", "memory_bytes", "uuid"} of GPU ``index``, or None (no NVML, a lost GPU)."""
        if not self.available():
            return None
        try:
            handle = self.nv.nvmlDeviceGetHandleByIndex(index)
            name = self.nv.nvmlDeviceGetName(handle)
            uuid = self.nv.nvmlDeviceGetUUID(handle)
            total = int(self.nv.nvmlDeviceGetMemoryInfo(handle).total)
        except Exception as exc:
            log.warning("NVML could not describe GPU %s: %s", index, exc)
            return None
        return {"device_name": _text(name), "memory_bytes": total, "uuid": _text(uuid)}

    def sample(self, index: int) -> dict[str, float]:
        """The figures of GPU ``index`` that NVML gives (each one may be unsupported: left out)."""
        out: dict[str, float] = {}
        if not self.available():
            return out
        try:
            handle = self.nv.nvmlDeviceGetHandleByIndex(index)
        except Exception:
            return out  # gone: no series, and NcsGpuGone notices the gap
        reads: dict[str, Callable[[], float]] = {
            "utilization_ratio": lambda: self.nv.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0,
            "memory_used_bytes": lambda: float(self.nv.nvmlDeviceGetMemoryInfo(handle).used),
            "temperature_celsius": lambda: float(self.nv.nvmlDeviceGetTemperature(handle, 0)),  # 0: the GPU die
            "power_watts": lambda: self.nv.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # NVML answers milliwatts
        }
        for key, read in reads.items():
            try:
                out[key] = float(read())
            except Exception:
                pass
        return out

    # -- Xid errors ------------------------------------------------------------------------------------
    def watch_xids(self, indices: Iterable[int], on_xid: Callable[[int, int], None] | None = None) -> bool:
        """Start the daemon thread that waits for Xid events of GPUs ``indices``; ``on_xid(index, xid)`` is
        called for each. Whether a watcher runs (NVML without event support: False)."""
        if on_xid is not None:
            self._on_xid.append(on_xid)
        if self._watcher is not None or not self.available():
            return self._watcher is not None
        nv = self.nv
        try:
            events = nv.nvmlEventSetCreate()
        except Exception as exc:
            log.info("NVML events are not supported here (%s): Xid errors are not counted", exc)
            return False
        watched = 0
        for index in indices:
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                nv.nvmlDeviceRegisterEvents(handle, nv.nvmlEventTypeXidCriticalError, events)
                watched += 1
            except Exception as exc:
                log.info("GPU %s does not report Xid events (%s)", index, exc)
        if not watched:
            return False
        self._watcher = threading.Thread(target=self._wait_for_xids, args=(events,), name="nvml-xid", daemon=True)
        self._watcher.start()
        return True

    def _wait_for_xids(self, events: Any) -> None:
        nv = self.nv
        while True:
            try:
                data = nv.nvmlEventSetWait(events, 5000)
            except Exception as exc:
                if type(exc).__name__ == "NVMLError_Timeout":
                    continue
                log.warning("waiting for NVML events failed (%s); Xid errors are no longer counted", exc)
                return
            try:
                index = int(nv.nvmlDeviceGetIndex(data.device))
            except Exception:
                continue
            self.record_xid(index, int(data.eventData))

    def record_xid(self, index: int, xid: int) -> None:
        """Count Xid ``xid`` on GPU ``index`` (the watcher calls this)."""
        log.error("GPU %s reported Xid %s", index, xid)
        with self._lock:
            self._xids.setdefault(index, []).append((time.monotonic(), xid))
            del self._xids[index][:-100]
        for callback in list(self._on_xid):
            try:
                callback(index, xid)
            except Exception:
                log.exception("an Xid callback failed")

    def xids_since(self, index: int, since: float) -> list[int]:
        """Xids of GPU ``index`` at or after ``since`` (time.monotonic()), oldest first."""
        with self._lock:
            return [xid for t, xid in self._xids.get(index, []) if t >= since]


def device_faults(xids: Iterable[int]) -> list[int]:
    """The Xids among ``xids`` that are the card's fault, not the program's."""
    return [x for x in xids if x not in APPLICATION_XIDS]


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


_nvml = Nvml()


def nvml() -> Nvml:
    """This process's NVML session."""
    return _nvml


def use(session: Nvml) -> Nvml:
    """Replace this process's NVML session (tests give one over a stand-in module); returns the old."""
    global _nvml
    old, _nvml = _nvml, session
    return old
