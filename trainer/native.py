"""Small C kernels built on this machine with its C compiler and loaded with ctypes.

    lib, reason = native.load("decode_one")   # trainer/decode_one.c; (None, why) where it cannot be built

The engine's one-row decode step (``trainer/decode_one.c``) is a chain of ~20 small ops a layer
around four matrix-vector products; as torch ops each costs a few microseconds of dispatch and
Python, ~45% of a token at depth 4 on CPU. One C call runs the whole token instead.

Built once per source, compiler and CPU: ``-O3 -march=native`` into a cache directory
(``$NCS_NATIVE_CACHE``, which the app sets to ``<data directory>/native`` for its model servers, else
``$XDG_CACHE_HOME/nanochat-studio/native``, else ``~/.cache/...``; a private temporary directory
where none of these can be written),
keyed by a hash of all three, written under a temporary name and renamed so processes building at
once never load a half-written library. ``NCS_NATIVE=0`` turns it off (every caller then uses its
torch ops). The compiler is ``$CC``, else ``cc`` or ``gcc`` on the PATH; without one nothing is built.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_FLAGS = (["-O3", "-march=native", "-fopenmp-simd"], ["-O3", "-fopenmp-simd"])  # the second if -march=native fails
_loaded: dict[str, tuple[ctypes.CDLL | None, str]] = {}


def load(name: str) -> tuple[ctypes.CDLL | None, str]:
    """``trainer/<name>.c`` as a loaded library and how it was had ("built ..." or "cached ..."), or
    None and the reason it is not available. Memoised per process."""
    if name not in _loaded:
        _loaded[name] = _load(name)
    return _loaded[name]


def _load(name: str) -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("NCS_NATIVE", "1").strip() in ("0", "false", "off", "no"):
        return None, "turned off by NCS_NATIVE"
    src = _HERE / f"{name}.c"
    if not src.is_file():
        return None, f"{src.name} is not in this install"
    cc = compiler()
    if not cc:
        return None, "no C compiler (set CC, or install gcc)"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"the C compiler {cc} does not run: {exc}"
    try:
        cache = _cache_dir()
    except OSError as exc:
        return None, f"no private cache directory to build in: {exc}"
    code = src.read_bytes()
    errors = []
    for flags in _FLAGS:
        key = hashlib.sha256(b"\0".join([code, cc.encode(), version.encode(), " ".join(flags).encode(),
                                         platform.machine().encode(), _cpu().encode()])).hexdigest()[:20]
        target = cache / f"{name}-{key}.so"
        if target.is_file():
            try:
                return ctypes.CDLL(str(target)), f"cached {target}"
            except OSError as exc:  # unloadable (another machine's, truncated): build it again
                errors.append(f"cached {target.name}: {exc}")
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            done = subprocess.run([cc, *flags, "-fPIC", "-shared", "-o", str(tmp), str(src), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                errors.append(f"{cc} {' '.join(flags)}: {done.stderr.strip()[-300:]}")
                continue
            os.replace(tmp, target)
            return ctypes.CDLL(str(target)), f"built {target}"
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{cc} {' '.join(flags)}: {exc}")
        finally:
            tmp.unlink(missing_ok=True)
    return None, "could not build: " + "; ".join(errors)


def compiler() -> str | None:
    """The C compiler a build would use: ``$CC``, else ``cc`` or ``gcc`` on the PATH; None without one."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cache_dir() -> Path:
    base = os.environ.get("NCS_NATIVE_CACHE")
    if base:  # its parent must exist (the app's data directory): nothing is made elsewhere
        path, parents = Path(base), False
    else:
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path, parents = Path(root) / "nanochat-studio" / "native", True
    try:
        path.mkdir(parents=parents, exist_ok=True, mode=0o700)
        if not os.access(path, os.W_OK):
            raise PermissionError(path)
    except OSError:  # a read-only home (a container): a private temporary directory
        path = Path(tempfile.gettempdir()) / f"nanochat-studio-native-{os.getuid() if hasattr(os, 'getuid') else 0}"
        path.mkdir(exist_ok=True, mode=0o700)
        if hasattr(os, "getuid") and path.stat().st_uid != os.getuid():
            raise PermissionError(f"{path} belongs to another user")
    return path


def _cpu() -> str:
    """What -march=native builds for: the CPU's model and feature flags (Linux), else the processor name."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(lines))
