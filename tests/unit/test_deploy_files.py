"""Static checks of the deployment files: Dockerfile, .dockerignore, docker-compose.yml, .env, deploy/k8s.

Nothing here needs a Docker engine or a cluster, but every check is a real one:

* docker-compose.yml is validated against the official Compose Specification JSON schema (compose-spec.json,
  vendored with its licence by the ``check-jsonschema`` package; read here from the installed distribution and
  checked with ``jsonschema``), before and after ``${VAR:-default}`` interpolation with the values of ``.env``;
* the Kubernetes manifests are rendered by ``kubectl kustomize`` (offline) and each object is validated in strict
  mode (unknown fields are errors) against the Kubernetes API's JSON schemas shipped by ``kubernetes-validate``;
* the services' entry points named in compose and Kubernetes are checked against the real source tree, the
  ports and grace periods against the real settings (config/klines.toml), and the environment that compose
  and Kubernetes give each service is loaded through the real settings loader.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from services.shared.settings import Settings, load_settings

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
    """The services that run the klines image (build: .), the one-shot init included."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


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
    services = _klines_services(compose)
    assert set(SERVICE_PORTS) | {"init", "replay"} == set(services)
    assert {svc["image"] for svc in services.values()} == {compose["services"]["ingest"]["image"]}
    for name, svc in services.items():
        assert svc["build"]["context"] == ".", name
        if name in SERVICE_PORTS:
            assert svc["command"] == ["python", "-m", f"services.{name}"], name
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
        probe = " ".join(compose["services"][name]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port_of(settings)}/healthz" in probe, f"{name}: probes {probe}"


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
    by_service = {}
    for deployment in _of_kind(manifests, "Deployment").values():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        by_service[_module_of(container).removeprefix("services.")] = deployment
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


def _resolved_env(container: dict[str, Any], manifests: list[dict[str, Any]]) -> dict[str, str]:
    config_maps = _of_kind(manifests, "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    secrets = _of_kind(manifests, "Secret")
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "fieldRef" in item["valueFrom"]:
            env[item["name"]] = f"<{item['valueFrom']['fieldRef']['fieldPath']}>"  # the pod's own field
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
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = container[probe]["httpGet"]
        assert http["path"] == path and http["port"] in ("http", port), f"{probe}: {http}"
    assert pod["terminationGracePeriodSeconds"] > settings.service.shutdown_grace_s
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]


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
    for name, deployment in _of_kind(manifests, "Deployment").items():
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
    kinds = {doc["kind"] for doc in render(K8S_DIR / "base")}
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap", "Job"} <= kinds
    assert not kinds & {"StatefulSet", "Secret", "Namespace"}
