import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    block = re.search(r"## Set up\n.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    main_job, tests = _readme_commands()
    assert "train.quickstart" in main_job and "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_every_console_script_runs_and_the_readme_names_it(capsys):
    """`pip install -e .` puts each [project.scripts] command on the PATH: each one's --help works, and the
    Layout section's list of them is complete (train.ship and train.quality_bound had none)."""
    import importlib
    import tomllib

    import pytest

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    assert not [name for name in scripts if f"`{name}`" not in layout], "console scripts the README does not name"
    for module in ("train.ship", "train.quality_bound", "train.figure"):  # users' steps in the README
        assert f"{module}:main" in scripts.values(), f"{module} has no console script"
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        with pytest.raises(SystemExit) as exit_:
            getattr(importlib.import_module(module), func)(["--help"])
        assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out, name


def _github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


DOCS = ["README.md", "docs/experiments.md", "scripts/gpu/README.md"]
REPO_PATH = re.compile(r"`((?:docs|configs|scripts|slurm|train|runtime|data_pipeline|export|serve_bench|tests)/[\w./-]+)`")


def test_docs_links_and_named_files_resolve():
    """Every relative link (and its #anchor) and every repository path named in backticks in the docs
    points at something that exists: moving text between README and docs/ must not leave dangling refs."""
    broken = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            file = (ROOT / doc).parent / path if path else ROOT / doc
            if not file.exists():
                broken.append(f"{doc}: link {target}")
            elif anchor and anchor not in {_github_anchor(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}:
                broken.append(f"{doc}: anchor {target}")
        broken += [f"{doc}: path {p}" for p in REPO_PATH.findall(text) if not (ROOT / p).exists()]
    assert not broken, broken
