"""Which route an OpenAI request takes, without a server: `route_for` on a parsed config."""

from __future__ import annotations

from producer.ops.openai.routing import route_for
from producer.ops.tenants import DEFAULT_TENANT, Tenants
from workers.config import parse_settings

NO_CHAT_ROUTE = """
[providers.a]
api = "openai"
base_url = "https://a.example/v1"
key_env = "A_KEY"
limits = { rpm = 60 }
[providers.a.models.am]

[routes.code]
free = ["a:am"]
"""


def test_the_operator_token_works_on_a_config_without_a_chat_route() -> None:
    """`$SPILLWAY_API_TOKEN`'s requests for `model="spillway"` (and its Batch API uploads,
    which check that route) take the config's first route when there is no `chat` or `*`."""
    settings = parse_settings(NO_CHAT_ROUTE, "no-chat.toml")
    tenants = Tenants.from_settings(settings, {}, "sk-operator")
    operator = tenants.by_name[DEFAULT_TENANT]
    assert operator.task == "code"
    assert route_for(settings, operator, "spillway") == ("code", "free", None)
    assert route_for(settings, operator, "am") == ("code", "free", "a")
