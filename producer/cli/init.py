"""Getting started with your own keys: `spillway init` writes a starter ``spillway.toml`` and
``.env`` for the providers you pick (and `spillway worker` says how, when it finds no key)."""

from __future__ import annotations

import os
import re
import sys
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import click

from workers import discovery
from workers.config import Settings
from workers.constants import DEFAULT_CONFIG_FILE
from workers.keys import KeyRing

# -- the starters: one block of config per provider ------------------------------------------

#: Every provider `spillway init` knows, as in the repository's commented spillway.toml (a test
#: keeps the two equal); each ``[providers.<name>]`` block is written as it stands.
SECTIONS = """
[providers.openai]
api = "openai"
base_url = "https://api.openai.com/v1"
key_env = "OPENAI_API_KEY"
max_tokens_field = "max_completion_tokens"   # o-series models reject max_tokens
shared_quota = true                          # limits belong to the organization / project
[providers.openai.models."gpt-4o-mini"]
input_per_mtok = 0.15
output_per_mtok = 0.60
limits = { rpm = 500, rpd = 10000, tpm = 200000 }
[providers.openai.models."gpt-4o"]
input_per_mtok = 2.50
output_per_mtok = 10.00
limits = { rpm = 500, tpm = 30000 }
[providers.anthropic]
api = "anthropic"
base_url = "https://api.anthropic.com"
key_env = "ANTHROPIC_API_KEY"
shared_quota = true
[providers.anthropic.models."claude-haiku-4-5"]
input_per_mtok = 1.00
output_per_mtok = 5.00
limits = { rpm = 50, itpm = 50000, otpm = 10000 }
[providers.anthropic.models."claude-sonnet-4-5"]
input_per_mtok = 3.00
output_per_mtok = 15.00
limits = { rpm = 50, itpm = 30000, otpm = 8000 }
[providers.gemini]
api = "gemini"
base_url = "https://generativelanguage.googleapis.com/v1beta"
key_env = "GEMINI_API_KEY"
daily_reset = "00:00 America/Los_Angeles"   # Gemini's days end at midnight Pacific
shared_quota = true                         # quota belongs to the Cloud project, not the key
[providers.gemini.models."gemini-2.0-flash"]
input_per_mtok = 0.10
output_per_mtok = 0.40
limits = { rpm = 15, tpm = 1000000, rpd = 1500 }
[providers.gemini.models."gemini-2.5-flash"]
input_per_mtok = 0.30
output_per_mtok = 2.50
limits = { rpm = 10, tpm = 250000, rpd = 500 }
[providers.groq]
api = "openai"
signals = "groq"               # x-ratelimit-*-requests are per DAY, *-tokens per MINUTE
base_url = "https://api.groq.com/openai/v1"
key_env = "GROQ_API_KEY"
limits = { concurrency = 8 }
[providers.groq.models."llama-3.3-70b-versatile"]
input_per_mtok = 0.59
output_per_mtok = 0.79
limits = { rpm = 30, rpd = 1000, tpm = 12000, tpd = 100000 }
[providers.groq.models."llama-3.1-8b-instant"]
input_per_mtok = 0.05
output_per_mtok = 0.08
limits = { rpm = 30, rpd = 14400, tpm = 6000, tpd = 500000 }
[providers.mistral]
api = "openai"
signals = "none"               # Mistral documents no rate-limit headers
base_url = "https://api.mistral.ai/v1"
key_env = "MISTRAL_API_KEY"
limits = { rpm = 60, tpm = 500000 }   # free tier: 1 request/s
[providers.mistral.models."mistral-small-latest"]
input_per_mtok = 0.10
output_per_mtok = 0.30
[providers.openrouter]
api = "openai"
signals = "none"               # no headers on success; 429s carry Retry-After
base_url = "https://openrouter.ai/api/v1"
key_env = "OPENROUTER_API_KEY"
headers = { "HTTP-Referer" = "https://github.com/your-org/your-app", "X-Title" = "Spillway" }
limits = { rpm = 20, rpd = 50 }       # :free variants, under 10 credits purchased
[providers.openrouter.models."meta-llama/llama-3.3-70b-instruct:free"]
[providers.together]
api = "openai"
signals = "none"
base_url = "https://api.together.xyz/v1"
key_env = "TOGETHER_API_KEY"
limits = { rpm = 600 }
[providers.together.models."meta-llama/Llama-3.3-70B-Instruct-Turbo"]
input_per_mtok = 0.88
output_per_mtok = 0.88
[providers.xai]
api = "openai"
signals = "none"
base_url = "https://api.x.ai/v1"
key_env = "XAI_API_KEY"
limits = { rpm = 60, tpm = 100000 }
[providers.xai.models."grok-3-mini"]
input_per_mtok = 0.30
output_per_mtok = 0.50
[providers.deepseek]
api = "openai"
signals = "none"               # no headers; a per-account concurrency cap instead
base_url = "https://api.deepseek.com"
key_env = "DEEPSEEK_API_KEY"
limits = { concurrency = 32 }
timeout_s = 120
[providers.deepseek.models."deepseek-chat"]
input_per_mtok = 0.27
output_per_mtok = 1.10
[providers.deepseek.models."deepseek-reasoner"]
input_per_mtok = 0.55
output_per_mtok = 2.19
[providers.ollama]
api = "openai"
signals = "none"
base_url = "http://localhost:11434/v1"   # no key_env: a local Ollama takes no key
limits = { concurrency = 2 }
[providers.ollama.models."llama3.2"]
"""

#: name -> (title, fast model for free and high-volume chains, strong model for paid chains,
#: where to get a key — or, for Ollama, how to run it)
ABOUT = {
    "openai": ("OpenAI", "gpt-4o-mini", "gpt-4o", "https://platform.openai.com/api-keys"),
    "anthropic": (
        "Anthropic",
        "claude-haiku-4-5",
        "claude-sonnet-4-5",
        "https://console.anthropic.com/settings/keys",
    ),
    "gemini": ("Google Gemini", "gemini-2.0-flash", "gemini-2.5-flash", "https://aistudio.google.com/apikey"),
    "groq": ("Groq", "llama-3.1-8b-instant", "llama-3.3-70b-versatile", "https://console.groq.com/keys"),
    "mistral": (
        "Mistral",
        "mistral-small-latest",
        "mistral-small-latest",
        "https://console.mistral.ai/api-keys",
    ),
    "openrouter": (
        "OpenRouter",
        "meta-llama/llama-3.3-70b-instruct:free",
        "meta-llama/llama-3.3-70b-instruct:free",
        "https://openrouter.ai/settings/keys",
    ),
    "together": (
        "Together AI",
        "meta-llama/Llama-3.3-70B-Instruct-Turbo",
        "meta-llama/Llama-3.3-70B-Instruct-Turbo",
        "https://api.together.ai/settings/api-keys",
    ),
    "xai": ("xAI", "grok-3-mini", "grok-3-mini", "https://console.x.ai"),
    "deepseek": ("DeepSeek", "deepseek-chat", "deepseek-chat", "https://platform.deepseek.com/api_keys"),
    "ollama": ("Ollama", "llama3.2", "llama3.2", "https://ollama.com/download, then `ollama pull llama3.2`"),
}


@dataclass(frozen=True)
class Starter:
    """What `spillway init` writes for one provider."""

    name: str
    title: str
    section: str  # the [providers.<name>] TOML, models included
    fast: str
    strong: str
    key_env: str | None
    key_url: str


def _starters() -> dict[str, Starter]:
    blocks = re.split(r"^(?=\[providers\.\w+\]$)", SECTIONS.strip(), flags=re.M)
    sections = {block.split("]", 1)[0].removeprefix("[providers."): block for block in blocks if block}
    out = {}
    for name, (title, fast, strong, key_url) in ABOUT.items():
        key_env = tomllib.loads(sections[name])["providers"][name].get("key_env")
        out[name] = Starter(name, title, sections[name], fast, strong, key_env, key_url)
    return out


STARTERS = _starters()

#: Chains try providers in this order: free tiers first for free work, paid quality for paid work.
FREE_ORDER = (
    "groq",
    "gemini",
    "mistral",
    "openrouter",
    "together",
    "deepseek",
    "xai",
    "ollama",
    "openai",
    "anthropic",
)
PAID_ORDER = (
    "openai",
    "anthropic",
    "gemini",
    "deepseek",
    "xai",
    "mistral",
    "together",
    "groq",
    "openrouter",
    "ollama",
)
FREE, PRO, ADMIN = ("fast", FREE_ORDER), ("strong", PAID_ORDER), ("strong", PAID_ORDER)
#: The standard task types, as in the shipped example: (task, strategy, {tier: (model, order)}).
ROUTES = (
    ("code", "ordered", {"free": FREE, "pro": PRO, "admin": ADMIN}),
    ("reasoning", "ordered", {"free": ("strong", FREE_ORDER), "pro": PRO, "admin": ADMIN}),
    ("analysis", "fastest", {"free": FREE, "pro": ("fast", PAID_ORDER), "admin": ADMIN}),
    ("chat", "round_robin", {"free": FREE, "pro": ("fast", PAID_ORDER), "admin": ADMIN}),
    ("*", "ordered", {"free": FREE, "pro": PRO, "admin": ADMIN}),
)
SIMULATOR_PORT = 8900


def chain(picked: Iterable[str], kind: str, order: tuple[str, ...]) -> list[str]:
    """``provider:model`` of each picked provider, in `order`, once each."""
    names = set(picked)
    out = [f"{n}:{getattr(STARTERS[n], kind)}" for n in order if n in names]
    return list(dict.fromkeys(out))


def starter_config(picked: list[str], *, simulator_port: int | None = None) -> str:
    """A complete ``spillway.toml`` for the picked providers, routes built from them alone."""
    lines = [
        f"# Spillway configuration, written by `spillway init` for: {', '.join(picked)}.",
        "# Keys never live here: each provider names the variable that holds its key (`key_env`),",
        "# set in .env or the environment. Limits are the providers' documented free / tier-1",
        "# figures: put your own account's (`spillway check` shows what the provider reports).",
        "# Every option: the commented spillway.toml of the Spillway repository.",
        "",
        "[spillway]",
        "default_max_tokens = 512      # when a job names no max_tokens",
        "",
    ]
    for name in picked:
        lines += [STARTERS[name].section]
    lines += [
        "# Routes: task type -> tier -> chain of provider:model, tried in order (strategy).",
        '# Task types without their own route take "*".',
        "",
    ]
    for task, strategy, tiers in ROUTES:
        lines.append('[routes."*"]' if task == "*" else f"[routes.{task}]")
        if strategy != "ordered":
            lines.append(f'strategy = "{strategy}"')
        for tier, (kind, order) in tiers.items():
            lines.append(f"{tier} = [{', '.join(_quoted(n) for n in chain(picked, kind, order))}]")
        lines.append("")
    lines += [
        "# priority: higher runs first when work waits; budget_share: the part of each account",
        "# the tier may use, so paid work always finds room.",
        "[tiers.free]",
        "priority = 1",
        "budget_share = 0.7",
        "[tiers.pro]",
        "priority = 5",
        "[tiers.admin]",
        "priority = 9",
    ]
    if simulator_port is not None:
        lines += ["", "# `spillway simulate` serves every provider above here (see .env).", "[simulator]"]
        lines.append(f"port = {simulator_port}")
    return "\n".join(lines) + "\n"


def starter_dotenv(picked: list[str], *, simulator_port: int | None = None) -> str:
    """The ``.env``: one key line per picked provider (empty, or a simulator key)."""
    simulated = simulator_port is not None
    url = f"http://127.0.0.1:{simulator_port or SIMULATOR_PORT}"
    lines = [
        f"# Spillway's secrets, written by `spillway init` for: {', '.join(picked)}. Spillway reads",
        "# ./.env (else ~/.config/spillway/.env); variables already in the environment win.",
        "# Keep this file out of version control. More keys (accounts) of a provider: NAME_1=, NAME_2=",
        "",
    ]
    if simulated:
        lines += [
            "# Simulated: `spillway simulate`, run in this directory, serves every provider and",
            "# takes any key. For the real APIs, delete the next line and put your real keys below.",
            f"SPILLWAY_SIMULATOR_URL={url}",
            "",
        ]
    for name in picked:
        starter = STARTERS[name]
        if starter.key_env is None:
            lines += [f"# {starter.title} takes no key; install and run it: {starter.key_url}", ""]
            continue
        value = f"sim-{name}" if simulated else ""
        lines += [f"# {starter.title}: get a key at {starter.key_url}", f"{starter.key_env}={value}", ""]
    if not simulated:
        lines += [
            "# To try everything without real calls: run `spillway simulate` and uncomment",
            "# (any non-empty keys will do):",
            f"# SPILLWAY_SIMULATOR_URL={url}",
            "",
        ]
    lines += [
        "# Redis (limiter and broker); the default is a local redis-server:",
        "# SPILLWAY_REDIS_URL=redis://127.0.0.1:6379/0",
    ]
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_providers(text: str) -> list[str]:
    """ "1 3", "groq, openai" or a mix: the providers named, in the order given, each once."""
    names = list(STARTERS)
    picked = []
    for word in re.split(r"[\s,]+", text.strip()):
        if not word:
            continue
        name = names[int(word) - 1] if word.isdigit() and 1 <= int(word) <= len(names) else word.lower()
        if name not in STARTERS:
            raise click.UsageError(f"unknown provider {word!r} (known: {', '.join(names)})")
        picked.append(name)
    if not picked:
        raise click.UsageError("pick at least one provider")
    return list(dict.fromkeys(picked))


def ask_providers() -> list[str]:
    """The multiple choice, on a terminal."""
    click.echo("Which providers do you have keys for (or want to try simulated)?")
    for i, starter in enumerate(STARTERS.values(), 1):
        local = "" if starter.key_env else ", local, no key"
        click.echo(f"  {i:>2}  {starter.name:<11} {starter.title} ({starter.fast}{local})")
    return click.prompt("numbers or names, separated by spaces", value_proc=parse_providers)


# -- spillway init ----------------------------------------------------------------------------


@click.command()
@click.option(
    "--provider",
    "providers",
    multiple=True,
    type=click.Choice(list(STARTERS), case_sensitive=False),
    help="A provider to configure (repeat it; asked for on a terminal when none is given).",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(),
    help="Where to write spillway.toml and .env (default: the current directory).",
)
@click.option("--simulated", is_flag=True, help="Point .env at `spillway simulate`, with simulator keys.")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=SIMULATOR_PORT,
    show_default=True,
    help="With --simulated: the simulator's port (written to both files).",
)
@click.option("--force", is_flag=True, help="Overwrite spillway.toml and .env if they exist.")
def init(providers: tuple[str, ...], directory: Path, simulated: bool, port: int, force: bool) -> None:
    """Write a starter spillway.toml and .env for the providers you pick."""
    picked = list(dict.fromkeys(p.lower() for p in providers))
    if not picked:
        if not sys.stdin.isatty():
            raise click.UsageError(
                f"name the providers: --provider groq --provider openai … (known: {', '.join(STARTERS)})"
            )
        picked = ask_providers()
    config_path, env_path = directory / DEFAULT_CONFIG_FILE, directory / discovery.DOTENV_FILE
    existing = [p for p in (config_path, env_path) if p.exists()]
    if existing and not force:
        names = " and ".join(str(p.resolve()) for p in existing)
        raise click.ClickException(
            f"{names} already exist{'s' if len(existing) == 1 else ''}: nothing written (--force overwrites)"
        )
    sim_port = port if simulated else None
    directory.mkdir(parents=True, exist_ok=True)
    config_path.write_text(starter_config(picked, simulator_port=sim_port), encoding="utf-8")
    _write_private(env_path, starter_dotenv(picked, simulator_port=sim_port))
    click.echo(f"wrote {config_path.resolve()} ({', '.join(picked)})")
    click.echo(f"wrote {env_path.resolve()}")
    here = "" if directory.resolve() == Path.cwd().resolve() else f"cd {directory} && "
    if simulated:
        click.echo(
            f"next, from that directory: `{here}spillway simulate` (keep it running), then "
            "`spillway check`, `spillway worker`, and "
            "`spillway submit --task chat --tier free --prompt 'Hello' --wait`"
        )
    else:
        click.echo(
            f"next: put your keys in {env_path.resolve()}, then `{here}spillway check`, "
            "`spillway worker`, and `spillway submit --task chat --tier free --prompt 'Hello' --wait`"
        )


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds keys)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    path.chmod(0o600)


# -- spillway worker's hint ------------------------------------------------------------------

KEY_HINT = (
    "put the keys in ./.env or export them: `spillway init` writes a .env for your providers, "
    "`spillway init --simulated` one that runs on `spillway simulate` (in a checkout, .env.example "
    "has simulator keys: copy it to .env and set SPILLWAY_SIMULATOR_URL=http://127.0.0.1:8900); "
    "`spillway check` shows what is found"
)


def no_key_hint(settings: Settings, keyring: KeyRing, served: list[str]) -> str | None:
    """When every provider served is one that needs no key (Ollama) while others lack theirs."""
    if not keyring.skipped or any(settings.providers[n].key_env for n in served):
        return None
    missing = [f"${settings.providers[n].key_env}" for n in keyring.skipped]
    shown = ", ".join(missing[:3]) + (f" … {len(missing)} in all" if len(missing) > 3 else "")
    return (
        f"only {', '.join(served)} is served (it needs no key); no provider key found ({shown}): {KEY_HINT}"
    )
