"""Ray Jobs measured the way bench/latency.py and bench/transfer.py measure cadre. Runs inside its own venv and
inside a network namespace with only loopback (Ray reaches for the internet otherwise); prints one JSON line."""

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

from ray.job_submission import JobStatus, JobSubmissionClient

SAMPLES = int(sys.argv[1])
LINES = int(sys.argv[2])


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


async def first_line(client, job_id, t0):
    async for chunk in client.tail_job_logs(job_id):
        if chunk:
            return time.perf_counter() - t0
    return None


async def all_lines(client, job_id, t0):
    count = 0
    async for chunk in client.tail_job_logs(job_id):
        count += chunk.count("\n")
    return time.perf_counter() - t0, count


def until_done(client, job_id, t0):
    while client.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(0.005)
    return time.perf_counter() - t0


def main():
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(
        [
            "ray",
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = JobSubmissionClient("http://127.0.0.1:8265")
        with tempfile.TemporaryDirectory() as tmp:
            open(os.path.join(tmp, "hello.py"), "w").write("print('hello from ray', flush=True)\n")
            open(os.path.join(tmp, "flood.py"), "w").write(
                f"import sys\nw = sys.stdout.write\nfor i in range({LINES}):\n    w(f'line {{i}}\\n')\n"
            )
            runtime_env = {"working_dir": tmp}
            first, done = [], []
            for i in range(2 * SAMPLES + 2):
                t0 = time.perf_counter()
                job = client.submit_job(entrypoint="python hello.py", runtime_env=runtime_env)
                if i % 2 == 0:
                    first.append(asyncio.run(first_line(client, job, t0)))
                    until_done(client, job, t0)
                else:
                    done.append(until_done(client, job, t0))
            first, done = first[1:], done[1:]  # the first runs warm the working_dir upload
            t0 = time.perf_counter()
            job = client.submit_job(entrypoint="python flood.py", runtime_env=runtime_env)
            flood_done, count = asyncio.run(all_lines(client, job, t0))
        print(
            json.dumps(
                {
                    "first_p50_ms": pct(first, 50) * 1e3,
                    "first_p99_ms": pct(first, 99) * 1e3,
                    "done_p50_ms": pct(done, 50) * 1e3,
                    "done_p99_ms": pct(done, 99) * 1e3,
                    "flood_lines": count,
                    "flood_lines_per_s": count / flood_done,
                }
            )
        )
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


main()
