"""environment.yml (conda users) must list exactly the dependencies of pyproject.toml."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def conda_pip_requirements() -> set[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    reqs = set()
    for line in lines[start + 1:]:
        stripped = line.strip()
        if not stripped.startswith("- "):
            break
        reqs.add(stripped[2:].strip())
    return reqs


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"]) | {"-e ."}
    assert conda_pip_requirements() == expected


def test_python_versions_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.10"
    assert "python=3.11" in (ROOT / "environment.yml").read_text()
