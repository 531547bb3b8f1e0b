"""``mikros-trio new``: a project from an empty folder that installs, runs and passes its tests."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from helpers import MIKROS_TRIO, REPO, Spawn, free_port, wait_until_ok

# The generated project takes mikros-trio from this checkout, as an unreleased user would.
SPEC = f"mikros-trio @ {REPO.as_uri()}"
# A fresh venv installs the project and its dependencies (about a minute here).
INSTALL_BOUND = 600.0
COMMAND_BOUND = 120.0
# The README's fenced shell block: install and run, then install and test.
_SH_BLOCK = re.compile(r"```sh\n(.*?)```", re.DOTALL)


def new(folder: Path, *args: str, spec: str = SPEC) -> subprocess.CompletedProcess[str]:
    """``mikros-trio new ARGS`` run in ``folder``, as a user types it."""
    return subprocess.run(
        [MIKROS_TRIO, "new", *args, "--mikros-trio-spec", spec],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=COMMAND_BOUND,
        check=False,
    )


@pytest.fixture(name="wheel_spec", scope="module")
def fixture_wheel_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """This checkout built into a wheel now, as the spec fresh venvs install.

    pip caches the wheel it builds for a ``file://`` folder under that URL,
    so a second run from the same folder would install the first run's code.
    """
    out = tmp_path_factory.mktemp("wheel")
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)]
    subprocess.run(argv, check=True, timeout=INSTALL_BOUND, capture_output=True)
    [wheel] = out.glob("mikros_trio-*.whl")
    return f"mikros-trio @ {wheel.as_uri()}"


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the test run's venv or import path, so nothing leaks in."""
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    # The README's python3 is the system's, not this run's venv.
    paths = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join(p for p in paths if Path(sys.prefix) not in Path(p).parents)
    return {**env, **extra}


def readme_commands(project: Path) -> list[list[list[str]]]:
    """The README's two commands, each as the argv lists its ``&&`` chains."""
    block = _SH_BLOCK.search((project / "README.md").read_text())
    assert block is not None, "README.md has no ```sh block"
    lines = block[1].strip().splitlines()
    assert len(lines) == 2, lines
    return [[shlex.split(part) for part in line.split(" && ")] for line in lines]


def step(argv: list[str], project: Path, timeout: float = INSTALL_BOUND) -> str:
    """Run ``argv`` in ``project``; its stdout, or fail with its output if it fails."""
    done = subprocess.run(
        argv,
        cwd=project,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def readme_tests(project: Path, test_line: list[list[str]]) -> str:
    """Run the README's install-and-test command; its pytest output, once it passed."""
    for argv in test_line[:-1]:
        step(argv, project)
    return step(test_line[-1], project, COMMAND_BOUND)


def get(port: int, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", trust_env=False, timeout=5.0)


def test_orders_from_empty_folder_runs_and_passes_its_tests(
    tmp_path: Path, spawn: Spawn, wheel_spec: str
) -> None:
    """new orders --kind http --kind worker, then the README's two commands, for real."""
    kinds = ("--kind", "http", "--kind", "worker")
    assert new(tmp_path, "orders", *kinds, spec=wheel_spec).returncode == 0
    project = tmp_path / "orders"
    run_line, test_line = readme_commands(project)

    assert re.search(r"\b3 passed\b", readme_tests(project, test_line)), test_line

    for argv in run_line[:-1]:
        step(argv, project)
    port = free_port()
    env = clean_env(MIKROS_HTTP_PORT=str(port))
    child = spawn(*run_line[-1], env=env, cwd=project)
    wait_until_ok(child, port, "/readyz", timeout=COMMAND_BOUND)
    assert get(port, "/livez").status_code == 200
    response = get(port, "/hello/ada")
    assert (response.status_code, response.json()) == (200, {"message": "Hello, ada!"})
    child.send(signal.SIGTERM)
    assert child.wait(COMMAND_BOUND) == 0, child.report()
    assert "worker: Hello, worker!" in child.stdout + child.stderr


def test_grpc_project_installs_and_passes_its_tests(tmp_path: Path, wheel_spec: str) -> None:
    """A gRPC + worker project's README test command passes in its own fresh venv.

    Its generated code meets the protobuf and purerpc its extras install.
    """
    kinds = ("--kind", "grpc", "--kind", "worker")
    assert new(tmp_path, "greeter", *kinds, spec=wheel_spec).returncode == 0
    project = tmp_path / "greeter"
    _, test_line = readme_commands(project)
    assert re.search(r"\b2 passed\b", readme_tests(project, test_line)), test_line


@pytest.mark.parametrize(
    "kinds",
    [
        ("--kind", "grpc", "--kind", "worker", "--features", "metrics,tracing"),
        (
            "--kind",
            "script",
        ),
        ("--kind", "http", "--features", "metrics"),
    ],
    ids=["grpc+worker", "script", "http+metrics"],
)
def test_every_kind_scaffolds_and_its_tests_pass(tmp_path: Path, kinds: tuple[str, ...]) -> None:
    """Each kind's project passes its own tests (here on this venv, its package on the path)."""
    done = new(tmp_path, "shop-api", *kinds)
    assert done.returncode == 0, done.stderr
    project = tmp_path / "shop-api"
    assert (project / "src" / "shop_api" / "main.py").is_file()
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(project / "src")},
        capture_output=True,
        text=True,
        timeout=COMMAND_BOUND,
        check=False,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert " passed" in tests.stdout
    assert "skipped" not in tests.stdout


def documents_paths(project: Path) -> list[Path]:
    return sorted((project / "k8s").glob("*.yaml"))


def test_manifests_are_valid_kubernetes(tmp_path: Path) -> None:
    """k8s/ holds a Deployment and a Service that pass the Kubernetes schema, probing /readyz."""
    assert new(tmp_path, "orders", "--kind", "http", "--kind", "worker").returncode == 0
    documents = {
        path.stem: yaml.safe_load(path.read_text()) for path in documents_paths(tmp_path / "orders")
    }
    assert set(documents) == {"deployment", "service"}
    version = kubernetes_validate.latest_version()
    for document in documents.values():
        kubernetes_validate.validate(document, version, strict=True)
    container = documents["deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8080}
    project = tmp_path / "orders"
    dockerfile = (project / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["mikros-trio", "run", "orders.main:Container"' in dockerfile
    # The README's deploy commands write the very same files again (after deleting them).
    before = {
        path: path.read_text() for path in [project / "Dockerfile", *documents_paths(project)]
    }
    commands = re.findall(r"`mikros-trio (deploy [^`]+)`", (project / "README.md").read_text())
    assert len(commands) == 2, commands
    for command in commands:
        step([MIKROS_TRIO, *shlex.split(command)], project, COMMAND_BOUND)
    assert {path: path.read_text() for path in before} == before


def test_pyproject_depends_on_mikros_trio_with_the_extras() -> None:
    """The dependency names mikros-trio with its kinds' and features' extras; tests on [pytest]."""
    from mikros_trio._scaffold import requirement

    assert requirement("mikros-trio>=0.1", ["http", "metrics"]) == "mikros-trio[http,metrics]>=0.1"
    assert requirement(SPEC, ["pytest"]) == f"mikros-trio[pytest] @ {REPO.as_uri()}"
    assert requirement("mikros-trio", []) == "mikros-trio"


def test_new_refuses_to_overwrite(tmp_path: Path) -> None:
    """A second new in the same place exits 2 naming what exists, and changes nothing."""
    assert new(tmp_path, "orders").returncode == 0
    main = tmp_path / "orders" / "src" / "orders" / "main.py"
    main.write_text("# mine\n")
    (tmp_path / "orders" / "service.toml").unlink()  # one file gone still refuses
    again = new(tmp_path, "orders", "--kind", "grpc")
    assert again.returncode == 2
    assert str(Path("orders") / "src" / "orders" / "main.py") in again.stderr
    assert "Traceback" not in again.stderr
    assert main.read_text() == "# mine\n"
    assert not (tmp_path / "orders" / "service.toml").exists()
    assert not (tmp_path / "orders" / "src" / "orders" / "proto").exists()


def test_new_refuses_a_file_where_the_folder_goes(tmp_path: Path) -> None:
    """A file where the folder (or a parent) goes exits 2 with the path and no traceback."""
    (tmp_path / "orders").write_text("a file\n")
    done = new(tmp_path, "orders")
    assert done.returncode == 2
    assert "orders exists and is not a folder" in done.stderr
    done = new(tmp_path, "orders", "--dir", "orders/inside")  # a file as a parent folder
    assert done.returncode == 2
    assert "orders/inside" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("Orders",), "name 'Orders'"),
        (("a--b",), "name 'a--b'"),
        (("x", "--kind", "script", "--kind", "http"), "a script stands alone"),
        (("x", "--features", "metrics,logs"), "unknown feature 'logs'"),
        (("x", "--kind", "cron"), "invalid choice: 'cron'"),
    ],
)
def test_new_rejects_bad_input_writing_nothing(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    """Bad names, kinds and features exit 2 with one clear line; nothing is written."""
    done = new(tmp_path, *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_new_rejects_a_spec_for_another_package(tmp_path: Path) -> None:
    """--mikros-trio-spec must name mikros-trio: the extras go after that name."""
    done = subprocess.run(
        [MIKROS_TRIO, "new", "x", "--mikros-trio-spec", "requests>=2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=COMMAND_BOUND,
        check=False,
    )
    assert done.returncode == 2
    assert "--mikros-trio-spec 'requests>=2'" in done.stderr
    assert list(tmp_path.iterdir()) == []
