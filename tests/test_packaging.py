"""The wheel users install holds the whole package: every module and data file under src/mhmoe (the shipped text
included), its version, requirements and the `mhmoe` command. The full check (sdist and wheel by `python -m build`,
`twine check`, an install into a fresh environment that runs the CLI and the README's snippet) is .ci/check_package.
"""

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import mhmoe

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "mhmoe"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """A wheel built from a copy of the sources (the build writes build/ and egg-info beside them), without build
    isolation: setuptools from the dev extra, nothing downloaded."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(ROOT / name, source / name)
    command = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"), str(source)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = (tmp / "dist").glob("mhmoe-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_holds_every_file_of_the_package_and_nothing_else(wheel):
    package_files = {
        "mhmoe/" + path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    names = set(wheel.namelist())
    assert {"mhmoe/data/texts/udhr-de.txt", "mhmoe/data/texts/README.md", "mhmoe/py.typed"} <= package_files
    assert package_files - names == set(), "files of src/mhmoe missing from the wheel (add them to package-data)"
    dist_info = f"mhmoe-{mhmoe.__version__}.dist-info/"
    assert {name for name in names - package_files if not name.startswith(dist_info)} == set()
    assert wheel.read("mhmoe/data/texts/udhr-de.txt") == (PACKAGE / "data" / "texts" / "udhr-de.txt").read_bytes()


def test_the_wheel_metadata_names_the_version_requirements_and_command(wheel):
    dist_info = f"mhmoe-{mhmoe.__version__}.dist-info/"
    metadata = Parser().parsestr(wheel.read(dist_info + "METADATA").decode())
    assert metadata["Name"] == "mhmoe" and metadata["Version"] == mhmoe.__version__
    requires = metadata.get_all("Requires-Dist")
    assert any(r.startswith("torch>=") for r in requires) and any(r.startswith("numpy>=") for r in requires)
    assert {"train", "hf", "triton", "datasets", "dev", "docs"} <= set(metadata.get_all("Provides-Extra"))
    assert metadata["License-Expression"] == "MIT" and dist_info + "licenses/LICENSE" in wheel.namelist()
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert "mhmoe = mhmoe.cli:main" in wheel.read(dist_info + "entry_points.txt").decode()
