"""The HTTP service and Flower, as real processes against a real worker."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from producer.ops.stack import stop_process
from workers.embedded import free_port

pytestmark = pytest.mark.integration
TOKEN = "test-token-5e1f"


def start(argv: list[str], env: dict[str, str], url: str, timeout_s: float = 60) -> subprocess.Popen:
    # stderr to a file, not a pipe nobody reads: a full pipe blocks the process, even its exit
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{argv[3:5]} exited: {log.read()[-2000:].decode(errors='replace')}")
            try:
                httpx.get(url, timeout=1)
                return proc
            except httpx.HTTPError:
                time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"{url} did not answer")


@pytest.fixture(scope="module")
def api(e2e_stack):
    port = free_port()
    env = {**os.environ, **e2e_stack.env, "SPILLWAY_API_TOKEN": TOKEN}
    proc = start(
        [sys.executable, "-m", "producer.cli", "serve", "--port", str(port)],
        env,
        f"http://127.0.0.1:{port}/metrics",
    )
    yield httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    )
    stop_process(proc)


def test_every_route_needs_the_token(api) -> None:
    for path in ("/metrics", "/v1/status", "/v1/usage", "/v1/jobs/" + "0" * 32):
        answer = httpx.get(str(api.base_url) + path, headers={"Authorization": "Bearer wrong"})
        assert (
            answer.status_code == 401 and answer.json()["error"]["message"] == "missing or wrong bearer token"
        )


def test_submit_and_read_a_job_over_http(api) -> None:
    created = api.post("/v1/jobs", json={"prompt": "hello over http", "task": "chat", "tier": "pro"})
    assert created.status_code == 202
    job_id = created.json()["job_id"]
    deadline = time.monotonic() + 60
    while (job := api.get(f"/v1/jobs/{job_id}").json())[
        "status"
    ] != "succeeded" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job["text"] and job["provider"] == "openai" and job["output_tokens"] > 0


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "the body is not valid JSON"),
        (b"[1, 2]", 400, "the body must be a JSON object"),
        (b'{"prompt": "x", "task": "chat", "tier": "pro", "colour": "red"}', 400, "unknown field(s): colour"),
        (b'{"prompt": "x", "task": "chat", "tier": "gold"}', 422, "unknown tier 'gold'"),
        (b'{"prompt": "x", "tier": "pro"}', 422, "task: is required"),
        (b'{"prompt": "", "task": "chat", "tier": "pro"}', 422, "prompt: is empty"),
        (
            b'{"prompt": "x", "task": "chat", "tier": "pro", "max_tokens": -1}',
            422,
            "max_tokens: expected a positive integer",
        ),
        # an outside fault harness found these 500s, or taken (tests/test_bad_inputs.py has more)
        *(
            (
                b'{"prompt": "x", "task": "chat", "tier": "pro", "deadline_s": %s}' % value,
                422,
                "deadline_s: expected a number of seconds above 0 and at most 31,536,000",
            )
            for value in (b"1e300", b"NaN", b"Infinity", b"true")
        ),
        (
            b'{"prompt": "x", "task": "chat", "tier": "pro", "max_tokens": 1%s}' % (b"0" * 30),
            422,
            "max_tokens: expected a positive integer of at most 1,000,000",
        ),
        (
            b'{"prompt": "x", "task": "chat", "tier": "pro", "idempotency_key": "a\\u0000"}',
            422,
            "idempotency_key: must not contain NUL",
        ),
    ],
)
def test_bad_bodies_get_clear_4xx(api, body: bytes, status: int, message: str) -> None:
    answer = api.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status
    assert message in answer.json()["error"]["message"]


def test_a_body_over_8_mib_is_a_413_that_says_so(api) -> None:
    answer = api.post(
        "/v1/jobs", content=b"{" + b" " * (8 * 2**20), headers={"content-type": "application/json"}
    )
    assert answer.status_code == 413
    assert answer.json()["error"]["message"].startswith("the body is larger than 8 MiB")


def test_usage_since_beyond_a_date_is_a_422_naming_since(api) -> None:
    answer = api.get("/v1/usage", params={"since": "99999999999h"})
    assert answer.status_code == 422
    assert answer.json()["error"]["message"].startswith("--since: '99999999999h' reaches back")


def test_an_idempotency_key_reused_for_another_body_is_409(api) -> None:
    first = {"prompt": "invoice 12", "task": "chat", "tier": "pro", "idempotency_key": "inv-12-http"}
    assert api.post("/v1/jobs", json=first).status_code == 202
    again = api.post("/v1/jobs", json=first)
    assert again.status_code == 202  # the same request: the same job
    other = api.post("/v1/jobs", json={**first, "prompt": "invoice 13"})
    assert other.status_code == 409
    assert "was already used for a different request" in other.json()["error"]["message"]


def test_unknown_job_and_path(api) -> None:
    assert api.get("/v1/jobs/" + "f" * 32).status_code == 404
    assert api.get("/v2/nothing").status_code == 404


def test_status_usage_and_metrics(api) -> None:
    status = api.get("/v1/status").json()
    assert {p["provider"] for p in status["providers"]} >= {"groq", "openai"}
    usage = api.get("/v1/usage", params={"by": "provider", "since": "1h"}).json()
    assert usage["by"] == "provider" and "total" in usage
    metrics = api.get("/metrics").text
    assert 'spillway_queue_length{queue="llm.groq"}' in metrics
    assert "spillway_budget_remaining{" in metrics and 'spillway_jobs{status="succeeded"}' in metrics


def test_flower_shows_the_tasks_by_name_with_ids_and_no_prompt(e2e_stack) -> None:
    port = free_port()
    env = {**os.environ, **e2e_stack.env, "FLOWER_BASIC_AUTH": "ops:flower-test-pass"}
    proc = start(
        [sys.executable, "-m", "producer.cli", "flower", "--port", str(port)],
        env,
        f"http://127.0.0.1:{port}/healthcheck",
    )
    auth = ("ops", "flower-test-pass")
    try:
        secret_prompt = "flower must not see this prompt 7f3e"
        with e2e_stack.applied():
            from producer import submit

            # Flower learns of tasks from events it receives while connected: wait until it does
            def flower_sees(job_id: str) -> bool:
                return job_id in httpx.get(f"http://127.0.0.1:{port}/api/tasks", auth=auth, timeout=5).json()

            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                warm = submit("warm up", task="chat", tier="free")
                warm.wait(60)
                time.sleep(0.5)
                if flower_sees(warm.id):
                    break
            handle = submit(secret_prompt, task="chat", tier="free")
            handle.wait(60)
            e2e_stack.set_faults("groq", {"rate_limit": 1.0})  # free goes to groq first: 429, then gemini
            try:
                rerouted = submit("rerouted by a 429", task="chat", tier="free")
                rerouted_result = rerouted.wait(60)
            finally:
                e2e_stack.set_faults("groq", {})
        deadline = time.monotonic() + 30
        task = None
        while time.monotonic() < deadline:
            tasks = httpx.get(f"http://127.0.0.1:{port}/api/tasks", auth=auth, timeout=5).json()
            task, retried = tasks.get(handle.id), tasks.get(rerouted.id)
            if task and task.get("state") == "SUCCESS" and retried and retried.get("state") == "SUCCESS":
                break
            time.sleep(0.3)
        page = httpx.get(f"http://127.0.0.1:{port}/task/{handle.id}", auth=auth, timeout=5).text
        anonymous = httpx.get(f"http://127.0.0.1:{port}/api/tasks", timeout=5).status_code
    finally:
        stop_process(proc)
    # Flower names a job's task after its provider and model (Celery's shadow name)
    assert task is not None and task["state"] == "SUCCESS"
    assert task["name"] == "spillway.run_job[groq:llama-3.3-70b-versatile]"
    assert (
        handle.id in task["kwargs"]
        and "groq" in task["kwargs"]
        and "llama-3.3-70b-versatile" in task["kwargs"]
    )
    assert secret_prompt not in str(task) and secret_prompt not in page
    assert anonymous == 401
    # the 429 shows as a retry of the same task (same id), which then succeeded on its own terms
    assert rerouted_result.status == "succeeded" and rerouted_result.provider == "gemini"
    assert retried["retries"] >= 1 and "hop" in retried["kwargs"]
    assert retried["name"].startswith("spillway.run_job[gemini:")  # under the provider it moved to
