"""The timing and reporting helpers every benchmark shares."""
import json
import time

import numpy as np

from rtllm.bench.metrics import summarize  # noqa: F401  (mean/p50/p90/p99 ms, as `rtllm bench` reports)


def now() -> float:
    return time.perf_counter()


def time_calls(fn, reps: int):
    """(p10, p50, p90) seconds of fn() over `reps` calls, after a pause and a warm-up call: numpy's
    OpenBLAS and torch's OpenMP threads busy-wait for a while after each call, which would take a core
    from whichever engine runs next."""
    time.sleep(0.3)
    fn()
    times = []
    for _ in range(reps):
        t0 = now()
        fn()
        times.append(now() - t0)
    return np.percentile(np.asarray(times), [10, 50, 90])


def report(results: dict, rows: list, columns: list, path: str | None = None) -> None:
    """Prints the results as JSON, then a short table of `rows` (dicts) under `columns`."""
    text = json.dumps(results, indent=2)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    print(text)
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)
