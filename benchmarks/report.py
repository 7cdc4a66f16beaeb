"""Benchmark: the sign-off report from 1M synthetic samples (bar: 15 s, 1.5 GB).

    python benchmarks/report.py [--samples 1000000] [--keep DIR]

Writes a run folder (half the samples pre-migration, half post, the usual
operation mix and refusals), then builds the report in a child process, so
the figures are the report's alone: wall time of ``build_report`` as the
child measures it, and the child's peak resident memory (``ru_maxrss`` of
RUSAGE_CHILDREN), imports included. Prints the figures against the bars and
exits 1 when a bar is missed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from report_fixtures import POST_ERRORS, synthetic_samples, write_run  # noqa: E402

BAR_SECONDS = 15.0
BAR_BYTES = 1.5 * 1024**3

_CHILD = """
import json, sys, time
from pathlib import Path
started = time.perf_counter()
from harness.report import ReportSettings, build_report
result = build_report(ReportSettings(run_dir=Path(sys.argv[1])))
print(json.dumps({"seconds": time.perf_counter() - started, "build_seconds": result.seconds,
                  "verdict": str(result.verdict)}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="write the run folder here and keep it")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="report-bench-") as tmp:
        run_dir = args.keep or Path(tmp) / "run"
        half = args.samples // 2
        t0 = time.perf_counter()
        write_run(
            run_dir,
            samples={
                # ten minutes of load per phase, like a real rehearsal
                "pre": synthetic_samples(half, phase="pre", seed=1, duration_s=600.0),
                "post": synthetic_samples(
                    args.samples - half,
                    phase="post",
                    seed=2,
                    duration_s=600.0,
                    latency_scale=1.1,
                    errors=POST_ERRORS,
                ),
            },
        )
        print(
            f"run folder with {args.samples:,} samples written in {time.perf_counter() - t0:.1f} s"
        )

        child = subprocess.run(
            [sys.executable, "-c", _CHILD, str(run_dir)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return 2
        figures = json.loads(child.stdout.strip().splitlines()[-1])
        # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        size = (run_dir / "report.html").stat().st_size

    ok_time = figures["seconds"] <= BAR_SECONDS
    ok_mem = peak <= BAR_BYTES
    print(f"samples:        {args.samples:,}")
    print(
        f"report seconds: {figures['seconds']:.2f} (build_report {figures['build_seconds']:.2f},"
        f" bar {BAR_SECONDS:.0f}) {'ok' if ok_time else 'OVER'}"
    )
    print(
        f"peak memory:    {peak / 1024**2:.0f} MiB (bar {BAR_BYTES / 1024**2:.0f})"
        f" {'ok' if ok_mem else 'OVER'}"
    )
    print(f"report.html:    {size / 1024:.0f} KiB, verdict {figures['verdict']}")
    return 0 if ok_time and ok_mem else 1


if __name__ == "__main__":
    sys.exit(main())
