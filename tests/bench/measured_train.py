"""``python -m tests.bench.measured_train ARGS``: trainer.train as the app runs it, then one line with the
process's own peak resident memory on stderr (the run's train.log):

    BENCH peak_rss_bytes=463863808

estimate_accuracy.py sets this module as the app's ``trainer_module``, so its jobs go through the real
queue, supervisor, data preparation and trainer, and the benchmark still learns each trainer's peak.
"""

from __future__ import annotations

import resource
import sys

from trainer import train

if __name__ == "__main__":
    code = train.main(sys.argv[1:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(f"BENCH peak_rss_bytes={peak}", file=sys.stderr, flush=True)
    sys.exit(code)
