"""The wheel: templates and static files ship inside the package, and a NON-editable install in a fresh
venv renders pages from its own copy (not from this checkout)."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "README.md", "nanochat_studio", "trainer", "templates", "static"]

CHECK = r"""
import sys, tempfile
from pathlib import Path
import nanochat_studio
from nanochat_studio.app import create_app, resource_dir
from nanochat_studio.settings import load_settings

pkg = Path(nanochat_studio.__file__).parent
assert "site-packages" in str(pkg), pkg
assert resource_dir("templates") == pkg / "templates", resource_dir("templates")
assert (pkg / "templates" / "base.html").is_file() and (pkg / "static" / "css" / "app.css").is_file()
app = create_app(load_settings(environ={"NCS_HOME": tempfile.mkdtemp()}))
client = app.test_client()
page = client.get("/")
assert page.status_code == 200 and "nanochat" in page.get_data(as_text=True), page.status_code
assert client.get("/static/css/app.css").status_code == 200
assert client.get("/account/login", environ_base={"REMOTE_ADDR": "203.0.113.7"}).status_code == 200
assert "torch" not in sys.modules
print("OK", pkg)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the sources, so the build leaves nothing in the checkout."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(out), str(src)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("nanochat_studio-*.whl")
    return built


def test_the_wheel_carries_templates_static_and_the_console_script(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("nanochat_studio/templates/base.html", "nanochat_studio/templates/index.html",
                 "nanochat_studio/templates/errors/error.html", "nanochat_studio/static/css/app.css",
                 "nanochat_studio/static/js/util.js", "nanochat_studio/views/pages.py", "trainer/progress.py",
                 "trainer/decode_one.c"):
        assert path in names, path
    tracked = subprocess.run(["git", "ls-files", "templates", "static"], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    for path in tracked:  # every committed template and static file ships
        assert f"nanochat_studio/{path}" in names, path
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "nanochat-studio = nanochat_studio.cli:main" in text
    assert not any(n.startswith(("tests/", "templates/", "static/")) for n in names)


def test_a_non_editable_install_in_a_fresh_venv_renders_pages(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # The dependencies come from this interpreter's site-packages (a path line in a .pth file: the
    # .pth files *there*, such as an editable install's finder, are not run, so only the wheel's copy of
    # nanochat_studio can be imported).
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    parents = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    Path(purelib, "_ncs_test_deps.pth").write_text("\n".join(sorted(parents)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NCS_", "PYTHON"))}
    result = subprocess.run([str(python), "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout and str(venv) in result.stdout
    help_text = subprocess.run([str(venv / "bin" / "nanochat-studio"), "--help"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0 and "serve" in help_text.stdout
