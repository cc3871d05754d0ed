"""`spillway check`: which config and ``.env`` it used and, per provider account, whether its key
is there, the provider answers, what limits it reports and whether the configured models exist.
Key values and prompts never reach the output."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click
import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from producer.cli.client import config_option
from producer.cli.init import STARTERS
from workers import discovery, redisconn
from workers.config import ProviderConfig, Settings, load_settings
from workers.env import Env
from workers.errors import (
    AuthError,
    BadRequest,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeout,
    QuotaExhausted,
    RateLimited,
)
from workers.keys import ApiKey, KeyRing
from workers.messages import Completion, build_request
from workers.providers.signals import RateLimitSignal
from workers.providers.transport import complete

# -- spillway check ---------------------------------------------------------------------------

#: The probe: a fixed, harmless prompt, answered in one token.
PROBE_PROMPT = "Reply with the single word: ok"
#: How providers say a model does not exist without naming it in a 404 (DeepSeek: "Model Not
#: Exist", Mistral: "Invalid model", OpenRouter: "… is not a valid model ID", Together).
_MODEL_UNKNOWN = re.compile(
    r"model_not_found|model not exist|(unknown|invalid|no such) model|not a valid model"
    r"|unable to access model",
    re.I,
)


@dataclass
class AccountCheck:
    """One provider account as `spillway check` saw it. Never holds a key value."""

    provider: str
    account: str  # the key id of its first key, or "shared", or "" (no key)
    keys: list[str]  # the variables' names
    key_source: str  # ".env", "environment", "none needed", "missing"
    simulated: bool
    reachable: bool | None = None  # None: not called
    limits: list[dict[str, Any]] = field(default_factory=list)
    limits_model: str | None = None  # the model whose answer reported `limits`
    models: dict[str, str] = field(default_factory=dict)  # model -> ok | unknown | not checked
    problem: str | None = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass
class Probe:
    """The outcome of one call (one account, one model)."""

    model: str
    reachable: bool
    model_state: str  # ok | unknown | not checked
    signal: RateLimitSignal | None = None
    problem: str | None = None
    note: str | None = None


Planned = tuple[AccountCheck, ApiKey | None, list[str]]


def plan(settings: Settings, keyring: KeyRing, env: Env, dotenv_values: Mapping[str, str]) -> list[Planned]:
    """(row, key to call with or None, models to call) per provider account, config order."""
    planned: list[Planned] = []
    for name, provider in settings.providers.items():
        models = list(provider.models)
        simulated = env.simulator_url is not None
        if provider.key_env is None:
            row = AccountCheck(name, "", [], "none needed", simulated)
            planned.append((row, None, models))
            continue
        keys = keyring.keys(name)
        if not keys:
            row = AccountCheck(name, "", [provider.key_env], "missing", simulated)
            row.problem = _missing_key(name, provider, env, dotenv_values)
            planned.append((row, None, []))
            continue
        accounts: dict[str, list[ApiKey]] = {}
        for key in keys:
            accounts.setdefault(key.account, []).append(key)
        for i, (account, group) in enumerate(accounts.items()):
            names = [k.env_name for k in group]
            sources = {".env" if dotenv_values.get(n) == env.environ.get(n) else "environment" for n in names}
            row = AccountCheck(name, account, names, "/".join(sorted(sources)), simulated)
            # every model once, on the first account; each further account answers for itself
            planned.append((row, group[0], models if i == 0 else models[:1]))
    return planned


def _missing_key(name: str, provider: ProviderConfig, env: Env, dotenv_values: Mapping[str, str]) -> str:
    where = "is empty in .env" if provider.key_env in dotenv_values else "is not set"
    starter = STARTERS.get(name)
    get_one = f" (get one at {starter.key_url})" if starter and starter.key_env else ""
    return f"${provider.key_env} {where}: put the key in .env or the environment{get_one}"


def probe(
    http: httpx.Client, provider: ProviderConfig, model: str, key: ApiKey | None, timeout_s: float
) -> Probe:
    """One smallest call through the provider's own adapter, classified for the table."""
    quick = replace(
        provider,
        timeout_s=min(provider.timeout_s, timeout_s),
        connect_timeout_s=min(provider.connect_timeout_s, timeout_s),
    )
    request = build_request(PROBE_PROMPT, max_tokens=1)
    try:
        answer: Completion = complete(http, quick, model, request, key.secret if key else None)
    except RateLimited as exc:
        until = time.strftime("%H:%M:%S", time.localtime(exc.retry_at_s)) if exc.retry_at_s else "later"
        return Probe(model, True, "ok", exc.signal, note=f"rate limited right now (until {until})")
    except ProviderConnectionError as exc:
        return Probe(
            model, False, "not checked", problem=f"cannot connect to {provider.base_url} ({_why(exc)})"
        )
    except ProviderTimeout:
        return Probe(
            model, False, "not checked", problem=f"no answer from {provider.base_url} within {timeout_s:g}s"
        )
    except AuthError as exc:
        return Probe(model, True, "not checked", exc.signal, problem=f"key rejected: {exc}")
    except QuotaExhausted as exc:
        return Probe(model, True, "not checked", exc.signal, problem=f"no quota or credit left: {exc}")
    except BadRequest as exc:
        if _model_unknown(exc, model):
            return Probe(model, True, "unknown", exc.signal, problem=f"model {model!r} unknown: {exc}")
        if exc.status == 404:
            return Probe(
                model,
                True,
                "not checked",
                exc.signal,
                problem=f"{exc} (is base_url {provider.base_url} right?)",
            )
        return Probe(model, True, "not checked", exc.signal, problem=f"a 1-token request was refused: {exc}")
    except ProviderError as exc:  # 5xx, overloaded, a malformed answer
        return Probe(model, True, "not checked", exc.signal, problem=f"the provider failed: {exc}")
    return Probe(model, True, "ok", answer.signal)


def _why(exc: ProviderError) -> str:
    return exc.message.removeprefix("connection failed ").strip("()") or "connection failed"


def _model_unknown(exc: BadRequest, model: str) -> bool:
    """A 404 that names the model, or any refusal that says the model does not exist."""
    if exc.status == 404 and model.lower() in exc.message.lower():
        return True  # OpenAI, Groq, xAI: "The model `x` does not exist"; Gemini, Anthropic, Ollama
    return exc.status in (400, 404, 422) and bool(_MODEL_UNKNOWN.search(exc.message))


def windows(signal: RateLimitSignal | None) -> list[dict[str, Any]]:
    if signal is None:
        return []
    return [
        {"unit": w.unit, "period": w.period, "limit": w.limit, "remaining": w.remaining}
        for w in signal.windows
    ]


def check_accounts(
    settings: Settings, env: Env, dotenv_values: Mapping[str, str], *, call: bool, timeout_s: float
) -> list[AccountCheck]:
    """Every provider account of the config, each called once per model to check (in parallel)."""
    keyring = KeyRing(settings, env.environ, quiet=True)
    planned = plan(settings, keyring, env, dotenv_values)
    if not call:
        for row, _key, models in planned:
            row.models = dict.fromkeys(models, "not checked")
        return [row for row, _, _ in planned]
    jobs = [(row, key, model) for row, key, models in planned for model in models]
    with httpx.Client(headers={"user-agent": "spillway-check/0.1"}) as http, ThreadPoolExecutor(8) as pool:
        probes = list(
            pool.map(
                lambda job: probe(http, settings.providers[job[0].provider], job[2], job[1], timeout_s), jobs
            )
        )
    secrets = keyring.secrets()
    for (row, _key, _model), result in zip(jobs, probes, strict=True):
        row.reachable = result.reachable if row.reachable is None else (row.reachable and result.reachable)
        row.models[result.model] = result.model_state
        if not row.limits and windows(result.signal):
            row.limits, row.limits_model = windows(result.signal), result.model
        if result.problem and row.problem is None:
            row.problem = scrub(result.problem, secrets)
        if result.note and row.note is None:
            row.note = scrub(result.note, secrets)
    return [row for row, _, _ in planned]


def scrub(text: str, secrets: Iterable[str]) -> str:
    """A provider's message may quote the key it was sent: never pass one on."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text[:300]


def shown_url(url: str) -> str:
    """A URL without its password."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redis_problem(env: Env) -> str | None:
    if env.redis_url.startswith(redisconn.CLUSTER_SCHEME) or redisconn.answers(env.redis_url):
        return None
    return (
        f"Redis does not answer at {shown_url(env.redis_url)}: start redis-server, or set "
        "SPILLWAY_REDIS_URL (in .env or the environment); workers and submits need it"
    )


def _limits_text(row: AccountCheck, provider: ProviderConfig) -> str:
    if row.limits:
        parts = []
        for w in row.limits:
            amount = (
                f"{w['remaining']:,}/{w['limit']:,}" if w["limit"] is not None else f"{w['remaining']:,} left"
            )
            per = {"minute": " a minute", "day": " a day"}.get(w["period"], "")
            parts.append(f"{w['unit'].replace('_', ' ')} {amount}{per}")
        return f"{row.limits_model}: " + ", ".join(parts)
    if row.reachable is None or not row.reachable:
        return "—"
    if provider.signals in ("none", "gemini"):
        return "none sent (it sends no rate-limit headers: limits from the config)"
    return "none received"


def _models_text(row: AccountCheck) -> str:
    if not row.models:
        return "—"
    unknown = [m for m, state in row.models.items() if state == "unknown"]
    if unknown:
        return "unknown: " + ", ".join(unknown)
    ok = [m for m, state in row.models.items() if state == "ok"]
    if ok and len(ok) == len(row.models):
        return f"{len(ok)} ok" if len(ok) > 1 else "ok"
    return "not checked"


def render(report: dict[str, Any], rows: list[AccountCheck], settings: Settings, console: Console) -> None:
    for label, value in report["files"].items():
        console.print(f"[bold]{label:<9}[/] {escape(value)}", highlight=False, soft_wrap=True)
    table = Table(show_lines=False)
    for column in ("provider", "account", "key", "found", "reachable", "limits learned", "models"):
        table.add_column(column, overflow="fold")
    for row in rows:
        found = {"missing": "[red]no[/]", "none needed": "none needed"}.get(
            row.key_source, f"yes ({row.key_source})"
        )
        reachable = (
            "not called"
            if row.reachable is None
            else ("[green]yes[/]" + (" (simulated)" if row.simulated else ""))
            if row.reachable
            else "[red]no[/]"
        )
        table.add_row(
            row.provider,
            row.account or "—",
            escape(", ".join(row.keys) or "—"),
            found,
            reachable,
            escape(_limits_text(row, settings.providers[row.provider])),
            escape(_models_text(row)),
        )
    console.print(table)
    for row in rows:
        if row.note:
            console.print(
                f"[yellow]note[/] {row.provider}: {escape(row.note)}", highlight=False, soft_wrap=True
            )
    for problem in report["problems"]:
        console.print(f"[bold red]problem[/] {escape(problem)}", highlight=False, soft_wrap=True)
    if report["ok"] and report.get("called", True):
        console.print("[green]ready[/]: every configured provider has its key and answers", highlight=False)
    elif report["ok"]:
        console.print("[green]keys found[/] for every provider (--no-call: none was called)", highlight=False)


@click.command()
@config_option
@click.option("--no-call", is_flag=True, help="Check the files and keys only; call no provider.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(0.1, 30),
    default=5.0,
    show_default=True,
    help="Seconds each call may take.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check(config_path: str | None, no_call: bool, timeout_s: float, as_json: bool) -> None:
    """Which files are used; per provider account: key found, reachable, limits, models."""
    dotenv_found = discovery.load_dotenv()
    env = Env.from_environ()
    config = discovery.find_config(config_path, environ=env.environ)
    settings = load_settings(config.path, simulator_url=env.simulator_url)
    dotenv_values = discovery.dotenv_names(dotenv_found)
    rows = check_accounts(settings, env, dotenv_values, call=not no_call, timeout_s=timeout_s)
    problems = [f"{row.provider}: {row.problem}" for row in rows if row.problem]
    if env.simulator_url and any("cannot connect to" in p for p in problems):
        problems.append(f"is `spillway simulate` running? $SPILLWAY_SIMULATOR_URL is {env.simulator_url}")
    redis = None if no_call else redis_problem(env)
    if redis:
        problems.append(redis)
    places = " or ".join(str(p.resolve()) for p in discovery.dotenv_places(environ=env.environ))
    files = {
        "config": str(config),
        ".env": str(dotenv_found) if dotenv_found else f"none (looked for {places})",
    }
    if env.simulator_url:
        files["simulator"] = f"{env.simulator_url} ($SPILLWAY_SIMULATOR_URL: every provider is simulated)"
    if not no_call:
        files["redis"] = f"{shown_url(env.redis_url)} ({'does not answer' if redis else 'answers'})"
    report = {
        "config": {"path": str(config.path.resolve()), "found_by": config.origin},
        "dotenv": {"path": str(dotenv_found.path.resolve()), "found_by": dotenv_found.origin}
        if dotenv_found
        else None,
        "simulator_url": env.simulator_url,
        "files": files,
        "accounts": [asdict(row) | {"ok": row.ok} for row in rows],
        "called": not no_call,
        "problems": problems,
        "ok": not problems,
    }
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False))
    else:
        render(report, rows, settings, Console(width=max(Console().width, 140)))
    sys.exit(0 if report["ok"] else 1)
