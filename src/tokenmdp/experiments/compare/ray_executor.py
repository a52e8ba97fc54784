"""``compare --executor ray``: each job of a comparison (one run and its held-out evaluation, or the base model's)
as a Ray task with declared resources, on a local Ray started by the command or on a cluster (``--address``).

The jobs are the local executor's (:class:`~tokenmdp.experiments.compare.run.Job`, the same seeds, prompt streams
and reuse of finished runs), so the summary is the same bit for bit. A task whose worker dies (a node lost, a
process killed) is run again by Ray up to ``RETRIES`` times: the retry retrains its run folder from the start
(the comparison's configs set ``run.overwrite``), and its result counts once. An error raised by the job itself is
not retried; it stops the comparison as with the local executor.

On a cluster, ``--out`` must be a folder every node sees (a shared file system), and every node needs tokenmdp and
the comparison's model installed, as verl and OpenRLHF ask of their workers.
"""

from __future__ import annotations

import queue as queue_module
import socket

from tokenmdp.errors import TokenMDPError
from tokenmdp.experiments.compare.run import Job, execute

RETRIES = 3  # Ray's max_retries for a task whose worker process died


def _import_ray():
    try:
        import ray
    except ImportError:
        raise TokenMDPError("--executor ray needs the 'ray' package, which is not installed; install it with "
                            "`pip install 'ray[default]'` (or pip install 'tokenmdp[ray]')") from None
    return ray


def _answers(address: str, timeout_s: float = 5.0) -> str | None:
    """Why nothing answers at ``address`` (``host:port`` or ``ray://host:port``), or None when a TCP connection
    opens: Ray itself retries an absent cluster for minutes before it gives up."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return "expected host:port (or ray://host:port, or auto)"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return None


def start_ray(address: str | None, *, cpus: int):
    """Connect to the cluster at ``address``, or start a local Ray with ``cpus`` CPUs; returns the module and whether
    this call started (and so must stop) it."""
    ray = _import_ray()
    if ray.is_initialized():
        return ray, False
    why = _answers(address) if address and address != "auto" else None
    if why is not None:
        raise TokenMDPError(f"--executor ray: could not reach a Ray cluster at --address {address}: {why}. Start one "
                            "with `ray start --head` (its address is printed), or leave --address out to start a "
                            "local one")
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        else:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     object_store_memory=128 * 1024**2)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"at --address {address}" if address else "locally"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TokenMDPError(f"--executor ray: could not reach a Ray cluster {where}: {first}. Start one with "
                            "`ray start --head` (its address is printed), or leave --address out to start a local "
                            "one") from None
    return ray, True


def _ray_job(job: Job, events, threads: int | None) -> dict:
    """One job in a Ray worker: torch's threads set, progress events sent back through ``events`` (a Ray queue)."""
    import torch
    from transformers.utils import logging as hf_logging

    if threads is not None:
        torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    return execute(job, lambda *message: events.put(message))


def run_on_ray(jobs: list[Job], tracker, *, workers: int, threads: int | None, address: str | None = None,
               gpus: float = 0.0) -> list[dict]:
    """Run ``jobs`` as Ray tasks (each ``threads`` CPUs, ``gpus`` GPUs); results in the order of ``jobs``. A local
    Ray gets ``workers * threads`` CPUs, so as many jobs run at once as with the local executor."""
    ray, started = start_ray(address, cpus=max(1, workers) * (threads or 1))
    try:
        from ray.util.queue import Queue

        events = Queue()
        task = ray.remote(num_cpus=threads or 1, num_gpus=gpus, max_retries=RETRIES,
                          retry_exceptions=False)(_ray_job)
        refs = {task.remote(job, events, threads): job for job in jobs}
        pending, results = list(refs), {}
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=0.2)
                _drain(events, tracker)
                for ref in done:
                    job = refs[ref]
                    results[job.label] = _result(ray, ref, job)
                    tracker.done(job.label)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
        _drain(events, tracker)
        return [results[job.label] for job in jobs]
    finally:
        if started:
            ray.shutdown()


def _result(ray, ref, job: Job) -> dict:
    """The job's result; its own error raised as the local executor raises it, a lost worker named."""
    from ray.exceptions import RayTaskError, WorkerCrashedError

    try:
        return ray.get(ref)
    except RayTaskError as exc:
        cause = exc.as_instanceof_cause()
        raise (exc.cause if isinstance(exc.cause, Exception) else cause) from None
    except WorkerCrashedError:
        raise TokenMDPError(f"compare job {job.label}: its Ray worker died {RETRIES + 1} times; the run folder "
                            "keeps what it wrote, and running the comparison again retrains it") from None


def _drain(events, tracker) -> None:
    while True:
        try:
            tracker(*events.get_nowait())
        except queue_module.Empty:
            return
