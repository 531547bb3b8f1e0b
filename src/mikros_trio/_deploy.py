"""``mikros-trio deploy``: a Dockerfile and Kubernetes manifests derived from service.toml.

Everything the manifests say comes from the definition, so they cannot
drift from what the service does: container ports from ``types`` and the
kinds' resolved ports, probes on the paths and ports the service answers,
a grace period that outlasts its shutdown, the environment it requires.

Conventions the manifests rely on (the user creates these objects):

- the ConfigMap named after the service holds the values of ``envs``;
- the Secret named after the service holds those listed in
  ``[features.env] secrets``, one key per variable name.

YAML is written by hand (block style, every string double-quoted as JSON
quotes it), so the command needs no YAML library.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from ._definition import Definition, load_definition
from ._runtime_settings import HttpSettings
from .features.settings import METRICS_PORT_ENV, EnvSettings, MetricsSettings

__all__ = ["add_deploy", "dockerfile", "manifests", "to_yaml"]

T = TypeVar("T")

# Seconds added to readiness_delay + shutdown_timeout for the grace period:
# the watchdog ends a shutdown stuck past its deadline (exit 124) a moment
# after the deadline, and that exit must come before Kubernetes' SIGKILL.
GRACE_MARGIN: Final = 5
# Seconds between startup probes; failures allowed cover start_timeout plus
# the interpreter's own start (imports), which start_timeout does not count.
STARTUP_PERIOD: Final = 2
STARTUP_MARGIN: Final = 10
REPLICAS_MAX: Final = 1000
# Per-process requests: a millicore count and bytes, bounded like every number here.
CPU_MAX_MILLI: Final = 64_000
MEMORY_MAX: Final = 2**40
PYTHON_IMAGE: Final = "python:3.11-slim"
# A numeric user, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
UID: Final = 10001

# Kubernetes names: DNS-1035 labels (a Service's name must be one).
_K8S_NAME: Final = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
# ConfigMap and Secret keys.
_K8S_KEY: Final = re.compile(r"[-._a-zA-Z0-9]{1,253}")
_CPU: Final = re.compile(r"(\d+)m|(\d+(?:\.\d{1,3})?)")
_MEMORY_UNITS: Final = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6}
_MEMORY: Final = re.compile(r"(\d+)(Ki|Mi|Gi|k|M|)")
_PDB: Final = re.compile(r"(\d{1,3})%|(\d{1,4})")
_PLAIN_KEY: Final = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*")
_YAML_WORDS: Final = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null"})


class DeployError(Exception):
    """Input the deploy command cannot turn into manifests; printed, exit 2."""


@dataclass(frozen=True, slots=True)
class Options:
    """The command line's choices; sizes are per serving process."""

    image: str | None = None
    replicas: int = 2
    cpu_milli: int = 250
    memory: int = 256 * 2**20
    pdb: str | None = None


# -- the CLI ----------------------------------------------------------------------


def add_deploy(commands: Any) -> None:
    """Add ``deploy k8s`` and ``deploy dockerfile`` to the ``mikros-trio`` subcommands."""
    deploy = commands.add_parser(
        "deploy", help="write Kubernetes manifests or a Dockerfile derived from service.toml"
    )
    targets = deploy.add_subparsers(dest="deploy_command", metavar="WHAT", required=True)
    k8s = targets.add_parser("k8s", help="Deployment, Service (and PodDisruptionBudget)")
    dockerfile_parser = targets.add_parser("dockerfile", help="a Dockerfile that runs the service")
    for parser in (k8s, dockerfile_parser):
        parser.add_argument(
            "target",
            nargs="?",
            help="what `mikros-trio run` starts: path/to/main.py[:Container] or "
            "module[:Container] (default main.py beside the config); a .toml path names the config",
        )
        parser.add_argument("--config", type=Path, help="service.toml (default: beside the target)")
        parser.add_argument("--out", type=Path, metavar="DIR", help="write files here, not stdout")
    for flag, parse, default, metavar, text in _K8S_OPTIONS:
        k8s.add_argument(flag, type=parse, default=default, metavar=metavar, help=text)
    k8s.set_defaults(handler=_k8s)
    dockerfile_parser.set_defaults(handler=_dockerfile)


def _image(text: str) -> str:
    if not text or any(char.isspace() for char in text):
        raise argparse.ArgumentTypeError(f"expected an image reference, got {text!r}")
    return text


def _replicas(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= REPLICAS_MAX:
        raise argparse.ArgumentTypeError(f"expected 1-{REPLICAS_MAX} replicas, got {text!r}")
    return int(text)


def _cpu(text: str) -> int:
    match = _CPU.fullmatch(text)
    milli = 0
    if match:
        milli = int(match[1]) if match[1] else round(float(match[2]) * 1000)
    if not 1 <= milli <= CPU_MAX_MILLI:
        raise argparse.ArgumentTypeError(
            f"expected a CPU amount from 1m to {CPU_MAX_MILLI // 1000} (as 250m or 0.5), "
            f"got {text!r}"
        )
    return milli


def _memory(text: str) -> int:
    match = _MEMORY.fullmatch(text)
    size = int(match[1]) * _MEMORY_UNITS[match[2]] if match else 0
    if not 2**20 <= size <= MEMORY_MAX:
        raise argparse.ArgumentTypeError(
            f"expected a memory size from 1Mi to 1024Gi (as 256Mi or 1Gi), got {text!r}"
        )
    return size


def _pdb(text: str) -> str:
    match = _PDB.fullmatch(text)
    if not match or (match[1] and not 1 <= int(match[1]) <= 100) or match[2] == "0":
        raise argparse.ArgumentTypeError(
            f"expected maxUnavailable as a count >= 1 or a percentage 1%-100%, got {text!r}"
        )
    return text


# (flag, parser, default, metavar, help) of each `deploy k8s` option.
_K8S_OPTIONS: Final[tuple[tuple[str, Callable[[str], object], object, str, str], ...]] = (
    ("--image", _image, None, "IMAGE", "container image (default NAME:VERSION)"),
    ("--replicas", _replicas, 2, "N", "default 2"),
    (
        "--cpu",
        _cpu,
        250,
        "CPU",
        "CPU request per serving process, as 250m or 0.5 (default 250m); times [lifecycle] workers",
    ),
    (
        "--memory",
        _memory,
        256 * 2**20,
        "SIZE",
        "memory request and limit per serving process, as 256Mi (default); "
        "times [lifecycle] workers",
    ),
    ("--pdb", _pdb, None, "N|N%", "add a PodDisruptionBudget with this maxUnavailable"),
)


def _config_of(target: str | None, config: Path | None) -> tuple[str, Path]:
    """The run target and the service.toml it uses.

    The config defaults to the one beside a ``.py`` target (else
    ./service.toml), and the target to ``main.py`` beside the config.
    """
    if target is not None and target.endswith(".toml"):
        config, target = config or Path(target), None
    if target is None:
        config = config or Path("service.toml")
        return str(config.parent / "main.py"), config
    spec = target.partition(":")[0]
    if config is None:
        config = (
            Path(spec).parent / "service.toml" if spec.endswith(".py") else Path("service.toml")
        )
    return target, config


def _load(target: str | None, config: Path | None) -> tuple[str, Definition]:
    target, path = _config_of(target, config)
    # The manifests describe the file, not this shell: MIKROS_HTTP_PORT here
    # must not change the port written for the cluster.
    return target, load_definition(path, environ={})


def _k8s(args: argparse.Namespace) -> int:
    _, definition = _load(args.target, args.config)
    options = Options(args.image, args.replicas, args.cpu, args.memory, args.pdb)
    documents, warnings = _checked(lambda: manifests(definition, options))
    for warning in warnings:
        print(f"mikros-trio: warning: {warning}", file=sys.stderr)
    if args.out is None:
        sys.stdout.write("---\n".join(to_yaml(document) for document in documents))
        return 0
    _write(args.out, {f"{doc['kind'].lower()}.yaml": to_yaml(doc) for doc in documents})
    return 0


def _dockerfile(args: argparse.Namespace) -> int:
    target, definition = _load(args.target, args.config)
    text = _checked(lambda: dockerfile(definition, target))
    if args.out is None:
        sys.stdout.write(text)
        return 0
    _write(args.out, {"Dockerfile": text})
    return 0


def _write(folder: Path, files: Mapping[str, str]) -> None:
    """Write ``files`` into ``folder`` (made if missing), printing each path written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text)
            print(folder / name)
    except OSError as error:
        from .cli import UsageError

        raise UsageError(f"--out {folder}: {error.strerror or error}") from None


def _checked(build: Callable[[], T]) -> T:
    from .cli import UsageError

    try:
        return build()
    except DeployError as error:
        raise UsageError(str(error)) from None


# -- manifests ---------------------------------------------------------------------


def k8s_name(definition: Definition) -> str:
    """The service's name as a Kubernetes object name (lower case, ``_`` and ``.`` as ``-``)."""
    name = re.sub(r"[^a-z0-9-]", "-", definition.name.lower())
    if not _K8S_NAME.fullmatch(name):
        raise DeployError(
            f"{definition.source}: name: {definition.name!r} gives {name!r}, not a Kubernetes "
            "name (a letter, then up to 62 lower-case letters, digits or '-', not ending in '-')"
        )
    return name


def _ports(definition: Definition) -> list[tuple[str, int, str | None]]:
    """``(port name, number, MIKROS_* variable)`` of every port the service listens on."""
    ports: list[tuple[str, int, str | None]] = []
    for kind in definition.kinds:
        number = definition.port(kind)
        if number is not None:
            ports.append((kind, number, f"MIKROS_{kind.upper()}_PORT"))
    http = definition.runtime.get("http")
    if isinstance(http, HttpSettings) and http.admin_port is not None:
        ports.append(("admin", http.admin_port, None))
    metrics = _metrics(definition)
    if metrics is not None and http is None:
        ports.append(("metrics", metrics.port, METRICS_PORT_ENV))
    for name, number, _ in ports:
        if number == 0:
            raise DeployError(
                f"{definition.source}: the {name} port is 0 (a free port picked at start); "
                "a Kubernetes Service needs a fixed port"
            )
    return ports


def _metrics(definition: Definition) -> MetricsSettings | None:
    config = definition.features.get("metrics")
    if config is None or not config.enabled or not isinstance(config.settings, MetricsSettings):
        return None
    return config.settings


def _probes(definition: Definition, ports: Mapping[str, int]) -> dict[str, Any]:
    timing = {"periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 3}
    startup = {
        "periodSeconds": STARTUP_PERIOD,
        "timeoutSeconds": 2,
        "failureThreshold": math.ceil(
            (definition.lifecycle.start_timeout + STARTUP_MARGIN) / STARTUP_PERIOD
        ),
    }
    if "http" in ports:
        port = ports.get("admin", ports["http"])
        return {
            "livenessProbe": {"httpGet": {"path": "/livez", "port": port}, **timing},
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": port}, **timing},
            "startupProbe": {"httpGet": {"path": "/readyz", "port": port}, **startup},
        }
    if "grpc" in ports:
        port = ports["grpc"]
        # grpc.health.v1 answers readiness only (NOT_SERVING while a resource
        # is down or the service drains): as liveness it would restart a pod
        # waiting for its database. Liveness is the listener accepting.
        return {
            "livenessProbe": {"tcpSocket": {"port": port}, **timing},
            "readinessProbe": {"grpc": {"port": port, "service": ""}, **timing},
            "startupProbe": {"grpc": {"port": port, "service": ""}, **startup},
        }
    return {}


def _env(definition: Definition, name: str, ports: Sequence[tuple[str, int, str | None]]) -> Any:
    env: list[dict[str, Any]] = [
        {"name": variable, "value": str(number)} for _, number, variable in ports if variable
    ]
    settings = definition.features["env"].settings if "env" in definition.features else None
    secrets = set(settings.secrets) if isinstance(settings, EnvSettings) else set()
    for variable in definition.envs:
        if not _K8S_KEY.fullmatch(variable):
            raise DeployError(
                f"{definition.source}: envs: {variable!r} cannot be a ConfigMap or Secret key "
                "(letters, digits, '-', '_' and '.')"
            )
        source = "secretKeyRef" if variable in secrets else "configMapKeyRef"
        env.append({"name": variable, "valueFrom": {source: {"name": name, "key": variable}}})
    return env


def manifests(definition: Definition, options: Options) -> tuple[list[dict[str, Any]], list[str]]:
    """The Deployment, Service and optional PodDisruptionBudget, and warnings for stderr."""
    if "script" in definition.kinds:
        raise DeployError(
            f"{definition.source}: types: a script runs once and exits; a Deployment would "
            "restart it forever: run it as a Kubernetes Job"
        )
    name = k8s_name(definition)
    ports = _ports(definition)
    by_name = {port_name: number for port_name, number, _ in ports}
    lifecycle = definition.lifecycle
    warnings: list[str] = []
    served = [kind for kind in ("http", "grpc") if kind in by_name]
    if served and lifecycle.readiness_delay == 0:
        warnings.append(
            f"{definition.source}: [lifecycle] readiness_delay is 0: behind a load balancer, "
            "requests sent to a pod being removed before the balancer notices get errors; "
            "set it to a few seconds (the balancer's probe period or more)"
        )
    if not served:
        warnings.append(
            f"{definition.source}: types {list(definition.kinds)} serve no probes: "
            "Kubernetes sees the pod ready once its process runs"
        )
    workers = lifecycle.workers
    if workers == 0:
        warnings.append(
            f"{definition.source}: [lifecycle] workers = 0 starts one process per CPU the pod "
            "may run on (the node's, not the CPU request): the requests are sized for one; "
            "set workers to a number"
        )
    processes = max(workers, 1)
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/version": definition.version}
    selector = {"app.kubernetes.io/name": name}
    annotations: dict[str, str] = {}
    metrics = _metrics(definition)
    if metrics is not None:
        port = by_name.get("metrics", by_name.get("admin", by_name.get("http")))
        annotations = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(port),
            "prometheus.io/path": metrics.path,
        }
    memory = f"{processes * options.memory // 2**20}Mi"
    container: dict[str, Any] = {
        "name": name,
        "image": options.image or f"{name}:{definition.version.replace('+', '-')}",
        "ports": [
            {"name": port_name, "containerPort": number, "protocol": "TCP"}
            for port_name, number, _ in ports
        ],
        "env": _env(definition, name, ports),
        **_probes(definition, by_name),
        "resources": {
            "requests": {"cpu": f"{processes * options.cpu_milli}m", "memory": memory},
            "limits": {"memory": memory},
        },
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True},
    }
    grace = math.ceil(lifecycle.readiness_delay + lifecycle.shutdown_timeout) + GRACE_MARGIN
    template: dict[str, Any] = {
        "metadata": {"labels": labels, **({"annotations": annotations} if annotations else {})},
        "spec": {
            "terminationGracePeriodSeconds": grace,
            "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID},
            "containers": [container],
        },
    }
    documents: list[dict[str, Any]] = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "replicas": options.replicas,
                "selector": {"matchLabels": selector},
                "template": template,
            },
        }
    ]
    if served:
        documents.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "labels": labels},
                "spec": {
                    "selector": selector,
                    "ports": [
                        {"name": kind, "port": by_name[kind], "targetPort": kind, "protocol": "TCP"}
                        for kind in served
                    ],
                },
            }
        )
    if options.pdb is not None:
        unavailable: int | str = options.pdb if options.pdb.endswith("%") else int(options.pdb)
        documents.append(
            {
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": {"name": name, "labels": labels},
                "spec": {"maxUnavailable": unavailable, "selector": {"matchLabels": selector}},
            }
        )
    return documents, warnings


# -- Dockerfile --------------------------------------------------------------------


def _extras(definition: Definition) -> list[str]:
    extras: list[str] = [kind for kind in ("http", "grpc") if kind in definition.kinds]
    extras += [
        feature
        for feature in ("metrics", "tracing")
        if feature in definition.features and definition.features[feature].enabled
    ]
    return extras


def dockerfile(definition: Definition, target: str) -> str:
    """A Dockerfile whose build context is the folder of service.toml.

    It installs the project (``pyproject.toml`` there) or its
    ``requirements.txt``, else mikros-trio with the extras the file needs,
    and runs ``mikros-trio run`` as PID 1 in exec form: no shell stands
    between the kubelet's SIGTERM and the service.
    """
    folder = Path(definition.source).parent
    config = Path(definition.source).name
    if (folder / "pyproject.toml").is_file():
        install = "pip install --no-cache-dir ."
    elif (folder / "requirements.txt").is_file():
        install = "pip install --no-cache-dir -r requirements.txt"
    else:
        extras = _extras(definition)
        package = f"mikros-trio[{','.join(extras)}]" if extras else "mikros-trio"
        install = f"pip install --no-cache-dir {json.dumps(package)}"
    ports = " ".join(str(number) for _, number, _ in _ports(definition))
    spec, colon, attribute = target.partition(":")
    if spec.endswith(".py"):
        # The build context is the config's folder: the target is named from there.
        target = os.path.relpath(spec, folder) + colon + attribute
    entrypoint = json.dumps(["mikros-trio", "run", target, "--config", config])
    lines = [
        f"# Generated by mikros-trio deploy dockerfile from {config}; build in its folder.",
        f"FROM {PYTHON_IMAGE}",
        "ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1",
        "WORKDIR /app",
        f"RUN groupadd --system --gid {UID} app "
        f"&& useradd --system --uid {UID} --gid {UID} --no-create-home app",
        "COPY . /app",
        f"RUN {install}",
        f"USER {UID}:{UID}",
        *([f"EXPOSE {ports}"] if ports else []),
        "STOPSIGNAL SIGTERM",
        f"ENTRYPOINT {entrypoint}",
    ]
    return "\n".join(lines) + "\n"


# -- YAML --------------------------------------------------------------------------


def to_yaml(value: Any) -> str:
    """``value`` (dicts, lists, strings, ints, bools) as block-style YAML, strings quoted."""
    return "\n".join(_yaml_lines(value, 0)) + "\n"


def _scalar(value: Any) -> str:
    # JSON's double-quoted strings are YAML's: no string can read as a number or bool.
    return json.dumps(value)


def _key(key: str) -> str:
    # Plain keys read better; YAML 1.1's boolean words stay quoted.
    if _PLAIN_KEY.fullmatch(key) and key.lower() not in _YAML_WORDS:
        return key
    return _scalar(key)


def _yaml_lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(item, Mapping | list) and item:
                lines.append(f"{pad}{_key(key)}:")
                lines += _yaml_lines(item, indent + 2)
            else:
                lines.append(f"{pad}{_key(key)}: {_flow(item)}")
    else:
        for item in value:
            inner = _yaml_lines(item, indent + 2) if isinstance(item, Mapping | list) else []
            if inner and item:
                lines.append(f"{pad}- {inner[0].lstrip()}")
                lines += inner[1:]
            else:
                lines.append(f"{pad}- {_flow(item)}")
    return lines


def _flow(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)
