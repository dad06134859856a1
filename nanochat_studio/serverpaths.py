"""Which paths on the server may be read as a dataset (solo owner, or an admin): never the studio's own
files, its secrets, or the system's.

A path is refused, after symlinks are resolved, when it lies in (or is) the data directory, the runs
directory, local storage, the settings file or a ``*_FILE`` secret; a system directory (/proc, /sys,
/dev, /etc, /boot, /run, /var/run); or any hidden file or directory (``~/.ssh``, ``~/.aws``, ...). With
``server_path_roots`` set, it must also lie inside one of those directories. A directory is checked file
by file (the trainer reads every file under it, symlinks included), up to ``MAX_ENTRIES`` entries.

Errors: ``Forbidden`` (403) with the reason; never the content.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from .errors import BadRequest, Forbidden
from .settingfields import ENV_PREFIX
from .settings import Settings

SYSTEM_DIRS = ("/proc", "/sys", "/dev", "/etc", "/boot", "/run", "/var/run")
MAX_ENTRIES = 100_000


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _studio_places(settings: Settings) -> list[tuple[str, str]]:
    """(resolved path, what it is) of everything the studio keeps that a dataset must not read."""
    places = [(settings.home, "the studio's data directory"), (settings.runs_dir, "the studio's runs directory")]
    storage = urlsplit(settings.storage_url)
    if storage.scheme in ("file", "local", ""):
        places.append((storage.path or settings.storage_url, "the studio's storage"))
    for name, value in os.environ.items():
        if name.startswith(ENV_PREFIX) and (name.endswith("_FILE") or name == "NCS_CONFIG") and value:
            places.append((value, f"the file of {name}"))
    return [(os.path.realpath(p), what) for p, what in places if p]


def _refusal(real: str, settings: Settings, places: list[tuple[str, str]]) -> str | None:
    for place, what in places:
        if _inside(real, place):
            return f"it is inside {what}"
        if _inside(place, real):
            return f"it holds {what}"
    for system in SYSTEM_DIRS:
        if _inside(real, system) or _inside(system, real):
            return f"it is inside (or holds) the system directory {system}"
    if any(part.startswith(".") for part in Path(real).parts[1:]):
        return "it is (or is inside) a hidden file or directory"
    roots = [os.path.realpath(r.strip()) for r in settings.server_path_roots.split(",") if r.strip()]
    if roots and not any(_inside(real, root) for root in roots):
        return "it is outside the directories server_path_roots allows"
    return None


def check(source: str, settings: Settings) -> str:
    """The resolved path of ``source`` if it may be read as a dataset. Raises Forbidden with the reason
    (BadRequest for a relative path)."""
    if not os.path.isabs(source):
        raise BadRequest(f"{source[:200]!r} is not an absolute path")
    places = _studio_places(settings)
    real = os.path.realpath(source)
    reason = _refusal(real, settings, places)
    if reason is None and os.path.isdir(real):
        reason = _check_tree(real, settings, places, set())
    if reason is not None:
        raise Forbidden(f"the server path {os.path.normpath(source)} cannot be a dataset: {reason}",
                        code="path_refused")
    return real


def _check_tree(root: str, settings: Settings, places: list[tuple[str, str]], visited: set[str]) -> str | None:
    if root in visited:  # a link back up the tree: already being checked
        return None
    visited.add(root)
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # the trainer skips hidden ones too
        for name in [*dirnames, *filenames]:
            if name.startswith("."):
                continue
            seen += 1
            if seen > MAX_ENTRIES:
                return f"it holds more than {MAX_ENTRIES:,} entries"
            entry = os.path.join(dirpath, name)
            if os.path.islink(entry):
                reason = _refusal(os.path.realpath(entry), settings, places)
                if reason is not None:
                    return f"{entry} links to a place that is refused ({reason})"
                if os.path.isdir(entry):  # walk does not follow it; whatever is below is checked here
                    inner = _check_tree(os.path.realpath(entry), settings, places, visited)
                    if inner is not None:
                        return inner
    return None
