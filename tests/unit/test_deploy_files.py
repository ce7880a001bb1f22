"""Static checks of the deployment files: Dockerfile, .dockerignore, docker-compose.yml, .env, deploy/k8s.

Nothing here needs a Docker engine or a cluster, but every check is a real one:

* docker-compose.yml is validated against the official Compose Specification JSON schema (compose-spec.json,
  vendored with its licence by the ``check-jsonschema`` package; read here from the installed distribution and
  checked with ``jsonschema``), before and after ``${VAR:-default}`` interpolation with the values of ``.env``;
* the Kubernetes manifests are rendered by ``kubectl kustomize`` (offline) and each object is validated in strict
  mode (unknown fields are errors) against the Kubernetes API's JSON schemas shipped by ``kubernetes-validate``;
* the services' entry points named in compose and Kubernetes are checked against the real source tree, the
  ports and grace periods against the real settings (config/klines.toml), and the environment that compose
  and Kubernetes give each service is loaded through the real settings loader;
* which containers get the ClickHouse login is decided from what they run (the modules a service's entry point
  imports, the source of a ``klines`` command), and the rendered NetworkPolicies are evaluated (a small model of
  their semantics) for what each pod may reach and who may reach it;
* compose's hardening (read-only root, tmpfs, capabilities, memory) is compared with the Kubernetes pods'.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import inspect
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.shared.settings import ConfigError, Settings, load_settings

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOTENV_FILE = REPO / ".env"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
K8S_DIR = REPO / "deploy" / "k8s"
CONFIG_FILE = REPO / "config" / "klines.toml"

# The long-running services and the settings key of the port their /healthz and /readyz answer on.
SERVICE_PORTS = {
    "ingest": lambda s: s.service.ingest_http_port,
    "aggregator": lambda s: s.aggregator.http_port,
    "finalized_writer": lambda s: s.service.writers_http_port,
    "snapshot_writer": lambda s: s.service.writers_http_port,
    "gateway": lambda s: s.gateway.http_port,
}
KAFKA_IMAGE = "apache/kafka:4.1.1"
# Kubernetes versions whose API schemas the manifests must satisfy: an old supported one and the newest known.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(CONFIG_FILE)


def _duration_s(text: str) -> float:
    """Compose durations: ``15s``, ``1m30s``, ``500ms``."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a compose duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


# --- .env and interpolation -----------------------------------------------------------------------------------


def parse_dotenv(path: Path) -> dict[str, str]:
    """The subset of compose's .env syntax this repository uses: KEY=value, KEY='literal', KEY="text", comments."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path.name}:{number}: not KEY=VALUE"
        if value[:1] in ("'", '"'):
            end = value.find(value[0], 1)
            assert end > 0, f"{path.name}:{number}: unterminated quote"
            value = value[1:end]
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()
        values[key] = value
    return values


_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def compose_variables(document: dict[str, Any]) -> dict[str, str | None]:
    """Every ``${VAR}`` / ``${VAR:-default}`` in a compose document, with its default (None if it has none)."""
    found: dict[str, str | None] = {}
    for match in (m for text in _strings(document) for m in _VARIABLE.finditer(text)):
        name = match["name"] or match["bare"]
        if name is None:
            continue
        assert match["op"] in (None, ":-"), f"${{{name}{match['op']}...}}: only ${{VAR}} and ${{VAR:-default}} used"
        assert match["op"] or not match["arg"], f"malformed variable {match[0]!r}"
        found[name] = match["arg"] if match["op"] else None
    return found


def interpolate(value: Any, env: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name = match["name"] or match["bare"]
        if match["op"] == ":-" and not env.get(name):
            return match["arg"]
        return env[name]

    return _VARIABLE.sub(substitute, value)


@pytest.fixture(scope="module")
def dotenv() -> dict[str, str]:
    return parse_dotenv(DOTENV_FILE)


def _load_compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def compose(dotenv: dict[str, str]) -> dict[str, Any]:
    """docker-compose.yml as compose runs it: YAML anchors merged, variables taken from .env."""
    return interpolate(_load_compose(), dotenv)  # type: ignore[no-any-return]


def _klines_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the klines image (the one service with ``build:`` builds it), init included."""
    (image,) = [svc["image"] for svc in compose["services"].values() if "build" in svc]
    return {name: svc for name, svc in compose["services"].items() if svc.get("image") == image}


def _ingest_shards(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The compose services that run ingest: one per shard of the symbol set (``ingest``, ``ingest-1``, ...)."""
    return {
        name: svc
        for name, svc in _klines_services(compose).items()
        if svc.get("command") == ["python", "-m", "services.ingest"]
    }


def _modules_named_in_compose() -> list[str]:
    modules = set()
    for service in _load_compose()["services"].values():
        command = service.get("command") or []
        if command[:2] == ["python", "-m"]:
            modules.add(command[2])
    return sorted(modules)


# --- entry points ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", _modules_named_in_compose())
def test_entry_point_exists_in_the_source_tree(module: str) -> None:
    """Each ``python -m services.<name>`` that compose or Kubernetes runs is a package with a __main__.py."""
    assert module.startswith("services."), module
    package_dir = REPO / Path(*module.split("."))
    assert (package_dir / "__main__.py").is_file(), f"{module}: {package_dir.relative_to(REPO)}/__main__.py missing"
    assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{module}.__main__ is not importable"


def test_klines_command_is_the_cli_and_prints_help() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^klines = "services\.cli:main"$', pyproject, re.M), "console script klines -> services.cli"
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "usage: klines" in result.stdout
    for command in ("schema", "topics"):
        assert command in result.stdout


# --- Dockerfile and .dockerignore -----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return [(first.upper(), rest.strip()) for first, _, rest in (s.strip().partition(" ") for s in logical)]


def _dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
        out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return re.compile(out + r"\Z")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _glob_regex(pattern.removeprefix("!"))
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def test_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    instructions = dockerfile_instructions()
    args = {}
    for name, rest in instructions:
        if name == "FROM":
            break
        if name == "ARG" and "=" in rest:
            key, _, default = rest.partition("=")
            args[key] = default
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], rest.split()[0]) for n, rest in instructions if n == "FROM"]
    assert len(bases) >= 2, "multi-stage: a build stage and a runtime stage"
    for base in bases:
        assert base.startswith("python:3.11-slim"), base


def test_dockerfile_installs_pinned_and_runs_as_non_root() -> None:
    instructions = dockerfile_instructions()
    runs = " ".join(rest for name, rest in instructions if name == "RUN")
    assert re.search(r"pip install (?:\S+ )*-c constraints\.txt", runs), "dependencies pinned by constraints.txt"
    assert "pip install --no-deps" in runs, "the project itself must not re-resolve dependencies"
    users = [rest for name, rest in instructions if name == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"USER {users[-1]}: numeric, so Kubernetes can verify runAsNonRoot"
    cmd = [rest for name, rest in instructions if name == "CMD"]
    assert cmd and json.loads(cmd[-1]) == ["klines", "--help"], "the default command prints the help"
    assert not [rest for name, rest in instructions if name == "ENTRYPOINT"], "compose/k8s set the command"


def test_dockerfile_copies_only_what_the_context_contains() -> None:
    patterns = _dockerignore_patterns()
    for name, rest in dockerfile_instructions():
        if name != "COPY" or rest.startswith("--from"):
            continue
        sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    for private in (".venv", ".state", ".git", "tests", "benchmarks", ".env", "services/__pycache__"):
        assert dockerignored(private, patterns), f"{private} must stay out of the build context"
    assert not dockerignored("services/shared/settings.py", patterns)


# --- docker-compose.yml ---------------------------------------------------------------------------------------


def compose_spec_validator() -> jsonschema.protocols.Validator:
    """The Compose Specification's JSON schema as vendored by check-jsonschema (read without importing it)."""
    distribution = importlib.metadata.distribution("check-jsonschema")
    schema_path = Path(str(distribution.locate_file("check_jsonschema/builtin_schemas/vendor/compose-spec.json")))
    licence = schema_path.parent / "licenses" / "LICENSE.compose-spec"
    assert schema_path.is_file() and licence.is_file(), f"compose-spec schema not found in {schema_path.parent}"
    schema = json.loads(schema_path.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)  # type: ignore[no-any-return]


def _schema_errors(validator: jsonschema.protocols.Validator, document: Any) -> list[str]:
    errors = []
    for error in validator.iter_errors(document):
        best = jsonschema.exceptions.best_match([error])
        where = "/".join(str(p) for p in best.absolute_path) or "(root)"
        errors.append(f"{where}: {best.message}")
    return errors


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    validator = compose_spec_validator()
    assert _schema_errors(validator, _load_compose()) == []
    assert _schema_errors(validator, compose) == [], "after interpolation with .env"


def test_compose_spec_validator_rejects_mistakes() -> None:
    """The validator is strict enough to catch a misspelt key and a wrong depends_on condition."""
    validator = compose_spec_validator()
    broken = _load_compose()
    broken["services"]["aggregator"]["stop_grace_periode"] = "15s"
    broken["services"]["ingest"]["depends_on"]["init"]["condition"] = "service_done"
    errors = _schema_errors(validator, broken)
    assert any("stop_grace_periode" in e for e in errors), errors
    assert any(e.startswith("services/ingest") for e in errors), errors


def test_dotenv_documents_every_compose_variable(dotenv: dict[str, str]) -> None:
    """Each knob is in .env, and .env's value is compose's own default: same behaviour with or without .env."""
    variables = compose_variables(_load_compose())
    assert set(variables) - set(dotenv) == set(), "compose variables missing from .env"
    assert set(dotenv) - set(variables) == set(), ".env variables that compose never uses"
    for name, default in variables.items():
        assert default is not None, f"${{{name}}} needs a default (${{{name}:-...}})"
        assert dotenv[name] == default, f"{name}: .env says {dotenv[name]!r}, compose defaults to {default!r}"


def test_compose_runs_every_service_from_one_image(compose: dict[str, Any]) -> None:
    """One build (init's), reused by every other klines service: parallel builds of one tag can collide."""
    services = _klines_services(compose)
    assert set(SERVICE_PORTS) | {"init", "replay"} | set(_ingest_shards(compose)) == set(services)
    builders = [name for name, svc in compose["services"].items() if "build" in svc]
    assert builders == ["init"], "exactly one service builds the klines image: init, which runs first"
    assert services["init"]["build"]["context"] == "."
    for name, svc in services.items():
        if name != "init":
            assert "build" not in svc and svc.get("pull_policy") == "never", f"{name}: uses init's local image"
        if name in SERVICE_PORTS:
            assert svc["command"] == ["python", "-m", f"services.{name}"], name
        elif name not in ("init", "replay"):
            assert name in _ingest_shards(compose), f"{name}: an unexpected service"
    replay = services["replay"]
    assert replay["command"][:3] == ["python", "-m", "services.replay"]
    assert replay["profiles"] == ["offline"]


def test_compose_infrastructure_is_pinned_and_persistent(compose: dict[str, Any]) -> None:
    kafka, clickhouse = compose["services"]["kafka"], compose["services"]["clickhouse"]
    assert kafka["image"] == KAFKA_IMAGE
    assert re.fullmatch(r"clickhouse/clickhouse-server:\d+\.\d+(\.\d+)*", clickhouse["image"]), clickhouse["image"]
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller", "KRaft, one node"
    assert "PLAINTEXT://kafka:9092" in kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    for svc, path in ((kafka, "/var/lib/kafka/data"), (clickhouse, "/var/lib/clickhouse")):
        volume, _, target = svc["volumes"][0].partition(":")
        assert target == path and volume in compose["volumes"], f"named volume on {path}"


def test_every_compose_service_has_a_healthcheck_and_a_grace_period(
    compose: dict[str, Any], settings: Settings
) -> None:
    for name, svc in compose["services"].items():
        if name == "init":
            assert svc["restart"] == "no" and "healthcheck" not in svc, "init is a one-shot"
            continue
        check = svc.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
        grace = _duration_s(svc.get("stop_grace_period", "10s"))
        assert grace > settings.service.shutdown_grace_s, f"{name}: stop_grace_period {grace}s"
    for name, port_of in SERVICE_PORTS.items():
        # The probe asks the liveness thread's own port (a wedged loop answers 503 "wedged" there instead of
        # timing out), which is not the service's HTTP port.
        probe = " ".join(compose["services"][name]["healthcheck"]["test"])
        liveness_port = _compose_environment(compose, name).get("KLINES_SERVICE__LIVENESS_PORT")
        assert liveness_port and liveness_port != str(port_of(settings)), f"{name}: liveness port {liveness_port}"
        assert f"http://127.0.0.1:{liveness_port}/healthz" in probe, f"{name}: probes {probe}"


def test_compose_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    init = services["init"]
    assert init["depends_on"] == {
        "kafka": {"condition": "service_healthy"},
        "clickhouse": {"condition": "service_healthy"},
    }
    script = " ".join(init["command"])
    assert script.index("klines schema apply") < script.index("klines topics create"), script
    for name in SERVICE_PORTS:
        assert services[name]["depends_on"]["init"] == {"condition": "service_completed_successfully"}, name
    assert services["ingest"]["depends_on"]["replay"] == {"condition": "service_healthy", "required": False}


def _compose_environment(compose: dict[str, Any], name: str) -> dict[str, str]:
    environment = compose["services"][name]["environment"]
    assert isinstance(environment, dict), f"{name}: environment as a mapping"
    return {key: str(value) for key, value in environment.items()}


def test_compose_services_read_the_mounted_config(compose: dict[str, Any]) -> None:
    for name, svc in _klines_services(compose).items():
        env = _compose_environment(compose, name)
        assert f"./config/klines.toml:{env['KLINES_CONFIG']}:ro" in svc["volumes"], f"{name}: config mounted :ro"
        assert env["KAFKA_BOOTSTRAP"] == "kafka:9092", name
        assert env["CLICKHOUSE_DSN"] == "http://clickhouse:8123", name
        assert env["KLINES_SERVICE__HTTP_HOST"] == "0.0.0.0", name


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    import os

    for key in list(os.environ):
        if key.startswith("KLINES_") or key in ("KAFKA_BOOTSTRAP", "CLICKHOUSE_DSN"):
            monkeypatch.delenv(key)
    yield monkeypatch


def _settings_with(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in env.items():
        if key != "KLINES_CONFIG":  # the file is given explicitly: the repository's copy of the mounted one
            monkeypatch.setenv(key, value)
    return load_settings(CONFIG_FILE)


@pytest.mark.parametrize("name", [*SERVICE_PORTS, "init"])
def test_compose_environment_is_valid_configuration(
    compose: dict[str, Any], name: str, clean_environment: pytest.MonkeyPatch
) -> None:
    """The settings loader accepts what compose passes (JSON lists, known keys only) and applies it."""
    env = _compose_environment(compose, name)
    loaded = _settings_with(env, clean_environment)
    assert loaded.kafka.bootstrap == "kafka:9092"
    assert loaded.clickhouse.dsn == "http://clickhouse:8123"
    assert loaded.service.http_host == "0.0.0.0"
    assert list(loaded.market.symbols) == json.loads(env["KLINES_MARKET__SYMBOLS"])


# --- Kubernetes -----------------------------------------------------------------------------------------------


def render(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        why = "kubectl (with its built-in kustomize) is not installed"
        if os.environ.get("CI"):
            pytest.fail(why)  # every machine image here has kubectl: under CI a missing one is a failure
        pytest.skip(why)
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return render(K8S_DIR)


def _of_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in manifests if doc["kind"] == kind}


def _module_of(container: dict[str, Any]) -> str:
    command = container["command"]
    assert command[:2] == ["python", "-m"], command
    return str(command[2])


def _deployments_by_service(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The long-running klines workloads (Deployments, and the aggregator's StatefulSet) by service name."""
    by_service = {}
    for kind in ("Deployment", "StatefulSet"):
        for workload in _of_kind(manifests, kind).values():
            (container, *_) = workload["spec"]["template"]["spec"]["containers"]
            if container.get("command", [])[:2] == ["python", "-m"]:
                by_service[_module_of(container).removeprefix("services.")] = workload
    return by_service


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(manifests: list[dict[str, Any]], version: str) -> None:
    problems = []
    for doc in manifests:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {str(exc).splitlines()[0]}")
    assert problems == []


def test_kubernetes_validation_rejects_mistakes(manifests: list[dict[str, Any]]) -> None:
    deployment = json.loads(json.dumps(_deployments_by_service(manifests)["aggregator"]))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbe"]["httpGett"] = container["livenessProbe"].pop("httpGet")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_kubernetes_runs_the_same_entry_points_as_compose(manifests: list[dict[str, Any]]) -> None:
    assert set(_deployments_by_service(manifests)) == set(SERVICE_PORTS)
    named = {f"services.{name}" for name in _deployments_by_service(manifests)}
    assert named <= set(_modules_named_in_compose()), "test_entry_point_exists_in_the_source_tree checks these"


POD_INDEX_FIELD = "metadata.labels['apps.kubernetes.io/pod-index']"


def _resolved_env(container: dict[str, Any], manifests: list[dict[str, Any]], *, ordinal: int = 0) -> dict[str, str]:
    """The container's environment as the kubelet builds it: ConfigMaps, values with ``$(VAR)`` expanded from
    the variables before them, Secrets; a field of the pod as ``<fieldPath>``, except a StatefulSet pod's
    ordinal label, which is ``ordinal``."""
    config_maps = _of_kind(manifests, "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    secrets = _of_kind(manifests, "Secret")
    for item in container.get("env", []):
        if "value" in item:
            # Kubernetes expands $(NAME) of a variable defined before; anything else stays as written.
            env[item["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), item["value"])
        elif "fieldRef" in item["valueFrom"]:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            env[item["name"]] = str(ordinal) if path == POD_INDEX_FIELD else f"<{path}>"  # the pod's own field
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            secret = secrets[ref["name"]]
            value = secret.get("stringData", {}).get(ref["key"])
            if value is None:
                import base64

                value = base64.b64decode(secret["data"][ref["key"]]).decode()
            env[item["name"]] = value
    return env


@pytest.mark.parametrize("service", list(SERVICE_PORTS))
def test_deployment_probes_grace_and_security(
    manifests: list[dict[str, Any]], settings: Settings, service: str
) -> None:
    deployment = _deployments_by_service(manifests)[service]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port = SERVICE_PORTS[service](settings)
    assert [p["containerPort"] for p in container["ports"] if p["name"] == "http"] == [port]
    http = container["readinessProbe"]["httpGet"]
    assert http["path"] == "/readyz" and http["port"] in ("http", port), f"readinessProbe: {http}"
    assert pod["terminationGracePeriodSeconds"] > settings.service.shutdown_grace_s
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]


@pytest.mark.parametrize("service", list(SERVICE_PORTS))
def test_liveness_probe_asks_the_liveness_thread_within_the_bounds(
    manifests: list[dict[str, Any]], service: str, clean_environment: pytest.MonkeyPatch
) -> None:
    """The liveness probe asks the thread that answers while the loop is blocked (services/shared/liveness.py), on
    the port the pod's settings give it, and its timing fits the bounds it judges by."""
    (container,) = _deployments_by_service(manifests)[service]["spec"]["template"]["spec"]["containers"]
    loaded = _settings_with(_resolved_env(container, manifests), clean_environment)
    assert loaded.service.liveness_port is not None, "KLINES_SERVICE__LIVENESS_PORT is not set for the pod"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe = container["livenessProbe"]
    http = probe["httpGet"]
    assert http["path"] == "/healthz" and ports.get(http["port"], http["port"]) == loaded.service.liveness_port, http
    assert loaded.service.liveness_port != ports["http"]
    # The thread answers in milliseconds: a probe that times out means even it could not run (the GIL held).
    assert probe.get("timeoutSeconds", 1) < loaded.service.liveness_loop_stall_s
    # A loop silent for the bound is seen by the next probe, and one late beat is not a restart.
    assert probe.get("periodSeconds", 10) <= loaded.service.liveness_loop_stall_s
    assert probe.get("failureThreshold", 3) >= 2


def _mebibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi)?", quantity).groups()  # type: ignore[union-attr]
    return float(number) * {"Ki": 1 / 1024, "Mi": 1.0, "Gi": 1024.0, None: 1 / 2**20}[unit]


def test_aggregator_memory_is_sized_for_the_target(manifests: list[dict[str, Any]]) -> None:
    """SPEC §7: <= 200 MB for 2,000 symbols x 7 intervals; the request is what the scheduler reserves."""
    (container,) = _deployments_by_service(manifests)["aggregator"]["spec"]["template"]["spec"]["containers"]
    request = _mebibytes(container["resources"]["requests"]["memory"])
    limit = _mebibytes(container["resources"]["limits"]["memory"])
    assert 200 <= request <= 320 and request < limit <= 1024, (request, limit)


@pytest.mark.parametrize("service", list(SERVICE_PORTS))
def test_deployment_environment_and_config(
    manifests: list[dict[str, Any]], service: str, clean_environment: pytest.MonkeyPatch
) -> None:
    pod = _deployments_by_service(manifests)[service]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _resolved_env(container, manifests)
    assert env["KLINES_SERVICE__HTTP_HOST"] == "0.0.0.0", "probes come from the kubelet, not localhost"
    config_dir = Path(env["KLINES_CONFIG"]).parent
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (config_mount,) = [m for m in mounts.values() if Path(m["mountPath"]) == config_dir]
    assert config_mount.get("readOnly") is True
    config_map = _of_kind(manifests, "ConfigMap")[volumes[config_mount["name"]]["configMap"]["name"]]
    assert Path(env["KLINES_CONFIG"]).name in config_map["data"]
    loaded = _settings_with(env, clean_environment)
    assert loaded.kafka.bootstrap == env["KAFKA_BOOTSTRAP"]
    assert loaded.clickhouse.dsn == env["CLICKHOUSE_DSN"]


def test_configmap_is_config_klines_toml(manifests: list[dict[str, Any]]) -> None:
    (config_map,) = [cm for cm in _of_kind(manifests, "ConfigMap").values() if "klines.toml" in cm["data"]]
    assert config_map["data"]["klines.toml"] == CONFIG_FILE.read_text(), (
        "deploy/k8s/base/klines.toml differs from config/klines.toml: cp config/klines.toml deploy/k8s/base/klines.toml"
    )


def test_every_deployment_has_a_service_and_a_disruption_budget(manifests: list[dict[str, Any]]) -> None:
    services = list(_of_kind(manifests, "Service").values())
    budgets = list(_of_kind(manifests, "PodDisruptionBudget").values())
    for name, deployment in _deployments_by_service(manifests).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]

        def selects(selector: dict[str, str], labels: dict[str, str] = labels) -> bool:
            return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

        assert any(selects(s["spec"].get("selector", {})) for s in services), f"{name}: no Service"
        matching = [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"])]
        assert len(matching) == 1, f"{name}: {len(matching)} PodDisruptionBudgets"
        assert matching[0]["spec"].get("maxUnavailable") == 1, "one pod at a time, and drains never blocked"


def test_init_job_applies_schema_then_creates_topics(manifests: list[dict[str, Any]]) -> None:
    (job,) = _of_kind(manifests, "Job").values()
    pod = job["spec"]["template"]["spec"]
    steps = [" ".join(c["command"]) for c in pod.get("initContainers", []) + pod["containers"]]
    assert steps == ["klines schema apply", "klines topics create"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_demo_infrastructure_matches_the_endpoints(manifests: list[dict[str, Any]]) -> None:
    stateful_sets = _of_kind(manifests, "StatefulSet")
    assert stateful_sets["kafka"]["spec"]["template"]["spec"]["containers"][0]["image"] == KAFKA_IMAGE
    assert stateful_sets["clickhouse"]["spec"]["template"]["spec"]["containers"][0]["image"].startswith(
        "clickhouse/clickhouse-server:"
    )
    env = next(cm["data"] for cm in _of_kind(manifests, "ConfigMap").values() if "KAFKA_BOOTSTRAP" in cm["data"])
    services = _of_kind(manifests, "Service")
    kafka_host, _, kafka_port = env["KAFKA_BOOTSTRAP"].partition(":")
    assert int(kafka_port) in [p["port"] for p in services[kafka_host]["spec"]["ports"]]
    clickhouse = re.fullmatch(r"http://([^:/]+):(\d+)", env["CLICKHOUSE_DSN"])
    assert clickhouse is not None
    assert int(clickhouse[2]) in [p["port"] for p in services[clickhouse[1]]["spec"]["ports"]]


def test_base_renders_without_infrastructure() -> None:
    """deploy/k8s/base alone: the services for an existing Kafka and ClickHouse (no StatefulSets, no Secret)."""
    documents = render(K8S_DIR / "base")
    kinds = {doc["kind"] for doc in documents}
    assert {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget", "ConfigMap", "Job"} <= kinds
    assert not kinds & {"Secret", "Namespace", "NetworkPolicy"}, "network policies: an opt-in component"
    assert set(_of_kind(documents, "StatefulSet")) == {"klines-aggregator", "klines-ingest"}, (
        "no Kafka or ClickHouse in base"
    )


# --- compose hardening ----------------------------------------------------------------------------------------


def _writable_paths_in_kubernetes(pod: dict[str, Any], container: dict[str, Any]) -> set[str]:
    """Where a read-only-root container may write: its emptyDir mounts."""
    empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    return {m["mountPath"] for m in container.get("volumeMounts", []) if m["name"] in empty_dirs}


def _compose_bytes(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kmg]?)b?", text.lower()).groups()  # type: ignore[union-attr]
    return int(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit]


@pytest.mark.parametrize("name", [*SERVICE_PORTS, "init", "replay"])
def test_compose_services_are_hardened_like_the_pods(
    compose: dict[str, Any], manifests: list[dict[str, Any]], name: str
) -> None:
    """Read-only root, tmpfs where the pod has an emptyDir, no capabilities, no new privileges, a memory limit."""
    svc = _klines_services(compose)[name]
    assert svc.get("read_only") is True, f"{name}: read_only"
    assert svc.get("cap_drop") == ["ALL"], f"{name}: cap_drop"
    assert "no-new-privileges:true" in svc.get("security_opt", []), f"{name}: no-new-privileges"
    assert "privileged" not in svc and "cap_add" not in svc, name
    tmpfs = {entry.partition(":")[0]: entry.partition(":")[2] for entry in svc.get("tmpfs", [])}
    for target, options in tmpfs.items():
        assert re.search(r"(^|,)size=\d+[kmg]?(,|$)", options), f"{name}: tmpfs {target} without a size"
    limit = _compose_bytes(str(svc.get("mem_limit", "0")))
    assert limit > 0, f"{name}: mem_limit"
    if name == "replay":  # no Kubernetes counterpart
        assert set(tmpfs) == {"/tmp", "/var/lib/klines"} and limit <= 2 * 2**30
        return
    if name == "init":
        pod = next(iter(_of_kind(manifests, "Job").values()))["spec"]["template"]["spec"]
        containers = pod.get("initContainers", []) + pod["containers"]
    else:
        pod = _deployments_by_service(manifests)[name]["spec"]["template"]["spec"]
        containers = pod["containers"]
    writable = set().union(*(_writable_paths_in_kubernetes(pod, c) for c in containers))
    assert set(tmpfs) == writable, f"{name}: compose tmpfs {sorted(tmpfs)}, Kubernetes emptyDir {sorted(writable)}"
    k8s_limit = max(_mebibytes(c["resources"]["limits"]["memory"]) for c in containers) * 2**20
    assert limit == k8s_limit, f"{name}: mem_limit {limit} bytes, Kubernetes limit {k8s_limit}"


# --- Kubernetes: ClickHouse credentials -----------------------------------------------------------------------

CREDENTIAL_ENV = ("KLINES_CLICKHOUSE__USERNAME", "KLINES_CLICKHOUSE__PASSWORD")


@functools.cache
def _modules_importing_clickhouse(modules: tuple[str, ...]) -> dict[str, bool]:
    """Whether importing each ``python -m <module>`` entry point loads the ClickHouse client.

    Each in a fresh interpreter (imports are what is measured), all at once.
    """
    probe = "import importlib, sys; importlib.import_module(sys.argv[1] + '.__main__'); "
    probe += "print('services.shared.clickhouse' in sys.modules)"
    running = {
        module: subprocess.Popen(
            [sys.executable, "-c", probe, module], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for module in modules
    }
    answers = {}
    for module, process in running.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"importing {module}: {err}"
        answers[module] = out.strip().splitlines()[-1] == "True"
    return answers


def _module_imports_clickhouse(module: str) -> bool:
    modules = tuple(sorted({f"services.{name}" for name in SERVICE_PORTS} | {module}))
    return _modules_importing_clickhouse(modules)[module]


def _cli_command_uses_clickhouse(argv: list[str]) -> bool:
    """Whether ``klines <argv>`` runs a command whose handler opens ClickHouse (read from its source)."""
    from services import cli

    args = cli.build_parser().parse_args(argv)
    return re.search(r"\bclickhouse\b", inspect.getsource(args.handler)) is not None


def talks_to_clickhouse(container: dict[str, Any]) -> bool:
    """Decided from what the container runs, against the source tree: a service or a ``klines`` command."""
    command = container.get("command", [])
    if command[:2] == ["python", "-m"]:
        return _module_imports_clickhouse(command[2])
    assert command[:1] == ["klines"], f"{container['name']}: unexpected command {command}"
    return _cli_command_uses_clickhouse(command[1:])


def _pod_templates(manifests: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in manifests:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]


def clickhouse_credential_problems(manifests: list[dict[str, Any]]) -> list[str]:
    """Containers of the klines image that talk to ClickHouse without the login, or get it without needing it."""
    problems = []
    for where, template in _pod_templates(manifests):
        spec = template["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            if not container["image"].split("/")[-1].startswith("klines"):
                continue  # Kafka, ClickHouse
            refs = {
                item["name"]: item.get("valueFrom", {}).get("secretKeyRef")
                for item in container.get("env", [])
                if item["name"] in CREDENTIAL_ENV
            }
            needs = talks_to_clickhouse(container)
            if needs and not (set(refs) == set(CREDENTIAL_ENV) and all(refs.values())):
                problems.append(f"{where}/{container['name']}: talks to ClickHouse, no login from a Secret")
            if not needs and refs:
                problems.append(f"{where}/{container['name']}: never talks to ClickHouse but gets its login")
    return problems


@pytest.mark.parametrize("directory", ["demo", "base"])
def test_every_clickhouse_client_gets_the_login(manifests: list[dict[str, Any]], directory: str) -> None:
    rendered = manifests if directory == "demo" else render(K8S_DIR / "base")
    assert clickhouse_credential_problems(rendered) == []


def test_clickhouse_clients_are_the_expected_ones(manifests: list[dict[str, Any]]) -> None:
    """The decision itself, against what the services are: the writers, the gateway's history, schema apply."""
    clients = {
        container["name"]
        for _, template in _pod_templates(manifests)
        for container in template["spec"].get("initContainers", []) + template["spec"]["containers"]
        if container["image"].startswith("klines") and talks_to_clickhouse(container)
    }
    assert clients == {"finalized-writer", "snapshot-writer", "gateway", "schema"}
    demo_env = _resolved_env(
        _deployments_by_service(manifests)["gateway"]["spec"]["template"]["spec"]["containers"][0], manifests
    )
    assert demo_env["KLINES_CLICKHOUSE__USERNAME"] and demo_env["KLINES_CLICKHOUSE__PASSWORD"]


def test_missing_clickhouse_login_is_caught(manifests: list[dict[str, Any]]) -> None:
    broken = json.loads(json.dumps(manifests))
    gateway = _deployments_by_service(broken)["gateway"]["spec"]["template"]["spec"]["containers"][0]
    gateway["env"] = [e for e in gateway.get("env", []) if e["name"] != "KLINES_CLICKHOUSE__PASSWORD"]
    assert clickhouse_credential_problems(broken) == [
        "Deployment/klines-gateway/gateway: talks to ClickHouse, no login from a Secret"
    ]


# --- Kubernetes: the aggregator's identity and the init Job per image -----------------------------------------


def test_aggregator_is_a_stateful_set_with_stable_member_ids(
    manifests: list[dict[str, Any]], settings: Settings
) -> None:
    """Static membership needs an id that survives restarts and rollouts: the StatefulSet's pod name."""
    workload = _deployments_by_service(manifests)["aggregator"]
    assert workload["kind"] == "StatefulSet"
    assert not any(
        _module_of(d["spec"]["template"]["spec"]["containers"][0]) == "services.aggregator"
        for d in _of_kind(manifests, "Deployment").values()
    )
    spec = workload["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    command = container["command"]
    assert "--instance-id" in command, command
    reference = re.fullmatch(r"\$\((\w+)\)", command[command.index("--instance-id") + 1])
    assert reference is not None, "the id comes from the pod's environment"
    (source,) = [e for e in container["env"] if e["name"] == reference[1]]
    field = source["valueFrom"]["fieldRef"]["fieldPath"]
    assert field in ("metadata.name", "metadata.labels['statefulset.kubernetes.io/pod-name']"), field
    headless = _of_kind(manifests, "Service")[spec["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in headless["spec"]["selector"].items())
    assert spec.get("podManagementPolicy") == "Parallel"
    assert spec.get("updateStrategy", {}).get("type", "RollingUpdate") == "RollingUpdate"
    assert pod["terminationGracePeriodSeconds"] > settings.service.shutdown_grace_s
    assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(container)


def _image_tag(image: str) -> str:
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag, f"{image}: no tag"
    return tag


def _init_job_name_and_tags(rendered: list[dict[str, Any]]) -> tuple[str, set[str]]:
    (job,) = _of_kind(rendered, "Job").values()
    pod = job["spec"]["template"]["spec"]
    return job["metadata"]["name"], {_image_tag(c["image"]) for c in pod.get("initContainers", []) + pod["containers"]}


def test_init_job_is_named_after_its_image(manifests: list[dict[str, Any]]) -> None:
    """A Job's template is immutable: a new image must be a new Job, so the name carries the image tag."""
    name, tags = _init_job_name_and_tags(manifests)
    (tag,) = tags
    assert name == f"klines-init-{tag}"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) and len(name) <= 63, f"{name}: not a valid name"


def test_init_job_name_follows_an_overlays_image(tmp_path: Path) -> None:
    """The recipe of deploy/README.md: base/ plus the demo's replacement, in an overlay that sets its own image."""
    demo = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S_DIR / "base", tmp_path)],
        "images": [{"name": "klines", "newName": "registry.example.com/klines", "newTag": "0.2.0-rc.1"}],
        "replacements": demo["replacements"],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    name, tags = _init_job_name_and_tags(render(tmp_path))
    assert tags == {"0.2.0-rc.1"} and name == "klines-init-0.2.0-rc.1"
    assert _init_job_name_and_tags(render(K8S_DIR / "base"))[0] == "klines-init", "base: the bare name"


# --- Kubernetes: network policies -----------------------------------------------------------------------------
#
# A small evaluator of NetworkPolicy semantics (networking.k8s.io/v1) over the rendered objects: a pod selected
# by a policy of a direction is isolated in that direction and may only do what some selecting policy allows;
# a connection needs the source's egress and the destination's ingress. ipBlocks match addresses outside the
# cluster only. The node (kubelet probes, port-forward) is never restricted, as in Kubernetes.


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A pod (namespace, labels, named container ports) or an address outside the cluster."""

    name: str
    namespace: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    ports: tuple[tuple[str, int], ...] = ()
    ip: str = ""

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


def _pod(name: str, namespace: str, labels: dict[str, str], ports: dict[str, int] | None = None) -> Endpoint:
    return Endpoint(name, namespace, tuple(sorted(labels.items())), tuple(sorted((ports or {}).items())))


def _rendered_pods(manifests: list[dict[str, Any]]) -> dict[str, Endpoint]:
    pods = {}
    for doc in manifests:
        if doc["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        template = doc["spec"]["template"]
        spec = template["spec"]
        ports = {
            p["name"]: p["containerPort"]
            for c in spec.get("initContainers", []) + spec["containers"]
            for p in c.get("ports", [])
            if "name" in p
        }
        name = doc["metadata"]["name"]
        pods[name] = _pod(name, doc["metadata"].get("namespace", "default"), template["metadata"]["labels"], ports)
    return pods


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


def _namespace_labels(namespace: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": namespace}  # set by Kubernetes on every namespace


def _peer_matches(peer: dict[str, Any], policy_namespace: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        if not other.ip:
            return False
        address = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        inside = address.version == ipaddress.ip_network(block["cidr"]).version and address in ipaddress.ip_network(
            block["cidr"]
        )
        return inside and not any(
            address.version == ipaddress.ip_network(e).version and address in ipaddress.ip_network(e)
            for e in block.get("except", [])
        )
    if other.ip:
        return False
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], _namespace_labels(other.namespace)):
            return False
    elif other.namespace != policy_namespace:
        return False
    return selector_matches(peer.get("podSelector", {}), other.label_map)


def _port_matches(ports: list[dict[str, Any]], port: int, protocol: str, destination: Endpoint) -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        wanted = entry.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, str):
            wanted = dict(destination.ports).get(wanted)
            if wanted is None:
                continue
        if wanted <= port <= entry.get("endPort", wanted):
            return True
    return False


def _policy_types(policy: dict[str, Any]) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def _policies_selecting(policies: list[dict[str, Any]], pod: Endpoint, direction: str) -> list[dict[str, Any]]:
    return [
        p
        for p in policies
        if p["metadata"].get("namespace", "default") == pod.namespace
        and direction in _policy_types(p)
        and selector_matches(p["spec"]["podSelector"], pod.label_map)
    ]


def _direction_allows(
    policies: list[dict[str, Any]], pod: Endpoint, other: Endpoint, port: int, protocol: str, direction: str
) -> bool:
    if pod.ip:
        return True  # outside the cluster: not ours to restrict
    selecting = _policies_selecting(policies, pod, direction)
    if not selecting:
        return True
    rules_key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    destination = other if direction == "Egress" else pod
    for policy in selecting:
        for rule in policy["spec"].get(rules_key, []):
            peers = rule.get(peers_key)
            peer_ok = not peers or any(
                _peer_matches(peer, policy["metadata"].get("namespace", "default"), other) for peer in peers
            )
            if peer_ok and _port_matches(rule.get("ports", []), port, protocol, destination):
                return True
    return False


def connection_allowed(
    policies: list[dict[str, Any]], source: Endpoint, destination: Endpoint, port: int | str, protocol: str = "TCP"
) -> bool:
    number = dict(destination.ports)[port] if isinstance(port, str) else port
    return _direction_allows(policies, source, destination, number, protocol, "Egress") and _direction_allows(
        policies, destination, source, number, protocol, "Ingress"
    )


class Cluster:
    """The demo's pods, the policies, and the world around them (DNS, monitoring, ingress, the exchange)."""

    def __init__(self, manifests: list[dict[str, Any]], settings: Settings) -> None:
        self.policies = list(_of_kind(manifests, "NetworkPolicy").values())
        self.pods = _rendered_pods(manifests)
        namespace = next(iter(_of_kind(manifests, "Namespace")))
        by_service = _deployments_by_service(manifests)
        self.service_pods = {service: self.pods[w["metadata"]["name"]] for service, w in by_service.items()}
        (job,) = _of_kind(manifests, "Job")
        self.service_pods["init"] = self.pods[job]
        env = next(cm["data"] for cm in _of_kind(manifests, "ConfigMap").values() if "KAFKA_BOOTSTRAP" in cm["data"])
        services = _of_kind(manifests, "Service")
        self.kafka = self._behind(services, env["KAFKA_BOOTSTRAP"])
        self.clickhouse = self._behind(services, re.sub(r"^https?://", "", env["CLICKHOUSE_DSN"]))
        self.dns = _pod("coredns", "kube-system", {"k8s-app": "kube-dns"}, {"dns": 53})
        self.prometheus = _pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"})
        self.ingress_controller = _pod("controller", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
        self.stranger = _pod("debug", namespace, {"run": "debug"})
        self.outsider = _pod("other-app", "default", {"app": "other"})
        exchange_ports = {urlsplit(url).port or 443 for url in (settings.market.ws_url, settings.market.rest_url)}
        self.exchange = [(Endpoint("exchange", ip="52.192.0.1"), port) for port in sorted(exchange_ports)]

    def _behind(self, services: dict[str, dict[str, Any]], host_port: str) -> tuple[Endpoint, int]:
        """The pod and container port that ``host:port`` (a Service of the demo) leads to."""
        host, _, port = host_port.partition(":")
        service = services[host]
        (pod,) = [
            p for p in self.pods.values() if selector_matches({"matchLabels": service["spec"]["selector"]}, p.label_map)
        ]
        (entry,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
        target = entry.get("targetPort", entry["port"])
        return pod, dict(pod.ports)[target] if isinstance(target, str) else target

    def allowed(self, source: Endpoint, destination: Endpoint, port: int | str, protocol: str = "TCP") -> bool:
        return connection_allowed(self.policies, source, destination, port, protocol)


# What each pod must reach (True) and must not (False).
EGRESS = {
    "ingest": {"kafka": True, "clickhouse": False, "exchange": True},
    "aggregator": {"kafka": True, "clickhouse": False, "exchange": False},
    "finalized_writer": {"kafka": True, "clickhouse": True, "exchange": False},
    "snapshot_writer": {"kafka": True, "clickhouse": True, "exchange": False},
    "gateway": {"kafka": True, "clickhouse": True, "exchange": False},
    "init": {"kafka": True, "clickhouse": True, "exchange": False},
}


@pytest.fixture(scope="module")
def cluster(manifests: list[dict[str, Any]], settings: Settings) -> Cluster:
    return Cluster(manifests, settings)


def test_network_policies_select_real_pods(manifests: list[dict[str, Any]], cluster: Cluster) -> None:
    """Each policy selects pods that exist, its in-namespace peers exist, and its named ports are real ports."""
    assert cluster.policies, "no NetworkPolicy rendered"
    pods = list(cluster.pods.values())
    for policy in cluster.policies:
        name, namespace = policy["metadata"]["name"], policy["metadata"]["namespace"]
        selected = [
            p for p in pods if p.namespace == namespace and selector_matches(policy["spec"]["podSelector"], p.label_map)
        ]
        assert selected, f"{name}: its podSelector matches no pod"
        for direction, peers_key in (("ingress", "from"), ("egress", "to")):
            for rule in policy["spec"].get(direction, []):
                targets = selected
                for peer in rule.get(peers_key, []):
                    if set(peer) == {"podSelector"}:
                        matched = [p for p in pods if _peer_matches(peer, namespace, p)]
                        assert matched, f"{name}: {direction} peer {peer} matches no pod"
                        if direction == "egress":
                            targets = matched
                for entry in rule.get("ports", []):
                    if isinstance(entry.get("port"), str):
                        assert all(entry["port"] in dict(p.ports) for p in targets), f"{name}: no port {entry['port']}"


def test_every_pod_is_isolated_both_ways(cluster: Cluster) -> None:
    for pod in cluster.pods.values():
        for direction in ("Ingress", "Egress"):
            assert _policies_selecting(cluster.policies, pod, direction), f"{pod.name}: not isolated for {direction}"
        assert not cluster.allowed(pod, cluster.outsider, 8080), f"{pod.name} reaches any pod"
        assert not cluster.allowed(pod, Endpoint("internal", ip="10.1.2.3"), 443), f"{pod.name} reaches 10.1.2.3"


@pytest.mark.parametrize("service", list(EGRESS))
def test_each_service_reaches_only_what_it_needs(cluster: Cluster, service: str) -> None:
    pod = cluster.service_pods[service]
    expected = EGRESS[service]
    assert cluster.allowed(pod, cluster.dns, 53, "UDP") and cluster.allowed(pod, cluster.dns, 53, "TCP"), "DNS"
    assert cluster.allowed(pod, *cluster.kafka) is expected["kafka"], "Kafka"
    assert cluster.allowed(pod, *cluster.clickhouse) is expected["clickhouse"], "ClickHouse"
    for exchange, port in cluster.exchange:
        assert cluster.allowed(pod, exchange, port) is expected["exchange"], f"the exchange on {port}"
    exchange = cluster.exchange[0][0]
    assert not cluster.allowed(pod, exchange, 80), "plain HTTP to the internet"
    assert not cluster.allowed(pod, Endpoint("metadata", ip="169.254.169.254"), 443), "cloud metadata"
    assert not cluster.allowed(pod, cluster.stranger, 8080), "another pod of the namespace"
    for other_service, other in cluster.service_pods.items():
        for port in dict(other.ports).values():
            assert not cluster.allowed(pod, other, port), f"{service} -> {other_service}:{port}"


@pytest.mark.parametrize("service", list(SERVICE_PORTS))
def test_only_monitoring_and_the_ingress_reach_the_services(cluster: Cluster, service: str) -> None:
    pod = cluster.service_pods[service]
    assert cluster.allowed(cluster.prometheus, pod, "http"), "Prometheus scrapes /metrics"
    assert cluster.allowed(cluster.ingress_controller, pod, "http") is (service == "gateway"), "the ingress"
    assert not cluster.allowed(cluster.stranger, pod, "http")
    assert not cluster.allowed(cluster.outsider, pod, "http")
    assert not cluster.allowed(cluster.prometheus, cluster.kafka[0], cluster.kafka[1])


def test_infrastructure_accepts_only_its_clients(cluster: Cluster) -> None:
    """The demo's Kafka and ClickHouse refuse other pods even if a client's own egress were open."""
    kafka, kafka_port = cluster.kafka
    clickhouse, clickhouse_port = cluster.clickhouse
    for service, pod in cluster.service_pods.items():
        assert _direction_allows(cluster.policies, kafka, pod, kafka_port, "TCP", "Ingress"), service
        wanted = EGRESS[service]["clickhouse"]
        assert _direction_allows(cluster.policies, clickhouse, pod, clickhouse_port, "TCP", "Ingress") is wanted, (
            service
        )
    for stranger in (cluster.stranger, cluster.outsider, cluster.prometheus):
        assert not _direction_allows(cluster.policies, kafka, stranger, kafka_port, "TCP", "Ingress")
        assert not _direction_allows(cluster.policies, clickhouse, stranger, clickhouse_port, "TCP", "Ingress")


def test_network_policy_checks_catch_mistakes(manifests: list[dict[str, Any]], settings: Settings) -> None:
    """Without the ClickHouse egress policy the gateway is cut off; with an allow-all one the aggregator is not."""
    without = [
        d for d in manifests if not (d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "klines-to-clickhouse")
    ]
    broken = Cluster(without, settings)
    assert not broken.allowed(broken.service_pods["gateway"], *broken.clickhouse)
    allow_all = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "allow-all", "namespace": "klines"},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]},
    }
    leaky = Cluster([*manifests, allow_all], settings)
    exchange, port = leaky.exchange[0]
    assert leaky.allowed(leaky.service_pods["aggregator"], exchange, port)


def test_the_readme_overlay_renders_as_described(tmp_path: Path) -> None:
    """deploy/README.md's overlay for your own Kafka and ClickHouse, rendered against this checkout."""
    readme = (REPO / "deploy" / "README.md").read_text()
    block = re.search(r"```yaml\n# my-overlay/kustomization.yaml\n(.*?)```", readme, re.S)
    assert block is not None, "the overlay example is gone from deploy/README.md"
    text = block[1].replace("../klines/deploy/k8s/", os.path.relpath(K8S_DIR, tmp_path) + "/")
    (tmp_path / "kustomization.yaml").write_text(text)
    rendered = render(tmp_path)
    for doc in rendered:
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
        assert doc["metadata"].get("namespace") == "market-data", doc["metadata"]["name"]
    name, tags = _init_job_name_and_tags(rendered)
    assert name == "klines-init-0.1.0" and tags == {"0.1.0"}
    assert clickhouse_credential_problems(rendered) == []
    policies = _of_kind(rendered, "NetworkPolicy")
    env = next(cm["data"] for cm in _of_kind(rendered, "ConfigMap").values() if "CLICKHOUSE_DSN" in cm["data"])
    clickhouse_port = urlsplit(env["CLICKHOUSE_DSN"]).port
    (rule,) = policies["klines-to-clickhouse"]["spec"]["egress"]
    assert [p["port"] for p in rule["ports"]] == [clickhouse_port], "the policy lets the DSN's port through"
    kafka_ports = {int(server.rpartition(":")[2]) for server in env["KAFKA_BOOTSTRAP"].split(",")}
    (rule,) = policies["klines-to-kafka"]["spec"]["egress"]
    assert kafka_ports <= {p["port"] for p in rule["ports"]}
    assert "namespaceSelector" in rule["to"][0]


# --- Kubernetes and compose: least-privilege ClickHouse logins ---------------------------------------------------


def _secret_refs(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Env name -> (Secret name without kustomize's content hash, key)."""
    return {
        item["name"]: (
            re.sub(r"-[a-z0-9]{10}$", "", item["valueFrom"]["secretKeyRef"]["name"]),
            item["valueFrom"]["secretKeyRef"]["key"],
        )
        for item in container.get("env", [])
        if "secretKeyRef" in item.get("valueFrom", {})
    }


def test_each_pod_gets_only_its_own_clickhouse_login(manifests: list[dict[str, Any]]) -> None:
    deployments = _deployments_by_service(manifests)
    gateway = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert _secret_refs(gateway) == {
        "KLINES_CLICKHOUSE__USERNAME": ("klines-clickhouse-reader", "username"),
        "KLINES_CLICKHOUSE__PASSWORD": ("klines-clickhouse-reader", "password"),
    }
    resolved = _resolved_env(gateway, manifests)
    assert resolved["KLINES_CLICKHOUSE__USERNAME"] == "klines_reader"
    assert not any("WRITER" in key for key in resolved), "the gateway never sees the writer's login"
    for writer in ("finalized_writer", "snapshot_writer"):
        container = deployments[writer]["spec"]["template"]["spec"]["containers"][0]
        assert {secret for secret, _ in _secret_refs(container).values()} == {"klines-clickhouse-writer"}, writer
        assert _resolved_env(container, manifests)["KLINES_CLICKHOUSE__USERNAME"] == "klines_writer"
    for service in ("ingest", "aggregator"):
        container = deployments[service]["spec"]["template"]["spec"]["containers"][0]
        assert _secret_refs(container) == {}, service
    job = next(doc for doc in manifests if doc["kind"] == "Job")
    schema = job["spec"]["template"]["spec"]["initContainers"][0]
    refs = _secret_refs(schema)
    assert refs["KLINES_CLICKHOUSE__USERNAME"] == ("klines-clickhouse", "username")  # the admin
    assert refs["KLINES_CLICKHOUSE__READER_PASSWORD"][0] == "klines-clickhouse-reader"
    assert refs["KLINES_CLICKHOUSE__WRITER_PASSWORD"][0] == "klines-clickhouse-writer"
    env = _resolved_env(schema, manifests)
    assert env["KLINES_CLICKHOUSE__READER_USERNAME"] == resolved["KLINES_CLICKHOUSE__USERNAME"]
    assert env["KLINES_CLICKHOUSE__READER_PASSWORD"] == resolved["KLINES_CLICKHOUSE__PASSWORD"]


def test_compose_gives_each_service_only_its_own_clickhouse_login(compose: dict[str, Any]) -> None:
    expected = {
        "gateway": "klines_reader",
        "finalized_writer": "klines_writer",
        "snapshot_writer": "klines_writer",
        "init": "klines",  # the admin (CLICKHOUSE_USER in .env)
    }
    for name in _klines_services(compose):
        env = _compose_environment(compose, name)
        assert env.get("KLINES_CLICKHOUSE__USERNAME") == expected.get(name), name
        assert ("KLINES_CLICKHOUSE__WRITER_PASSWORD" in env) == (name == "init"), name
    gateway = _compose_environment(compose, "gateway")
    assert gateway["KLINES_CLICKHOUSE__PASSWORD"] == "klines-reader"  # CLICKHOUSE_READER_PASSWORD in .env
    assert compose["services"]["clickhouse"]["environment"]["CLICKHOUSE_DEFAULT_ACCESS_MANAGEMENT"] == 1


# --- the admin token of ingest's POST /symbols ----------------------------------------------------------------


def test_ingest_mounts_the_admin_token_secret_as_a_file(manifests: list[dict[str, Any]]) -> None:
    """Kubernetes: the Secret klines-admin-token is a read-only file in ingest, named by admin_token_file; no
    other workload gets it, and it never travels as an environment variable."""
    deployments = _deployments_by_service(manifests)
    pod = deployments["ingest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"] if "secret" in v}
    (volume,) = [v for v in volumes.values() if v["secret"]["secretName"].startswith("klines-admin-token")]
    secret_name = volume["secret"]["secretName"]
    assert secret_name in _of_kind(manifests, "Secret"), "the demo kustomization generates it"
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    (item,) = volume["secret"]["items"]
    path = _resolved_env(container, manifests)["KLINES_SERVICE__ADMIN_TOKEN_FILE"]
    assert path == f"{mount['mountPath']}/{item['path']}"
    assert volume["secret"]["defaultMode"] & 0o007 == 0, "not readable by other users"
    for service, workload in deployments.items():
        spec = workload["spec"]["template"]["spec"]
        others = [v for v in spec.get("volumes", []) if v.get("secret", {}).get("secretName") == secret_name]
        assert service == "ingest" or not others, service
        for c in spec["containers"]:
            assert "KLINES_SERVICE__ADMIN_TOKEN_FILE" not in _resolved_env(c, manifests) or service == "ingest"
            assert all(ref[0] != "klines-admin-token" for ref in _secret_refs(c).values()), service


def test_compose_gives_ingest_the_admin_token_as_a_secret_file(compose: dict[str, Any], dotenv: dict[str, str]) -> None:
    shards = _ingest_shards(compose)
    assert "ingest" in shards
    for name, ingest in shards.items():
        assert ingest["secrets"] == ["klines_admin_token"], name
        env = _compose_environment(compose, name)
        assert env["KLINES_SERVICE__ADMIN_TOKEN_FILE"] == "/run/secrets/klines_admin_token", name
    assert compose["secrets"]["klines_admin_token"]["file"] == dotenv["KLINES_ADMIN_TOKEN_FILE"]
    for name in _klines_services(compose):
        if name not in shards:
            assert "secrets" not in compose["services"][name], name
            assert "KLINES_SERVICE__ADMIN_TOKEN_FILE" not in _compose_environment(compose, name), name


# --- ingest shards --------------------------------------------------------------------------------------------


def test_kubernetes_ingest_pods_are_the_shards_of_one_stateful_set(
    manifests: list[dict[str, Any]], clean_environment: pytest.MonkeyPatch
) -> None:
    """A StatefulSet of N pods; pod i (its ordinal label) is shard i/N, with N = replicas: together exactly the
    shards 0..N-1 of N. A pod beyond N (replicas raised without N) fails its settings instead of running."""
    workload = _deployments_by_service(manifests)["ingest"]
    assert workload["kind"] == "StatefulSet"
    spec = workload["spec"]
    replicas = spec["replicas"]
    assert replicas >= 2, "the manifests show more than one shard"
    assert spec["podManagementPolicy"] == "Parallel" and spec["updateStrategy"]["type"] == "RollingUpdate"
    (container,) = spec["template"]["spec"]["containers"]
    shards = []
    for ordinal in range(replicas):
        env = _resolved_env(container, manifests, ordinal=ordinal)
        shards.append(_settings_with(env, clean_environment).ingest.shard)
    assert shards == [f"{i}/{replicas}" for i in range(replicas)]
    env = _resolved_env(container, manifests, ordinal=replicas)
    with pytest.raises(ConfigError, match=r"ingest\.shard"):
        _settings_with(env, clean_environment)
    # The governing Service gives each shard a name of its own (POST /symbols must reach the symbol's shard).
    headless = _of_kind(manifests, "Service")[spec["serviceName"]]["spec"]
    assert headless["clusterIP"] == "None"
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in headless["selector"].items())


def test_compose_ingest_services_are_the_shards_of_one_count(
    compose: dict[str, Any], clean_environment: pytest.MonkeyPatch
) -> None:
    """Compose has no ordinals: one service per shard, ``ingest`` shard 0, ``ingest-<i>`` shard i, all of the
    same N = the number of ingest services, otherwise configured alike, each on its own host port."""
    shards = _ingest_shards(compose)
    count = len(shards)
    assert count >= 2, "compose shows more than one shard"
    assert set(shards) == {"ingest"} | {f"ingest-{i}" for i in range(1, count)}
    loaded = {}
    for name in shards:
        env = _compose_environment(compose, name)
        loaded[name] = _settings_with(env, clean_environment)
        index = 0 if name == "ingest" else int(name.removeprefix("ingest-"))
        assert loaded[name].ingest.shard == f"{index}/{count}", name
    others = [s.model_dump(exclude={"ingest"}) for s in loaded.values()]
    assert all(o == others[0] for o in others), "the shards differ only in their shard"
    host_ports = [port.rsplit(":", 1)[0] for svc in shards.values() for port in svc["ports"]]
    assert len(set(host_ports)) == count, host_ports
    for name, svc in shards.items():
        assert svc["depends_on"] == compose["services"]["ingest"]["depends_on"], name
        assert svc["healthcheck"] == compose["services"]["ingest"]["healthcheck"], name
