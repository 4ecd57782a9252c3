"""The environment under test is the locked one: every pin of requirements.lock is installed at its version,
the lock covers every requirement pyproject.toml declares, and scripts/install.sh installs from it."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, pinned = line.partition("==")
            assert sep and pinned, f"requirements.lock: {line!r} is not an exact pin"
            pins[_norm(name)] = pinned
    return pins


def test_installed_versions_match_the_lock() -> None:
    wrong = {}
    for name, pinned in _pins().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "missing"
        if installed != pinned:
            wrong[name] = f"locked {pinned}, installed {installed}"
    assert not wrong, f"the environment differs from requirements.lock (reinstall, or regenerate with scripts/lock.sh): {wrong}"


def test_the_lock_covers_every_declared_requirement_and_pins_cpu_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra, requirements in project["optional-dependencies"].items():
        if extra != "deepspeed":  # builds from source; kept out of `all` and of the lock
            declared += [r for r in requirements if not r.startswith("med3dvlm[")]
    pins = _pins()
    names = {_norm(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in declared}
    assert not names - set(pins), f"not in requirements.lock: {sorted(names - set(pins))}"
    assert pins["torch"] == "2.13.0+cpu"
    assert "torchvision" not in pins and "timm" not in pins and not any(n.startswith("nvidia-") for n in pins)


def test_install_script_and_ci_use_the_lock() -> None:
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert re.search(r"pip install .*-c constraints\.txt -r requirements\.lock -e \"\.\[all,test\]\"", install)
    assert "bash scripts/install.sh" in (ROOT / ".ci" / "run").read_text()
