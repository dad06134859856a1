"""Checkpoint mirroring: a running trainer's checkpoints copied into storage, so a worker on another
machine can resume the job. Used by supervisor.py; storage.py stays the only fsspec user.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

from .models import TrainingJob
from .settings import Settings
from .storage import Storage, user_prefix

log = logging.getLogger(__name__)


class CheckpointMirror:
    """Copies the checkpoints a trainer writes into storage (newest wins, one upload at a time), so a
    worker on another machine can resume the job; restores the newest into a run directory with none.
    On by default with remote storage (the ``mirror_checkpoints`` setting forces it either way)."""

    def __init__(self, store: Storage, user_id: int, job_id: int):
        self.store = store
        self.prefix = f"{user_prefix(user_id)}/runs/{job_id}/checkpoints"
        self._pending: Path | None = None
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    @classmethod
    def for_job(cls, settings: Settings, job: TrainingJob) -> "CheckpointMirror | None":
        wanted = settings.mirror_checkpoints
        if wanted is False:
            return None
        store = Storage.from_settings(settings)
        if wanted is None and store.is_local:
            return None
        return cls(store, job.user_id, job.id)

    def push(self, checkpoint_dir: Path) -> None:
        with self._cv:
            self._pending = checkpoint_dir
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=f"mirror-{self.prefix}", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _work(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._closing:
                    self._cv.wait()
                path, self._pending = self._pending, None
                if path is None:
                    return
            try:
                key = f"{self.prefix}/{path.name}"
                self.store.put_dir(path, key)
                for older in self.store.list_committed(self.prefix):
                    if older != key:
                        self.store.delete(older)
            except Exception:  # the trainer may have rotated it away meanwhile; the next one will do
                log.warning("mirroring checkpoint %s failed", path, exc_info=True)

    def close(self) -> None:
        """Finish the pending upload (the checkpoint a stopping trainer just wrote)."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    def restore(self, run_dir: Path) -> str | None:
        """Copy the newest mirrored checkpoint into ``run_dir`` if it has no finished checkpoint."""
        if any(run_dir.glob("checkpoints/step_*/manifest.json")):
            return None
        keys = self.store.list_committed(self.prefix)
        if not keys:
            return None
        src = Path(self.store.local_path(keys[-1]))
        dst = run_dir / "checkpoints" / keys[-1].rsplit("/", 1)[-1]
        tmp = dst.with_name(f".restore-{dst.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("_COMMITTED.json"))
        os.replace(tmp, dst)
        return keys[-1]

    def forget(self) -> None:
        for key in self.store.list_committed(self.prefix):
            self.store.delete(key)
