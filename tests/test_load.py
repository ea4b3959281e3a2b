"""Load on loopback: 50 concurrent scrapers on TCP while jobs are registered
(and one in ten finished) through the control socket at a fixed pace. No errors, no lost
registration, every scrape valid; the scrape p99 is reported."""

from __future__ import annotations

import multiprocessing
import re
import subprocess
import threading
import time

import httpx
import pytest

from tests.faultkit import AgentProcess, Powercap

SCRAPERS = 50
MAX_POOL = 2500  # processes the registrations name in turn; past it, finished jobs free them


_BAD_VALUE = re.compile(rb"^[^#].* (-|NaN|[+-]Inf)", re.MULTILINE)


def _scrape_until(url: str, stop, results) -> None:
    """In a child process (its own interpreter lock): SCRAPERS threads scraping."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def scraper() -> None:
        with httpx.Client(timeout=30.0) as client:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    response = client.get(url)
                    elapsed = time.perf_counter() - started
                    if response.status_code != 200:
                        raise AssertionError(f"status {response.status_code}")
                    if _BAD_VALUE.search(response.content):
                        raise AssertionError("negative or non-finite value exported")
                except Exception as exc:  # reported to the parent
                    with lock:
                        failures.append(f"scrape: {exc!r}")
                    continue
                with lock:
                    latencies.append(elapsed)

    threads = [threading.Thread(target=scraper, daemon=True) for _ in range(SCRAPERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put((latencies, failures))


def _load(tmp_path, duration_s: float, rate_per_s: float) -> None:
    Powercap(tmp_path / "sys")
    agent = AgentProcess(tmp_path, tmp_path / "sys", interval_s=0.5, flush_interval_s=1.0)
    context = multiprocessing.get_context("fork")
    stop, results = context.Event(), context.Queue()
    scrapers = None
    pool: list[subprocess.Popen] = []
    try:
        agent.wait_ready()
        agent.settle()
        scrapers = context.Process(target=_scrape_until, args=(agent.url + "/metrics", stop, results))
        scrapers.start()
        failures: list[str] = []
        registered: list[str] = []
        # Live processes the registrations name; a process belongs to one running job at a
        # time, so the job last registered on one is finished before it is named again.
        pool += [subprocess.Popen(["sleep", "600"]) for _ in range(min(MAX_POOL, int(duration_s * rate_per_s)))]
        holder: dict[int, str] = {}
        started = time.monotonic()
        with agent.control() as control:
            index = 0
            while (now := time.monotonic()) - started < duration_s:
                due = started + index / rate_per_s
                if due > now:
                    time.sleep(due - now)
                pid = pool[index % len(pool)].pid
                if pid in holder:
                    finished = control.post(f"/v1/jobs/{holder.pop(pid)}/finish")
                    if finished.status_code != 200:
                        failures.append(f"finish on {pid}: {finished.status_code} {finished.text}")
                response = control.post(
                    "/v1/jobs", json={"name": f"load-{index}", "pids": [pid], "labels": {"batch": str(index % 7)}}
                )
                if response.status_code != 201:
                    failures.append(f"register {index}: {response.status_code} {response.text}")
                else:
                    job_id = response.json()["id"]
                    registered.append(job_id)
                    holder[pid] = job_id
                index += 1
            elapsed = time.monotonic() - started
            stop.set()
            latencies, scrape_failures = results.get(timeout=120)
            scrapers.join(timeout=60)
            failures += scrape_failures
            assert not failures, failures[:5]
            lost = [job_id for job_id in registered if control.get(f"/v1/jobs/{job_id}").status_code != 200]
        assert not lost, f"{len(lost)} registrations lost, e.g. {lost[:3]}"
        latencies.sort()
        p50, p99 = latencies[len(latencies) // 2], latencies[int(0.99 * (len(latencies) - 1))]
        print(
            f"\n{len(registered)} registrations in {elapsed:.1f} s ({len(registered) / elapsed:.0f}/s), "
            f"{len(latencies)} scrapes by {SCRAPERS} scrapers, p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms"
        )
        # Paced, but a loaded machine may lag. Each registration names a process of its own (one
        # process belongs to one running job), which the agent reads and checks: about 40/s here
        # with 50 scrapers on two cores, where naming one process over and over gave about 100/s.
        assert len(registered) >= duration_s * rate_per_s * 0.15
        assert len(latencies) > SCRAPERS
        assert agent.terminate() == 0
        assert "Traceback" not in agent.log
    finally:
        for proc in pool:
            proc.kill()
            proc.wait()
        stop.set()
        if scrapers is not None and scrapers.is_alive():
            scrapers.kill()
        agent.kill()


def test_concurrent_scrapes_and_registrations(tmp_path):
    _load(tmp_path, duration_s=10, rate_per_s=200)


@pytest.mark.slow
def test_concurrent_scrapes_and_registrations_for_a_minute(tmp_path):
    _load(tmp_path, duration_s=60, rate_per_s=200)
