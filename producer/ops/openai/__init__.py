"""OpenAI's API in front of Spillway: the official SDKs work with only `base_url` and the key
changed (``OpenAI(base_url="http://spillway:8080/v1", api_key=<a tenant's token>)``).

    POST   /v1/chat/completions        a Spillway job, answered when it is done: a quota wait
                                       is a wait, never a 429
    GET    /v1/models                  the configured models and the `spillway/<task>` routes
    POST   /v1/files                   a batch input (multipart, purpose=batch), checked whole
    GET    /v1/files/{id}[/content]    an upload, or a batch's output or error file
    DELETE /v1/files/{id}
    POST   /v1/batches                 an ordinary Spillway batch (chords, usage, Flower) over it
    GET    /v1/batches[/{id}]          the batch object; the list pages with `after`, `limit`
    POST   /v1/batches/{id}/cancel

Which route a request takes (`route_for`): the model ``spillway/<task>`` is that task type's
chain; ``spillway`` the tenant's task type; a configured model (``gpt-4o-mini`` or
``openai:gpt-4o-mini``) the first route — the tenant's task type first, then the config's
order — whose chain for the tier has it, placed on that model first and spilling over to the
rest of the chain. ``X-Spillway-Task`` and ``X-Spillway-Tier`` headers (a batch: the
``spillway_task`` and ``spillway_tier`` metadata) choose them outright; a tier must be one the
tenant may use. Errors have OpenAI's shape and status codes, so the SDK raises the exception
class a user expects.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from producer.client import Client
from producer.ops.openai.batches import Batches, CancelBatch, OneBatch
from producer.ops.openai.chat import ChatCompletions, Models, Submitter, Waiters
from producer.ops.openai.files import File, Files
from producer.ops.openai.inline import InlineRunner
from producer.ops.tenants import Tenants


def openai_routes(
    client: Client, tenants: Tenants, pool: ThreadPoolExecutor
) -> list[tuple[str, Any, dict[str, Any]]]:
    waiters = Waiters(client, pool)
    runner = InlineRunner(client, client.env.serve_inline_calls, waiters.heard_here)
    args = {
        "client": client,
        "tenants": tenants,
        "pool": pool,
        "waiters": waiters,
        "submitter": Submitter(client, pool, runner),
    }
    return [
        (r"/v1/chat/completions", ChatCompletions, args),
        (r"/v1/models", Models, args),
        (r"/v1/models/(.+)", Models, args),
        (r"/v1/files", Files, args),
        (r"/v1/files/(file-[0-9a-z-]{1,60})(/content)?", File, args),
        (r"/v1/batches", Batches, args),
        (r"/v1/batches/(batch_[0-9a-z]{1,60})", OneBatch, args),
        (r"/v1/batches/(batch_[0-9a-z]{1,60})/cancel", CancelBatch, args),
    ]
