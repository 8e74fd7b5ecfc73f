"""The reproduction's jobs (one family's learning-rate sweep, one seed of one row) run side by side.

`workers` jobs run at a time, each in a thread that waits on its steps' processes
(`dpvr.demo.steps.Step(threads=...)`); a job starts once the jobs it needs have finished, and among
the ready ones the first in the given order starts first (Table 2 before the sweeps). It pays where
one run leaves cores idle; on this project's 2-core machine it did not (docs/train.md, "Runs side by
side"). With one worker the jobs run one after the other in this thread, steps in-process.
"""
from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

from tqdm.auto import tqdm


@dataclass(frozen=True)
class Job:
    name: str
    run: Callable[[dict], object]  # gets {name of a job it needs: that job's result}
    needs: tuple[str, ...] = ()


def run_jobs(jobs: list[Job], workers: int, skip: type[Exception], desc: str = "reproduce runs") -> dict:
    """{job name: its result, or the `skip` exception (a run left for later) it or a job it needs raised}.
    Any other exception stops new jobs from starting and is raised once the running ones have ended."""
    names = [job.name for job in jobs]
    for i, job in enumerate(jobs):  # needs point backwards: the first ready job never waits on a later one
        if unknown := [n for n in job.needs if n not in names[:i]]:
            raise ValueError(f"job {job.name!r} needs {unknown}, which are not earlier jobs")
    results: dict[str, object] = {}
    pending, running = list(jobs), {}
    failure: BaseException | None = None
    with tqdm(total=len(jobs), desc=desc, unit="run") as bar, ThreadPoolExecutor(max(1, workers)) as pool:
        while (pending and failure is None) or running:
            for job in [j for j in pending if all(n in results for n in j.needs)]:
                if len(running) >= workers or failure is not None:
                    break
                pending.remove(job)
                missing = next((results[n] for n in job.needs if isinstance(results[n], skip)), None)
                if missing is not None:
                    results[job.name] = missing
                    bar.update()
                    continue
                deps = {n: results[n] for n in job.needs}
                if workers <= 1:  # in this thread: Ctrl-C and in-process steps behave as without jobs
                    failure = _settle(results, job, lambda: job.run(deps), skip)
                    bar.update()
                    break  # the jobs it readied (DPVR-KV after DPVR-PC's seed) come before the later ones listed here
                running[pool.submit(job.run, deps)] = job
            if not running:
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                failure = _settle(results, running.pop(future), future.result, skip) or failure
                bar.update()
    if failure is not None:
        raise failure
    return results


def _settle(results: dict, job: Job, outcome: Callable[[], object], skip: type[Exception]) -> BaseException | None:
    """Record a finished job's result (or its skip); return any other exception it raised."""
    try:
        results[job.name] = outcome()
    except skip as exc:
        results[job.name] = exc
    except BaseException as exc:  # noqa: BLE001 - re-raised by run_jobs once the running jobs have ended
        return exc
    return None
