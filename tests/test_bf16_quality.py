"""bf16 training keeps quality: the same run in float32 and in bf16 reaches the same validation bits per byte.

Slow (four real training runs): ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -m slow tests/test_bf16_quality.py``.
Two corpora: the demo, and a held-out one the project was never tuned on (English prose of the
licence texts Debian ships, else Python's own standard library sources, which every install has).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from test_train import only, run_trainer

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

STEPS = 300
PLAN = ["--depth", "2", "--seq-len", "128", "--batch-size", "8", "--vocab-size", "2048", "--max-steps", str(STEPS),
        "--eval-every", str(STEPS), "--eval-tokens", "32768", "--sample-every", "100000", "--checkpoint-every", "100000"]
TOLERANCE = 0.01  # the promise: within 1% of the float32 run's val bpb at the same step


def held_out_corpus(path: Path) -> Path:
    licenses = Path("/usr/share/common-licenses")
    # the versioned texts only: GPL, LGPL... are links to them, and duplicates would leak into validation
    files = sorted(p for p in licenses.iterdir() if p.is_file() and not p.is_symlink()) if licenses.is_dir() else []
    if sum(p.stat().st_size for p in files) < 200_000:
        lib = Path(sys.modules["json"].__file__).parents[1]  # the standard library's directory
        files = sorted(lib.glob("*.py"))[:60]
    path.write_text("\n\n".join(p.read_text(errors="replace") for p in files))
    return path


@pytest.mark.parametrize("corpus", ["demo", "held-out"])
def test_bf16_reaches_the_float32_runs_val_bpb_within_one_percent(tmp_path, corpus):
    data = "demo" if corpus == "demo" else str(held_out_corpus(tmp_path / "held_out.txt"))
    bpb = {}
    for dtype in ("float32", "bfloat16"):
        code, events, err = run_trainer([*PLAN, "--data", data, "--dtype", dtype], tmp_path / dtype,
                                        tmp_path / "cache", timeout=1800)
        assert code == 0, err
        assert events[0]["dtype"] == dtype
        bpb[dtype] = only(events, "eval")[-1]["val_bpb"]
    print(f"{corpus}: val bpb float32 {bpb['float32']:.4f} bfloat16 {bpb['bfloat16']:.4f} "
          f"({100 * (bpb['bfloat16'] / bpb['float32'] - 1):+.2f}%)", file=sys.stderr)
    assert bpb["bfloat16"] == pytest.approx(bpb["float32"], rel=TOLERANCE)
