"""The container set-up under docker/, checked without a Docker engine.

The compose file (PostgreSQL, the one-shot migration, two gateway replicas, one published port
through HAProxy), the image's Dockerfile and .dockerignore, the configuration the image ships,
and its health probe. Whatever reaches the gateway (the shipped file, the environment the
compose file gives it) is loaded through the project's own config loader, so a key the gateway
would reject, or one it would silently ignore, fails here.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # type: ignore[import-untyped]
from aiohttp import web

from config import ConfigError, ListenAddress, Settings, load_settings
from config.sources import ENV_PREFIX, KEYS
from core.leasing import LeaseManager
from core.storage.memory import MemoryStorage
from gateway.admin import build_admin_app
from tests.support.net import closed_port

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"

#: What a user puts in docker/.env: stand-ins, never real credentials.
VARIABLES = {
    "POSTGRES_PASSWORD": "pgPassw0rd",
    "PROXYGATE_GATEWAY__USERS": '{alice = "alice-pw", bob = "bob-pw"}',
}
REQUIRED = tuple(VARIABLES)


# -- compose's variable interpolation -------------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


class Unset(Exception):
    """A `${NAME:?message}` whose variable is unset or empty: `docker compose` stops there."""


def interpolate(node: Any, variables: Mapping[str, str]) -> Any:
    """`node` with compose's `$$`, `$NAME`, `${NAME}`, `${NAME:-default}`, `${NAME-default}`,
    `${NAME:?error}` and `${NAME?error}` substituted in every string value."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["plain"]
        op, arg = match["op"] or "", match["arg"] or ""
        value = variables.get(name)
        missing = value is None or (op.startswith(":") and value == "")
        if missing and op.endswith("-"):
            return arg
        if missing and op.endswith("?"):
            raise Unset(f"{name}: {arg}")
        return value or ""

    if isinstance(node, str):
        return _VARIABLE.sub(substitute, node)
    if isinstance(node, list):
        return [interpolate(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(value, variables) for key, value in node.items()}
    return node


def compose(variables: Mapping[str, str] = VARIABLES) -> dict[str, Any]:
    """docker/compose.yaml as `docker compose config` would see it (anchors and merges resolved)."""
    document = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    result: dict[str, Any] = interpolate(document, variables)
    return result


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's `environment`, in either of compose's two spellings."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(key): str(value) for key, value in env.items()}


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"]
    return found


# -- the Dockerfile -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list), f"{self.keyword} is not in exec (JSON) form"
        return [str(item) for item in value]


@dataclass(frozen=True, slots=True)
class Stage:
    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.base}"
        return found[-1]


def dockerfile_stages() -> list[Stage]:
    """docker/Dockerfile's build stages; comments dropped, continuation lines joined."""
    lines: list[str] = []
    pending = ""
    for line in (DOCKER / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in filter(str.strip, lines):
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, ()))
        else:
            assert stages, f"{keyword} before the first FROM"
            stage = stages[-1]
            instructions = (*stage.instructions, Instruction(keyword, args))
            stages[-1] = Stage(stage.base, stage.name, instructions)
    return stages


def copies(stage: Stage) -> dict[str, str]:
    """The stage's `COPY source destination` pairs from the build context, by source."""
    pairs = {}
    for instruction in stage.all("COPY"):
        words = shlex.split(instruction.args)
        if any(word.startswith("--from=") for word in words):
            continue
        *sources, destination = [word for word in words if not word.startswith("--")]
        for source in sources:
            pairs[source] = destination
    return pairs


def shipped_config_path() -> str:
    """Where the image keeps docker/proxygate.toml."""
    return copies(dockerfile_stages()[-1])["docker/proxygate.toml"]


def load_shipped(env: Mapping[str, str]) -> Settings:
    return load_settings(DOCKER / "proxygate.toml", env=env)


# -- compose: the services ------------------------------------------------------------------------


def test_the_services_are_postgres_the_migration_the_gateways_and_the_balancer(
    services: dict[str, Any],
) -> None:
    assert set(services) == {"postgres", "migrate", "gateway", "lb"}


def test_postgres_is_the_official_image_with_a_healthcheck_and_a_volume(
    services: dict[str, Any],
) -> None:
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    test = postgres["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert test[1] == "pg_isready"
    env = environment(postgres)
    assert f"--username={env['POSTGRES_USER']}" in test
    assert f"--dbname={env['POSTGRES_DB']}" in test
    volume = postgres["volumes"][0].partition(":")
    assert volume[0] in compose()["volumes"]
    assert volume[2] == "/var/lib/postgresql/data"


def test_the_migration_runs_once_before_any_gateway(services: dict[str, Any]) -> None:
    migrate, gateway = services["migrate"], services["gateway"]
    assert migrate["command"] == ["db", "upgrade"]
    # Same image as the gateways: the migrations it applies are the ones they expect.
    assert migrate["image"] == gateway["image"]
    assert migrate["build"] == gateway["build"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert gateway["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert migrate["restart"] == "no"
    # A one-shot container never becomes healthy: the image's health check is off for it.
    assert migrate["healthcheck"] == {"disable": True}


def test_two_gateway_replicas_are_built_from_the_dockerfile(services: dict[str, Any]) -> None:
    gateway = services["gateway"]
    assert gateway["deploy"]["replicas"] == 2
    build = gateway["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    # Replicas cannot share a host port or a container name.
    assert "ports" not in gateway
    assert "container_name" not in gateway
    assert "healthcheck" not in gateway, "the gateways keep the image's health check"
    # The draining gateway gets its drain_timeout before Docker kills it.
    settings = load_shipped(environment(gateway))
    grace = gateway["stop_grace_period"]
    assert grace.endswith("s")
    assert float(grace[:-1]) > settings.gateway.drain_timeout


def test_one_port_is_published_by_the_balancer_in_front_of_the_replicas(
    services: dict[str, Any],
) -> None:
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert list(published) == ["lb"]
    (port,) = published["lb"]
    listen = load_shipped(environment(services["gateway"])).gateway.listen
    assert listen == (ListenAddress("0.0.0.0", port["target"]),)
    assert port["published"] == str(port["target"])
    assert port["host_ip"] == "127.0.0.1", "loopback unless the user opens it up"
    assert port["protocol"] == "tcp"
    lb = services["lb"]
    assert lb["depends_on"]["gateway"]["condition"] == "service_healthy"
    config = {}
    for volume in lb["volumes"]:
        source, destination, *_ = volume.split(":")
        config[destination] = (COMPOSE.parent / source).resolve()
    haproxy = config["/usr/local/etc/haproxy/haproxy.cfg"].read_text(encoding="utf-8")
    lines = [line.split("#")[0].split() for line in haproxy.splitlines()]
    assert ["mode", "tcp"] in lines
    assert ["bind", f":{port['target']}"] in lines
    # Every replica is found by the service's DNS name, at the port the gateways listen on.
    (template,) = [line for line in lines if line[:1] == ["server-template"]]
    assert int(template[2]) >= services["gateway"]["deploy"]["replicas"]
    assert template[3] == f"gateway:{listen[0].port}"


def test_published_port_and_address_follow_their_variables() -> None:
    variables = {**VARIABLES, "PROXYGATE_HOST_IP": "0.0.0.0", "PROXYGATE_PORT": "3128"}
    (port,) = compose(variables)["services"]["lb"]["ports"]
    assert (port["host_ip"], port["published"]) == ("0.0.0.0", "3128")


# -- compose: what the gateways are given ---------------------------------------------------------


def test_the_storage_url_points_at_the_postgres_service(services: dict[str, Any]) -> None:
    postgres = environment(services["postgres"])
    for name in ("migrate", "gateway"):
        url = urlsplit(environment(services[name])["PROXYGATE_STORAGE__URL"])
        assert url.scheme == "postgresql", name
        assert url.hostname == "postgres", name
        assert url.port == 5432, name
        assert url.username == postgres["POSTGRES_USER"], name
        assert url.password == postgres["POSTGRES_PASSWORD"] == VARIABLES["POSTGRES_PASSWORD"]
        assert url.path == f"/{postgres['POSTGRES_DB']}", name


@pytest.mark.parametrize("name", ["migrate", "gateway"])
def test_every_variable_is_a_real_setting(services: dict[str, Any], name: str) -> None:
    env = environment(services[name])
    for variable in env:
        assert variable.startswith(ENV_PREFIX), variable
        # The loader ignores PROXYGATE_ names without "__": a typo would pass silently.
        section, sep, key = variable[len(ENV_PREFIX) :].lower().partition("__")
        assert sep, f"{variable} is not PROXYGATE_<SECTION>__<KEY>: the gateway ignores it"
        if section == "pools":
            key = key.rpartition("__")[2]
        assert key in KEYS[section], variable


def test_the_gateways_load_their_environment_through_the_config_loader(
    services: dict[str, Any],
) -> None:
    env = environment(services["gateway"])
    settings = load_shipped(env)
    assert settings.storage.url == env["PROXYGATE_STORAGE__URL"]
    assert dict(settings.gateway.users) == {"alice": "alice-pw", "bob": "bob-pw"}
    assert [str(u.endpoint) for u in settings.pool("default").to_upstreams()] == ["direct://"]
    # The migration is given its storage URL alone; `db upgrade` reads no --config.
    migrate = environment(services["migrate"])
    assert load_settings(None, env=migrate).storage.url == env["PROXYGATE_STORAGE__URL"]

    variables = {**VARIABLES, "PROXYGATE_POOLS__DEFAULT__PROXIES": "socks5://u:p@203.0.113.7:1080"}
    env = environment(compose(variables)["services"]["gateway"])
    (upstream,) = load_shipped(env).pool("default").to_upstreams()
    assert upstream.endpoint.scheme == "socks5"


@pytest.mark.parametrize("missing", REQUIRED)
def test_credentials_are_required_and_never_written_in(missing: str) -> None:
    with pytest.raises(Unset, match=missing):
        compose({name: value for name, value in VARIABLES.items() if name != missing})
    with pytest.raises(Unset, match=missing):
        compose({**VARIABLES, missing: ""})
    # The example env file names them, with no value to copy blindly.
    example = (DOCKER / ".env.example").read_text(encoding="utf-8")
    assert re.search(rf"^{missing}=$", example, re.MULTILINE)


def test_the_shipped_config_holds_no_secret_and_refuses_to_start_without_users() -> None:
    raw = tomllib.loads((DOCKER / "proxygate.toml").read_text(encoding="utf-8"))
    assert "users" not in raw["gateway"]
    assert "token" not in raw["admin"]
    assert urlsplit(raw["storage"]["url"]).password is None
    with pytest.raises(ConfigError, match=r"gateway\.users is empty"):
        load_shipped({})


# -- the Dockerfile -------------------------------------------------------------------------------


def test_the_image_is_built_in_stages_on_python_slim() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    assert {stage.base for stage in stages} == {"python:3.11-slim"}
    build, final = stages[0], stages[-1]
    assert build.name
    copied = [i.args for i in final.all("COPY") if i.args.startswith(f"--from={build.name} ")]
    assert copied, "the runtime stage copies the built environment"
    # Nothing is installed in the runtime stage: no package manager, no compiler.
    for instruction in final.all("RUN"):
        assert not re.search(r"apt-get|apk|gcc|build-essential|pip", instruction.args)


def test_the_image_runs_proxygate_as_a_user_with_the_shipped_config() -> None:
    final = dockerfile_stages()[-1]
    user = final.last("USER").args.split(":")[0]
    assert user not in ("root", "0")
    assert final.last("ENTRYPOINT").exec_form() == ["proxygate"]
    assert final.last("CMD").exec_form() == ["run", "--config", shipped_config_path()]
    settings = load_shipped({"PROXYGATE_GATEWAY__USERS": VARIABLES["PROXYGATE_GATEWAY__USERS"]})
    exposed = {int(port.split("/")[0]) for i in final.all("EXPOSE") for port in i.args.split()}
    assert {address.port for address in settings.gateway.listen} <= exposed
    assert settings.storage.url == "memory://", "alone, the image needs no database"


def test_the_healthcheck_runs_the_probe_on_the_shipped_config() -> None:
    final = dockerfile_stages()[-1]
    healthcheck = final.last("HEALTHCHECK").args
    options, _, command = healthcheck.partition("CMD ")
    probe = json.loads(command)
    python, script, config = probe
    assert python == "/opt/proxygate/bin/python"
    assert copies(final)["docker/healthcheck.py"] == script
    assert config == shipped_config_path()
    assert "--timeout=" in options
    assert "--interval=" in options


# -- .dockerignore --------------------------------------------------------------------------------


def _ignore_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex (Go's filepath.Match plus `**`)."""
    text = pattern.strip("/")
    out = ""
    index = 0
    while index < len(text):
        if text.startswith("**/", index):
            out, index = out + "(?:.*/)?", index + 3
        elif text.startswith("**", index):
            out, index = out + ".*", index + 2
        elif text[index] == "*":
            out, index = out + "[^/]*", index + 1
        elif text[index] == "?":
            out, index = out + "[^/]", index + 1
        elif text[index] == "[":
            end = text.index("]", index)
            out, index = out + text[index : end + 1], end + 1
        else:
            out, index = out + re.escape(text[index]), index + 1
    return re.compile(out)


def in_context(path: str, patterns: list[str]) -> bool:
    """Whether `path` is sent to the builder: the last pattern matching it or a parent wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    kept = True
    for line in patterns:
        negated = line.startswith("!")
        regex = _ignore_pattern(line.removeprefix("!"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            kept = negated
    return kept


def source_files() -> Iterator[str]:
    """Every file the package is built from."""
    yield from ("pyproject.toml", "setup.py", "README.md")
    for package in ("core", "gateway", "config", "loadtest"):
        for path in sorted((ROOT / package).rglob("*")):
            parts = path.relative_to(ROOT).parts
            hidden = any(p == "__pycache__" or p.startswith(".") for p in parts)
            if path.is_file() and not hidden and path.suffix != ".so":  # .so: a build's output
                yield path.relative_to(ROOT).as_posix()


def test_the_build_context_holds_the_sources_and_nothing_else() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    needed = [*source_files(), *copies(dockerfile_stages()[-1])]
    assert "core/storage/sql/migrations/script.py.mako" in needed
    missing = [path for path in needed if not in_context(path, patterns)]
    assert not missing
    for path in (
        ".git/config",
        ".venv/bin/python",
        "tests/test_docker.py",
        "docker/.env",
        "proxygate.egg-info/PKG-INFO",
        "core/__pycache__/models.cpython-311.pyc",
        "loadtest/results/run.json",
        "loadtest/.bench-venv/bin/python",
        "gateway/channel.cpython-311-x86_64-linux-gnu.so",
        "proxygate__mypyc.cpython-311-x86_64-linux-gnu.so",
    ):
        assert not in_context(path, patterns), path


# -- the health probe -----------------------------------------------------------------------------


def healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docker_healthcheck", DOCKER / "healthcheck.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def start_admin(token: str | None) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(build_admin_app(LeaseManager(MemoryStorage()), token=token))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port: int = runner.addresses[0][1]
    return runner, port


async def probe(env: Mapping[str, str]) -> int:
    """The probe's exit status against docker/proxygate.toml and `env`."""
    module = healthcheck_module()
    env = {"PROXYGATE_GATEWAY__USERS": VARIABLES["PROXYGATE_GATEWAY__USERS"], **env}
    status: int = await asyncio.to_thread(module.main, [str(DOCKER / "proxygate.toml")], env)
    return status


async def test_the_probe_asks_the_admin_api_with_its_token() -> None:
    runner, port = await start_admin(token="t0ken")
    try:
        listen = {"PROXYGATE_ADMIN__LISTEN": f"0.0.0.0:{port}"}
        assert await probe({**listen, "PROXYGATE_ADMIN__TOKEN": "t0ken"}) == 0
        assert await probe({**listen, "PROXYGATE_ADMIN__TOKEN": "wrong"}) == 1
        assert await probe(listen) == 1
    finally:
        await runner.cleanup()


async def test_the_probe_fails_when_nothing_answers() -> None:
    assert await probe({"PROXYGATE_ADMIN__LISTEN": f"127.0.0.1:{closed_port()}"}) == 1


async def test_without_the_admin_api_the_probe_connects_to_the_proxy_port() -> None:
    server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        env = {"PROXYGATE_ADMIN__LISTEN": "", "PROXYGATE_GATEWAY__LISTEN": f"0.0.0.0:{port}"}
        assert await probe(env) == 0
    finally:
        server.close()
        await server.wait_closed()
    assert await probe(env) == 1
