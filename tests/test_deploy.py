"""``mikros-trio deploy``: manifests valid for Kubernetes, probes the running service answers."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from helpers import (
    MIKROS_TRIO,
    REPO,
    Spawn,
    free_port,
    grpc_health,
    wait_until_ok,
    wait_until_serving,
)

K8S_VERSION = kubernetes_validate.latest_version()

HEAD = 'name = "{name}"\ntypes = [{types}]\nversion = "v1.2.0"\n'
LOCAL = '[runtime.http]\nhost = "127.0.0.1"\n'
VARIANTS = {
    "http": HEAD.format(name="items", types='"http:8080"'),
    "grpc-only": HEAD.format(name="greeter", types='"grpc:50051"')
    + "[lifecycle]\nreadiness_delay = 2.5\ndrain_timeout = 5.0\nshutdown_timeout = 10.0\n",
    "http-worker-metrics-admin": HEAD.format(name="orders_api", types='"http:8080", "worker"')
    + LOCAL
    + "admin_port = 9000\n[features.metrics]\nenabled = true\n[lifecycle]\nworkers = 3\n",
    "secrets": HEAD.format(name="billing", types='"http"')
    + 'envs = ["DATABASE_URL", "REGION"]\n[features.env]\nsecrets = ["DATABASE_URL"]\n',
    "worker-metrics": HEAD.format(name="ticker", types='"worker"')
    + "[features.metrics]\nenabled = true\nport = 9100\n",
}


def deploy(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MIKROS_TRIO, "deploy", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )


def k8s(config: Path, *options: str) -> tuple[list[dict[str, Any]], str]:
    """The documents ``deploy k8s --config config`` prints, and its stderr."""
    done = deploy("k8s", "--config", config, *options)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc], done.stderr


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "service.toml"
    path.write_text(text)
    return path


def container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = (doc for doc in documents if doc["kind"] == "Deployment")
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = main
    return result


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_passes_the_kubernetes_schema(tmp_path: Path, variant: str) -> None:
    documents, _ = k8s(write(tmp_path, VARIANTS[variant]), "--pdb", "25%", "--replicas", "3")
    kinds = [doc["kind"] for doc in documents]
    served = variant != "worker-metrics"
    assert kinds == ["Deployment", *(["Service"] if served else []), "PodDisruptionBudget"]
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    # The same documents, written as files.
    done = deploy("k8s", "--config", tmp_path / "service.toml", "--out", tmp_path / "k8s")
    assert done.returncode == 0, done.stderr
    written = sorted(path.name for path in (tmp_path / "k8s").iterdir())
    assert written == sorted(
        f"{kind.lower()}.yaml" for kind in kinds if kind != "PodDisruptionBudget"
    )


def test_the_schema_check_catches_a_broken_manifest(tmp_path: Path) -> None:
    # The validator is not a formality: a wrong type in what we emit fails it.
    documents, _ = k8s(write(tmp_path, VARIANTS["http"]))
    container(documents)["ports"][0]["containerPort"] = "8080"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(documents[0], K8S_VERSION, strict=True)


def test_settings_reach_the_manifest(tmp_path: Path) -> None:
    documents, stderr = k8s(
        write(tmp_path, VARIANTS["http-worker-metrics-admin"]), "--cpu", "0.5", "--memory", "1Gi"
    )
    main = container(documents)
    assert main["resources"]["requests"] == {"cpu": "1500m", "memory": "3072Mi"}  # workers = 3
    assert main["resources"]["limits"] == {"memory": "3072Mi"}
    assert main["livenessProbe"]["httpGet"] == {"path": "/livez", "port": 9000}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 9000}
    assert {p["name"]: p["containerPort"] for p in main["ports"]} == {"http": 8080, "admin": 9000}
    assert {"name": "MIKROS_HTTP_PORT", "value": "8080"} in main["env"]
    pod = documents[0]["spec"]["template"]
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9000",
        "prometheus.io/path": "/metrics",
    }
    assert documents[0]["metadata"]["name"] == "orders-api"
    # readiness_delay 0 + shutdown_timeout 20 + the margin.
    assert pod["spec"]["terminationGracePeriodSeconds"] == 25
    assert "readiness_delay is 0" in stderr
    # start_timeout 15 + 10 s of interpreter start, probed every 2 s.
    assert main["startupProbe"]["failureThreshold"] * main["startupProbe"]["periodSeconds"] >= 25


def test_grpc_only_uses_the_native_grpc_probe(tmp_path: Path) -> None:
    documents, stderr = k8s(write(tmp_path, VARIANTS["grpc-only"]))
    main = container(documents)
    assert main["readinessProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert main["startupProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert main["livenessProbe"]["tcpSocket"] == {"port": 50051}
    assert documents[0]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 18
    assert stderr == ""  # readiness_delay set: no warning


def test_secrets_come_from_the_secret_named_after_the_service(tmp_path: Path) -> None:
    documents, _ = k8s(write(tmp_path, VARIANTS["secrets"]))
    env = {entry["name"]: entry.get("valueFrom") for entry in container(documents)["env"]}
    assert env["DATABASE_URL"] == {"secretKeyRef": {"name": "billing", "key": "DATABASE_URL"}}
    assert env["REGION"] == {"configMapKeyRef": {"name": "billing", "key": "REGION"}}


def test_a_worker_gets_its_metrics_port_and_no_probes(tmp_path: Path) -> None:
    documents, stderr = k8s(write(tmp_path, VARIANTS["worker-metrics"]))
    main = container(documents)
    assert "livenessProbe" not in main
    assert {"name": "MIKROS_METRICS_PORT", "value": "9100"} in main["env"]
    assert "serve no probes" in stderr


CURL_STATUS = ("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5")


def probes(main: dict[str, Any]) -> list[dict[str, Any]]:
    return [main[name] for name in ("livenessProbe", "readinessProbe", "startupProbe")]


# An HTTP API and a worker in one service, as `mikros-trio run` starts it.
HTTP_AND_WORKER = """
from dependency_injector import providers
from quart_trio import QuartTrio

from mikros_trio import Lifetime, ServiceContainer


class Loop:
    async def run(self, lifetime: Lifetime) -> None:
        await lifetime.wait_stopping()


class Container(ServiceContainer):
    app = providers.Singleton(QuartTrio, "app")
    worker = providers.Factory(Loop)
"""


@pytest.mark.parametrize("case", ["http", "http-admin", "http-worker-admin-workers"])
def test_http_probes_match_the_running_service(tmp_path: Path, spawn: Spawn, case: str) -> None:
    http = free_port()
    admin = http if case == "http" else free_port()
    types = f'"http:{http}"'
    program = REPO / "examples/http/main.py"
    extra = ""
    if case == "http-worker-admin-workers":
        types += ', "worker"'
        program = tmp_path / "main.py"
        program.write_text(HTTP_AND_WORKER)
        extra = "[lifecycle]\nworkers = 2\n"
    config = write(
        tmp_path,
        HEAD.format(name="items", types=types)
        + LOCAL
        + (f"admin_port = {admin}\n" if admin != http else "")
        + "[features.metrics]\nenabled = true\n"
        + extra,
    )
    documents, _ = k8s(config)
    child = spawn(MIKROS_TRIO, "run", program, "--config", config)
    wait_until_ok(child, admin)
    main = container(documents)
    for probe in probes(main):
        get = probe["httpGet"]
        assert get["port"] == admin
        status = subprocess.run(
            [*CURL_STATUS, f"http://127.0.0.1:{get['port']}{get['path']}"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        assert status.stdout == "200", get
    annotations = documents[0]["spec"]["template"]["metadata"]["annotations"]
    scrape = f"http://127.0.0.1:{annotations['prometheus.io/port']}"
    done = subprocess.run(
        ["curl", "-sf", "--max-time", "5", scrape + annotations["prometheus.io/path"]],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert done.returncode == 0
    assert "# TYPE" in done.stdout


def test_grpc_probes_match_the_running_service(tmp_path: Path, spawn: Spawn) -> None:
    from grpc_health.v1 import health_pb2

    port = free_port()
    config = write(tmp_path, HEAD.format(name="greeter", types=f'"grpc:{port}"'))
    documents, _ = k8s(config)
    child = spawn(MIKROS_TRIO, "run", REPO / "examples/grpc/main.py", "--config", config)
    wait_until_serving(child, port)
    live, ready, startup = probes(container(documents))
    for probe in (ready, startup):
        check = probe["grpc"]
        assert (
            grpc_health(check["port"], check["service"]) == health_pb2.HealthCheckResponse.SERVING
        )
    with socket.create_connection(("127.0.0.1", live["tcpSocket"]["port"]), timeout=5):
        pass


def test_the_dockerfile_runs_the_service_as_pid_1_without_root(tmp_path: Path) -> None:
    config = write(tmp_path, VARIANTS["http-worker-metrics-admin"])
    (tmp_path / "app.py").write_text("")
    done = deploy("dockerfile", tmp_path / "app.py")
    assert done.returncode == 0, done.stderr
    instructions = [
        line.split(None, 1) for line in done.stdout.splitlines() if line and line[0] != "#"
    ]
    seen = dict(instructions)
    assert seen["FROM"].endswith("-slim")
    user = seen["USER"].split(":")[0]
    assert user.isdigit()
    assert int(user) != 0
    assert [keyword for keyword, _ in instructions].index("USER") > max(
        index for index, (keyword, _) in enumerate(instructions) if keyword == "RUN"
    )
    assert seen["STOPSIGNAL"] == "SIGTERM"
    # Exec form: a JSON array, so no /bin/sh -c stands between SIGTERM and the service.
    assert json.loads(seen["ENTRYPOINT"]) == [
        "mikros-trio", "run", "app.py", "--config", config.name,
    ]  # fmt: skip
    assert "CMD" not in seen
    assert seen["EXPOSE"].split() == ["8080", "9000"]
    assert shlex.split(seen["RUN"])[-1] == "mikros-trio[http,metrics]"
    (tmp_path / "pyproject.toml").write_text("")
    done = deploy("dockerfile", tmp_path / "app.py")
    assert "RUN pip install --no-cache-dir .\n" in done.stdout


@pytest.mark.parametrize(
    ("toml", "options", "message"),
    [
        (HEAD.format(name="job", types='"script"'), (), "run it as a Kubernetes Job"),
        (HEAD.format(name="items", types='"http:0"'), (), "http port is 0"),
        (HEAD.format(name="9lives", types='"http"'), (), "not a Kubernetes name"),
        (
            HEAD.format(name="items", types='"http"') + 'envs = ["A B"]\n',
            (),
            "cannot be a ConfigMap or Secret key",
        ),
        (HEAD.format(name="items", types='"http"'), ("--replicas", "0"), "expected 1-1000"),
        (HEAD.format(name="items", types='"http"'), ("--cpu", "lots"), "expected a CPU amount"),
        (HEAD.format(name="items", types='"http"'), ("--memory", "2Ti"), "expected a memory"),
        (HEAD.format(name="items", types='"http"'), ("--pdb", "0"), "maxUnavailable"),
        ('name = "items"\n', (), "types"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    tmp_path: Path, toml: str, options: tuple[str, ...], message: str
) -> None:
    done = deploy("k8s", "--config", write(tmp_path, toml), *options)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_a_missing_config_exits_2(tmp_path: Path) -> None:
    done = deploy("dockerfile", "--config", tmp_path / "absent.toml")
    assert (done.returncode, "Traceback" in done.stderr) == (2, False)
    assert "cannot read the file" in done.stderr


def test_an_out_folder_that_is_a_file_exits_2(tmp_path: Path) -> None:
    config = write(tmp_path, VARIANTS["http"])
    done = deploy("k8s", "--config", config, "--out", config)
    assert (done.returncode, "Traceback" in done.stderr) == (2, False)
    assert f"--out {config}" in done.stderr


@pytest.mark.parametrize(
    "args",
    [("examples/orders/service.toml",), ("--config", "examples/orders/service.toml"), ()],
)
def test_the_default_target_is_main_py_beside_the_config(args: tuple[str, ...]) -> None:
    done = subprocess.run(
        [MIKROS_TRIO, "deploy", "dockerfile", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO / ("examples/grpc" if not args else ""),
    )
    assert done.returncode == 0, done.stderr
    assert 'ENTRYPOINT ["mikros-trio", "run", "main.py", "--config", "service.toml"]' in done.stdout
