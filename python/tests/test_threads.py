"""The GIL is released while the engine computes: a pure-Python thread keeps counting during a
segment call, and two sessions in two threads are inside their calls at the same time."""

import threading
import time

import numpy as np

import segvol
from conftest import CT, MODEL, pipeline_case


def test_gil_released_and_two_sessions_progress_together():
    engine = segvol.Engine(MODEL)
    _, prompt, _ = pipeline_case("box-text")
    expected, _ = engine.open(CT).segment(**prompt)
    sessions = [engine.open(CT), engine.open(CT)]
    rounds = 6
    calls = {0: [], 1: []}  # (start, end) of each segment call
    results = {0: [], 1: []}
    ticks = []
    stop = threading.Event()
    start = threading.Barrier(3)

    def counter():
        start.wait()
        while not stop.is_set():
            ticks.append(time.perf_counter())

    def worker(n):
        start.wait()
        for _ in range(rounds):
            t0 = time.perf_counter()
            # A new ROI each time would be slower; the cache makes later rounds decoder-only,
            # so alternate the prompt to keep encoder work in every call.
            mask, _ = sessions[n].segment(**prompt, keep_roi=False)
            calls[n].append((t0, time.perf_counter()))
            results[n].append(mask)

    threads = [threading.Thread(target=counter)] + [
        threading.Thread(target=worker, args=(n,)) for n in (0, 1)
    ]
    for t in threads:
        t.start()
    # The main thread is the fourth: it waits on the workers, then stops the counter.
    for t in threads[1:]:
        t.join(timeout=300)
    stop.set()
    threads[0].join(timeout=10)
    assert all(not t.is_alive() for t in threads)

    for n in (0, 1):
        assert len(results[n]) == rounds
        assert all(np.array_equal(m, expected) for m in results[n])

    # The counter ran *inside* segment calls: with the GIL held it could not run at all
    # between a call's start and end.
    def inside(t0, t1):
        lo, hi = t0 + 0.25 * (t1 - t0), t1 - 0.25 * (t1 - t0)
        return sum(1 for t in ticks if lo <= t <= hi)

    longest = max(calls[0] + calls[1], key=lambda c: c[1] - c[0])
    assert inside(*longest) > 100, (longest, len(ticks))

    # The two sessions were inside a call at the same moment.
    overlap = sum(
        max(0.0, min(a1, b1) - max(a0, b0)) for a0, a1 in calls[0] for b0, b1 in calls[1]
    )
    assert overlap > 0, (calls, overlap)
