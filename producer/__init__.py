"""Spillway's producer API: submit LLM jobs and read their results.

from producer import submit
handle = submit("Explain token buckets in one line.", task="chat", tier="free")
print(handle.wait(60).text)
"""

from producer.batch import BatchHandle, submit_batch
from producer.jobs import JobHandle, JobResult, get, submit

__all__ = ["BatchHandle", "JobHandle", "JobResult", "get", "submit", "submit_batch"]
