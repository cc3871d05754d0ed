"""Spillway's producer API: submit LLM jobs and read their results.

    from producer import submit
    handle = submit("Explain token buckets in one line.", task="chat", tier="free")
    print(handle.wait(60).text)

The functions use a default `Client` built from this process's environment; make a `Client`
of your own (with an `Env`) to talk to another deployment.
"""

from producer.batch import BatchHandle
from producer.client import Client, default_client, get, submit, submit_batch, using
from producer.jobs import JobHandle
from workers.env import Env
from workers.results import JobResult

__all__ = [
    "BatchHandle",
    "Client",
    "Env",
    "JobHandle",
    "JobResult",
    "default_client",
    "get",
    "submit",
    "submit_batch",
    "using",
]
