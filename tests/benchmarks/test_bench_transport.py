"""`chatlearn bench transport --json` runs end to end (two processes) and reports every figure.

A smoke test of the program, not of the machine's speed: the timing targets are checked by
running the benchmark itself (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest


def _rounding(row: dict, mode: str) -> float:
    """The relative error of ``<mode>_msgs_per_s / raw_msgs_per_s`` from their rounding to 0.1
    (each off by up to 0.05), plus 1% for the ratio's own rounding; 3% at least."""
    return max(0.03, 0.05 / row[f"{mode}_msgs_per_s"] + 0.05 / row["raw_msgs_per_s"] + 0.01)


@pytest.mark.serial  # a benchmark: another test's load would make its figures meaningless
@pytest.mark.timeout(180)
def test_bench_transport_json_has_every_figure():
    completed = subprocess.run(
        # one endpoint kind keeps the test short; tcp takes the same code path
        [sys.executable, "-m", "chatlearn.cli", "bench", "transport", "--quick", "--json"]
        + ["--endpoint", "ipc"],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout)
    rows = result["rows"]
    assert {(r["size_bytes"], r["endpoint"]) for r in rows} == {
        (size, endpoint) for size in (4096, 1 << 20, 16 << 20, 128 << 20) for endpoint in ("ipc",)
    }
    for row in rows:
        for key in ("ours_gbps", "raw_gbps", "codec_gbps", "pickle_gbps", "memcpy_gbps"):
            assert row[key] > 0, (key, row)
        # every mode's untimed pass before the rounds, kept apart from them
        assert set(row["warmup_gbps"]) == {"ours", "raw", "codec", "pickle"}, row
        assert all(gbps > 0 for gbps in row["warmup_gbps"].values()), row
        # one round (--quick): the ratio is that round's; msg/s are rounded to 0.1, so at
        # 128 MiB (about 8 msg/s, fewer on a busy machine) the ratio of the two is off by
        # up to 0.05 / msg/s of each (`_rounding`)
        assert len(row["ratio_runs"]) == 1
        assert row["ratio_vs_raw"] == row["ratio_runs"][0]
        ratio = row["ours_msgs_per_s"] / row["raw_msgs_per_s"]
        assert row["ratio_vs_raw"] == pytest.approx(ratio, rel=_rounding(row, "ours"))
        # the codec's own bound (our codec over blocking pyzmq), in the same round
        assert row["codec_ratio_runs"] == [row["codec_ratio_vs_raw"]]
        ratio = row["codec_msgs_per_s"] / row["raw_msgs_per_s"]
        assert row["codec_ratio_vs_raw"] == pytest.approx(ratio, rel=_rounding(row, "codec"))
    for key in ("rtt_us_p50", "rtt_us_p99", "raw_rtt_us_p50", "raw_rtt_us_p99"):
        assert result[key] > 0, key
    # the machine's floors, over a plain unix stream socket
    for key in ("stream_rtt_us_p50", "stream_uvloop_rtt_us_p50"):
        assert result[key] > 0, key
    assert result["rtt_us_p50"] <= result["rtt_us_p99"]
    # ours/raw of the round trip, from each round's own p50s
    rtt = result["rtt_us"]["ipc"]
    assert len(rtt["ratio_runs"]) == 1 == len(rtt["raw_p50_runs"]) == len(rtt["stream_p50_runs"])
    assert result["rtt_ratio_vs_raw"] == rtt["ratio_runs"][0]
    assert rtt["ratio_runs"][0] == pytest.approx(rtt["p50_runs"][0] / rtt["raw_p50_runs"][0], 0.01)
    # pinned by default, as the runtime pins two one-core actors, when there are two cores
    cores = sorted(os.sched_getaffinity(0))
    assert result["pinned_cores"] == (cores[:2] if len(cores) >= 2 else None)


@pytest.mark.timeout(60)
def test_pin_threads_pins_threads_started_before_and_after():
    # in a child process: pinning the test process would slow every later test down
    script = textwrap.dedent(
        """
        import os, threading
        from chatlearn.benchmarks.transport_peer import pin_threads
        stop = threading.Event()  # never set: the threads end with the process
        # a thread that exists before pinning
        threading.Thread(target=stop.wait, daemon=True).start()
        core = max(os.sched_getaffinity(0))
        pin_threads(core)
        threading.Thread(target=stop.wait, daemon=True).start()  # and one started after
        tids = [int(t) for t in os.listdir("/proc/self/task")]
        print(len(tids), sorted({c for t in tids for c in os.sched_getaffinity(t)}) == [core])
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=50
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    num_threads, all_pinned = completed.stdout.split()
    assert int(num_threads) >= 3 and all_pinned == "True", completed.stdout
