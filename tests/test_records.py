"""Records append whole lines; a line cut short by a crash is skipped on load. Provenance names the code's
version and commit wherever it runs from (a clone, an editable install, a copy installed from a clone or VCS)."""

import base64
import hashlib
import json
import subprocess
from importlib.metadata import PathDistribution
from pathlib import Path

import pytest
from varbench.harness.core.records import (
    append_record,
    capture_env,
    code_version,
    config_hash,
    load_records,
)


def test_append_and_load_skip_a_truncated_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    for i in range(3):
        append_record(path, {"id": i, "metrics": {"x": i / 3}})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 9])  # the last append was interrupted
    assert [r["id"] for r in load_records(path)] == [0, 1]
    append_record(path, {"id": 3})  # appending after a broken line still yields readable records
    assert [r["id"] for r in load_records(tmp_path)] == [0, 1, 3]


def test_env_and_config_hash():
    env = capture_env("cpu")
    assert env["torch"] and env["device"] == "cpu" and "git_dirty" in env
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True,
                   capture_output=True)


def _sha256_b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _installed_copy(tmp_path, direct_url: dict | None):
    """A git clone `src` (package-dir varbench.harness = harness) and pip's record of a copy installed from it."""
    src, site = tmp_path / "src", tmp_path / "site"
    (src / "harness").mkdir(parents=True)
    (src / "pyproject.toml").write_text('[tool.setuptools.package-dir]\n"varbench.harness" = "harness"\n')
    code = b"x = 1\n"
    (src / "harness" / "a.py").write_bytes(code)
    _git(src, "init", "-q")
    _git(src, "add", "-A")
    _git(src, "commit", "-qm", "one")
    info = site / "varbench-0.1.0.dist-info"
    (site / "varbench" / "harness").mkdir(parents=True)
    info.mkdir()
    (info / "METADATA").write_text("Name: varbench\nVersion: 0.1.0\n")
    (info / "RECORD").write_text(f"varbench/harness/a.py,sha256={_sha256_b64(code)},{len(code)}\n")
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url).replace("SRC", src.as_uri()))
    sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=src, capture_output=True,
                         text=True).stdout.strip()
    return src, site / "varbench" / "harness", PathDistribution(info), sha


def test_an_installed_copy_reports_its_source_clone_commit_and_whether_it_still_matches(tmp_path):
    src, package_dir, dist, sha = _installed_copy(tmp_path, {"url": "SRC", "dir_info": {}})
    info = code_version(package_dir, dist)
    assert (info["git_sha"], info["git_dirty"], info["install"]) == (sha, False, "copy")
    assert info["git_source"] == str(src) and "match" in info["git_note"]
    (src / "harness" / "a.py").write_text("x = 2\n")  # the clone moved on: HEAD is no longer what runs
    _git(src, "commit", "-qam", "two")
    info = code_version(package_dir, dist)
    assert info["git_dirty"] is True and "differs from its source in 1 file(s)" in info["git_note"]
    assert "varbench/harness/a.py" in info["git_note"]


def test_commit_of_a_vcs_install_and_reasons_when_there_is_none(tmp_path):
    vcs = {"url": "https://github.com/o/varbench", "vcs_info": {"vcs": "git", "commit_id": "a" * 40}}
    _, package_dir, dist, _ = _installed_copy(tmp_path / "vcs", vcs)
    info = code_version(package_dir, dist)
    assert (info["git_sha"], info["git_dirty"]) == ("a" * 12, False)
    assert info["git_source"].startswith("https://github.com/o/varbench@")
    _, package_dir, wheel, _ = _installed_copy(tmp_path / "wheel", None)
    info = code_version(package_dir, wheel)
    assert info["git_sha"] is None and "wheel or an index" in info["git_note"]
    info = code_version(package_dir, None)
    assert info["git_sha"] is None and info["install"] == "not installed" and "not inside a git clone" in info["git_note"]


def test_this_checkout_reports_its_head_from_the_package_location_not_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a clone: the sha must still come from where the package lies
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
                          capture_output=True, text=True).stdout.strip()
    if not head:
        pytest.skip("the tests do not lie in a git clone")
    env = capture_env("cpu")
    assert env["git_sha"] == head and env["varbench"] and env["install"] in ("editable", "not installed", "copy")


def test_a_regenerated_result_does_not_mark_the_code_dirty_but_a_code_change_does(tmp_path):
    from varbench.harness.core.records import _clone_state

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "pkg").mkdir()
    (tmp_path / "results" / "table.md").write_text("old\n")
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    (tmp_path / "results" / "table.md").unlink()  # a study regenerating its committed folder
    assert _clone_state(tmp_path / "pkg")["git_dirty"] is False
    (tmp_path / "pkg" / "code.py").write_text("x = 2\n")
    assert _clone_state(tmp_path / "pkg")["git_dirty"] is True
