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
