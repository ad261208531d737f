"""The README's and the docs' code runs, and CI runs exactly the README's test command."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (f"{page.relative_to(ROOT)} block {index}", block)
    for page in PAGES
    for index, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]


@pytest.mark.parametrize("name, block", BLOCKS, ids=[name for name, _ in BLOCKS])
def test_documented_python_blocks_run(name, block):
    exec(compile(block, name, "exec"), {})


def test_ci_runs_the_readme_test_command():
    setup = re.search(r"## Set-up.*?```bash\n(.*?)```", README, flags=re.S).group(1)
    commands = [line for line in setup.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, "the set-up is two commands: main job, tests"
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == commands[1]
    assert "torch==2.13.0" in commands[0] and "torch==2.13.0" in " ".join(ci_lines)


def test_the_folders_the_readmes_commands_write_are_ignored_by_git():
    """`--out runs/...` and `mhmoe data prepare ... --out data` write into the clone; the package's own data/ is
    source."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = ["runs/tiny/config.json", "data/english/train.txt.gz"]
    kept = ["src/mhmoe/data/corpus.py", "src/mhmoe/data/new_module.py", "results/english/README.md"]
    for path in ignored + kept:
        status = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode
        assert status == (0 if path in ignored else 1), path
