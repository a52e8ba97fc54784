"""Running the jobs of a comparison, in this process or in worker processes, behind one progress display.

On a small CPU a tiny model gains little from a second torch thread, but two independent runs in two processes
(one thread each) take about half the time of running them one after the other; every job is seeded, so the
results do not depend on the number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from tokenmdp.experiments.compare.run import Job, execute


class Tracker:
    """Rich bars on stderr: the whole comparison (phase, time left) and one bar per running job; where stderr is
    not a terminal (bars hidden), one plain line per job start and end instead (``log``, see :meth:`_line`).

    Called as a report function: ``tracker(event, label, *args)`` with ``("start", name, total)``,
    ``("advance", n, weight)`` (the job's bar moves by ``n``, the overall one by ``n * weight``) or
    ``("skip", units)`` (a reused run or evaluation: the overall bar moves by ``units``).
    """

    def __init__(self, total: int, *, enabled: bool = True, log=None):
        self.total, self.enabled = total, enabled
        self.jobs: dict[str, int] = {}
        self.phases: dict[str, set] = {}  # the phases ("train", "eval") each job has started
        self.units: dict[str, float] = {}  # the overall units each job has advanced
        self.completed = 0.0  # units done, as the overall bar counts them
        self.skipped = 0.0  # units reused rather than computed: they take no time
        self.next_tenth = 0.1  # plain lines also mark every tenth of the whole
        self.log = log  # None: plain lines on stderr when it is not a terminal (a log file, `| tee`), else no lines

    def __enter__(self) -> Tracker:
        from tokenmdp.progress import plain_log, progress_bar

        self.progress = progress_bar(self.enabled)
        self.progress.__enter__()
        self.overall = self.progress.add_task("compare", total=self.total, info="")
        if self.log is None:
            self.log = plain_log(self.enabled)
        self.started = time.monotonic()
        return self

    def _line(self, text: str) -> None:
        """One plain progress line (where bars are not shown): elapsed time, share done, time left, ``text``.

        The time left extrapolates the rate of the units computed so far (reused units took no time)."""
        if not self.log:
            return
        elapsed = time.monotonic() - self.started
        done = self.completed
        share = min(1.0, done / self.total) if self.total else 0.0
        computed, todo = done - self.skipped, self.total - done
        left = f", about {_minutes(elapsed * todo / computed)} left" if computed > 0.02 * self.total else ""
        self.log(f"[compare {_minutes(elapsed)}] {100 * share:3.0f}% done{left}: {text}")

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def phase(self, text: str, *, line: bool = False) -> None:
        self.progress.update(self.overall, info=text)
        if line:
            self._line(text)

    def __call__(self, event: str, label: str, *args) -> None:
        if event == "start":
            name, total = args
            if name in self.phases.setdefault(label, set()):  # a job started again (its Ray worker died): its
                self.completed -= self.units.pop(label, 0.0)  # units so far are counted again from zero
                self.progress.update(self.overall, completed=self.completed)
                self.phases[label] = set()
            self.phases[label].add(name)
            if label in self.jobs:
                self.progress.remove_task(self.jobs[label])
            self.jobs[label] = self.progress.add_task(f"{name} {label}", total=total, info="")
            self.phase(f"{name} {label}", line=True)
        elif event == "advance":
            n, weight = args
            if label in self.jobs:
                self.progress.update(self.jobs[label], advance=n)
            self.progress.update(self.overall, advance=n * weight)
            self.completed += n * weight
            self.units[label] = self.units.get(label, 0.0) + n * weight
            if self.total and self.completed >= self.next_tenth * self.total:
                while self.next_tenth * self.total <= self.completed:
                    self.next_tenth += 0.1
                self._line(f"compare running: {', '.join(self.jobs)}")
        elif event == "skip":
            self.skipped += args[0]
            self.completed += args[0]
            self.progress.update(self.overall, advance=args[0], info=f"reused {label}")
            self._line(f"reused {label}")

    def done(self, label: str) -> None:
        if label in self.jobs:
            self.progress.remove_task(self.jobs.pop(label))
            self._line(f"finished {label}")


def _minutes(seconds: float) -> str:
    """``75`` -> ``1m15s``."""
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def exit_with_parent(parent: int | None = None, poll_s: float = 1.0) -> None:
    """End this worker process when the process that started it is gone. A comparison stopped by a signal would
    otherwise leave its workers training on, writing into run folders that a restarted comparison (or a removed
    and recreated --out) now owns: two writers in one folder, and half the CPU lost."""
    parent = os.getppid() if parent is None else parent  # given: a parent killed before this call still counts

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(poll_s)

    threading.Thread(target=watch, daemon=True, name="tokenmdp-exit-with-parent").start()


def _init_worker(threads: int | None, parent: int) -> None:
    from transformers.utils import logging as hf_logging

    exit_with_parent(parent)

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()


def _in_worker(job: Job, queue) -> dict:
    return execute(job, lambda *message: queue.put(message))


def _drain(queue, tracker: Tracker) -> None:
    while not queue.empty():
        tracker(*queue.get_nowait())


def run_jobs(jobs: list[Job], tracker: Tracker, *, workers: int = 1, threads: int | None = None) -> list[dict]:
    """Run ``jobs`` (in order, ``workers`` at a time); returns their results in the order of ``jobs``.

    The first job to fail stops the others (pending jobs are cancelled) and its error is raised here.
    """
    if workers <= 1 or len(jobs) <= 1:
        results = []
        for job in jobs:
            results.append(execute(job, tracker))
            tracker.done(job.label)
        return results
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    by_label: dict[str, dict] = {}
    with ctx.Manager() as manager:
        queue = manager.Queue()
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(threads, os.getpid()))
        try:
            pending = {pool.submit(_in_worker, job, queue): job for job in jobs}
            while pending:
                done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(queue, tracker)
                for future in done:
                    job = pending.pop(future)
                    by_label[job.label] = future.result()
                    tracker.done(job.label)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        _drain(queue, tracker)
    return [by_label[job.label] for job in jobs]
