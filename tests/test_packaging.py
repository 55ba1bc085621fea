"""A non-editable install (`pip install .`) ships what serving reads from disk
(the review page, the audit migrations), py.typed and the shipped plugins as
wsgate_plugins, with no top-level `plugins` package, and setuptools builds it
without warning about a data directory missing from `packages`."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_ships_the_data_files_and_builds_without_setuptools_warnings(tmp_path):
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--", "wsgate", "plugins", "setup.cfg",
                            "pyproject.toml", "README.md"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():  # a file deleted in the work tree is not shipped
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
         "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    output = built.stdout + built.stderr
    assert "is absent from the `packages` configuration" not in output, output
    (wheel,) = (tmp_path / "dist").glob("wsgate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for static in (ROOT / "wsgate" / "static").iterdir():
        assert f"wsgate/static/{static.name}" in names
    for needed in ("wsgate/py.typed", "wsgate/audit/migrations/alembic.ini",
                   "wsgate/audit/migrations/script.py.mako", "wsgate/audit/migrations/env.py",
                   "wsgate_plugins/jwt.py", "wsgate_plugins/static.py"):
        assert needed in names, needed
    versions = [n for n in names if n.startswith("wsgate/audit/migrations/versions/")]
    assert len(versions) >= 2, versions
    assert not [n for n in names if n.startswith("plugins/")]
