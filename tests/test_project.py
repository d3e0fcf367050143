import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    block = re.search(r"## Set up\n.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    main_job, tests = _readme_commands()
    assert "train.quickstart" in main_job and "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_quickstart_runs_end_to_end_without_downloads(tmp_path):
    r = subprocess.run([sys.executable, "-m", "train.quickstart", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "JPEG baseline on 17 scikit-image photographs" in r.stdout
    assert (tmp_path / "results.md").is_file() and len(list((tmp_path / "side_by_side").glob("*.png"))) == 2
