"""Records append whole lines; a line cut short by a crash is skipped on load."""

from varbench.harness.core.records import append_record, capture_env, config_hash, load_records


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
