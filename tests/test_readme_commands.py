"""Every command in README.md's ```bash blocks runs here, as the README writes it, at a small size.

The commands are parsed from the README (continuation lines joined, `&&` split), so an edited command is the
command tested. Each is looked up verbatim in SMALL: the arguments appended to make it small (argparse keeps
the last value of an option), what its output must show, or why it runs as `--help` only. A README command
with no entry fails, naming it; an entry no longer in the README fails too. A command whose comment says
`# needs: A, B` (official checkpoints, ImageNet, CUDA) must fail with rc != 0 and an error naming one of them,
not with a traceback from the project. The ```python blocks: the example variant runs in tests/test_readme.py,
every other one must say what it needs and fails the same way.

Commands run in order in one temporary workspace that mirrors the repository (symlinks; results/benchmarks
copied, since the speed gate's --update writes there), with $VARBENCH_CACHE inside it. Checks are on keys and
headers, never on measured numbers.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHARED = ROOT.parent / "shared"
_NOT_MIRRORED = ("runs", "results", "build")
PROJECT_FRAME = re.compile(r'File "[^"]*/(harness|variants|kernels)/')  # a traceback through our code


@dataclass(frozen=True)
class Small:
    """How the doc-test runs one README command."""

    append: str = ""  # arguments appended (small sizes)
    replace: tuple[tuple[str, str], ...] = ()  # (old, new) applied to the command first
    stdout: tuple[str, ...] = ()  # substrings the output must contain
    json_keys: tuple[str, ...] = ()  # the output's JSON object (the first `{` to its end) has these keys
    files: tuple[str, ...] = ()  # files the command must leave in the workspace
    help_only: str = ""  # why it cannot run here: it runs with --help and every option used must be listed
    slow: str = ""  # why it is marked slow (still run by `pytest -m slow`)


_RUN_SMALL = ("--set quality.num_samples=16 --set quality.block_size=8 --set quality.bootstrap=10 "
              "--set speed.repeats=1 --set speed.warmup=0 --set speed.batch_sizes=[2]")
_BENCH_SMALL = "--batch 1 --repeats 1 --warmup 0"
_BENCH_KEYS = ("weights", "images_per_s", "latency_ms_per_scale", "vae_decode_ms", "peak_memory_bytes", "kv_bytes")
_SPEED_TABLE = "Speed (p50 ± IQR over repeats; warm-up excluded)"

# README command (verbatim, comment stripped) -> how it runs here. Order does not matter; the README's does.
SMALL: dict[str, Small] = {
    'pip install ".[dev]"': Small(
        replace=(('".[dev]"', "--no-deps --no-build-isolation --no-index --target site ."),),
        files=("site/varbench/harness/core/records.py", "site/varbench/variants/zoo/manifest.json")),
    "varbench run": Small(
        append="--variants var_zoo_d5 " + _RUN_SMALL + " --out runs/quick",
        stdout=(_SPEED_TABLE, "Quality ([95% bootstrap interval]", "| variant", "FID", "ΔFID vs baseline"),
        files=("runs/quick/records.jsonl", "runs/quick/table.md")),
    "pytest": Small(append="--collect-only -q tests/test_records.py", stdout=("tests collected",)),
    "varbench list 'var_zoo*'": Small(stdout=("| name", "var_zoo_d5", "defined in")),
    "varbench bench --variant var_zoo_d5 --batch 4 --out runs/bench-zoo": Small(
        append=_BENCH_SMALL, json_keys=_BENCH_KEYS, files=("runs/bench-zoo/records.jsonl",)),
    "varbench table runs/bench-zoo": Small(stdout=(_SPEED_TABLE, "var_zoo_d5", "- git: ")),
    "varbench table results/default_zoo --format csv": Small(stdout=("variant,", "table")),
    "varbench fit results/zoo_scaling --x params --y fid": Small(stdout=("fid = ", "alpha", "R²")),
    "varbench reproduce --list": Small(stdout=("| id", "var_zoo", "code_table1")),
    "varbench reproduce var_zoo --measured results/zoo_scaling": Small(stdout=("## VAR model zoo", "| row")),
    "varbench train var --out runs/var_d2 --steps 200 --depth 2 --vqvae variants/zoo/vqvae.pt": Small(
        append="--steps 3 --num-train 16 --num-heldout 8 --batch-size 8 --no-progress",
        json_keys=("kind", "step", "heldout_ce", "vqvae"),
        files=("runs/var_d2/model.pt", "runs/var_d2/summary.json")),
    "varbench conformance ../shared/conformance/var_d2": Small(
        json_keys=("checks",), slow="replays every official var_d2 output (~80 s); tests/test_conformance.py too"),
    "varbench env": Small(json_keys=("git_sha", "git_dirty", "install", "varbench", "torch", "device")),
    "varbench bench --variant var_d16 --weights /path/to/var_d16.pth --batch 64 --precision bf16 --device cuda":
        Small(),
    "varbench bench --variant var_zoo_d5 --kv-policy scalekv --kv-args '{\"budget\": 0.1}'": Small(
        append=_BENCH_SMALL, json_keys=(*_BENCH_KEYS, "kv_policy", "kv_args", "kv_calibration")),
    "varbench bench --variant var_zoo_d5 --kv-policy snapkv --kv-args '{\"budget\": 0.1, \"window\": 16}'": Small(
        append=_BENCH_SMALL, json_keys=(*_BENCH_KEYS, "kv_policy", "kv_args")),
    "varbench train zoo --out runs/zoo --export": Small(
        help_only="retrains nine models (~76 min) and overwrites the shipped zoo"),
    "torchrun --nproc_per_node 8 -m varbench.harness.train var --preset imagenet256 --depth 16 --device cuda "
    "--data /path/to/imagenet --vqvae /path/to/vae_ch160v4096z32.pth --batch-size 768 --workers 8 --steps 333638 "
    "--lr 3e-4 --weight-decay 0.05 --beta1 0.9 --beta2 0.95 --out runs/var_d16_in256": Small(
        replace=(("--nproc_per_node 8", "--nproc_per_node 1"),)),  # one process fails as eight would
    "pytest tests/speed -m speed --benchmark-json=bench.json": Small(
        append="-k 'reference_vector or sampler_top_k_top_p'", files=("bench.json",),
        slow="speed benchmarks (.ci/run runs them all)"),
    "python -m varbench.harness.run.speedgate bench.json --update --expected results/benchmarks/expected.json":
        Small(stdout=("expected ratios to results/benchmarks/expected.json",),  # the workspace's copy
              slow="needs the speed benchmarks' bench.json"),
}


@dataclass(frozen=True)
class Command:
    text: str  # as the README writes it, comment stripped, continuation lines joined
    needs: tuple[str, ...]  # from a `# needs: A, B` comment
    line: int


def readme_blocks(kind: str) -> list[tuple[int, str]]:
    """(first line number, body) of every ```kind block of the README."""
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(rf"^```{kind}\n(.*?)^```", text, re.S | re.M)]


def _needs(comment: str) -> tuple[str, ...]:
    match = re.search(r"needs:\s*(.+)", comment)
    return tuple(n.strip() for n in match.group(1).split(",")) if match else ()


def readme_commands() -> list[Command]:
    commands = []
    for first, body in readme_blocks("bash"):
        lines, start = body.splitlines(), None
        joined = ""
        for i, line in enumerate(lines):
            start = first + i if not joined else start
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1].strip() + " "
                continue
            joined += line.strip()
            code, _, comment = joined.partition(" #")  # no README command has " #" inside quotes
            code, joined = code.strip(), ""
            if not code:
                continue
            for part in code.split(" && "):
                commands.append(Command(re.sub(r"\s+", " ", part.strip()), _needs(comment), start))
    return commands


COMMANDS = readme_commands()


def test_every_readme_command_has_an_entry_and_every_entry_a_command():
    texts = [c.text for c in COMMANDS]
    missing = [f"README.md:{c.line}: {c.text}" for c in COMMANDS if c.text not in SMALL]
    assert not missing, ("README commands without an entry in tests/test_readme_commands.py SMALL (add how to "
                         "run each at a small size):\n" + "\n".join(missing))
    stale = [text for text in SMALL if text not in texts]
    assert not stale, "SMALL entries no longer in the README (update them):\n" + "\n".join(stale)
    for name in ("varbench run", "pytest", "varbench env"):  # the quick start and the basics stay covered
        assert name in texts


def _param(c: Command):
    small = SMALL.get(c.text, Small())
    marks = [pytest.mark.slow] if small.slow else []
    return pytest.param(c, id=f"L{c.line}:{c.text[:60]}", marks=marks)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A mirror of the repository (symlinks; results/benchmarks copied), with ../shared beside it."""
    root = tmp_path_factory.mktemp("readme")
    ws = root / "repo"
    ws.mkdir()
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name in _NOT_MIRRORED or entry.name.endswith(".egg-info"):
            continue  # hidden, outputs, build folders: pip's in-tree build must not write into the repository
        (ws / entry.name).symlink_to(entry)
    (ws / "results").mkdir()
    for entry in (ROOT / "results").iterdir():
        if entry.name == "benchmarks":
            shutil.copytree(entry, ws / "results" / "benchmarks")
        else:
            (ws / "results" / entry.name).symlink_to(entry)
    if SHARED.is_dir():
        (root / "shared").symlink_to(SHARED)
    return ws


def _env(ws: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VARBENCH_DOWNLOAD", "VARBENCH_ZOO")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's scripts
    env["VARBENCH_CACHE"] = str(ws / ".cache")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _argv(command: Command, small: Small) -> list[str]:
    text = command.text
    for old, new in small.replace:
        assert old in text, f"SMALL entry of {command.text!r}: {old!r} is not in it"
        text = text.replace(old, new)
    argv = shlex.split(text) + shlex.split(small.append)
    if small.help_only:
        argv = argv[:3] + ["--help"]  # `varbench train zoo --help`: the subcommand's own help
    if argv[0] == "python":
        argv[0] = sys.executable
    return argv


def _json_object(stdout: str) -> dict:
    start = stdout.find("{")
    assert start >= 0, f"no JSON object in the output:\n{stdout[-2000:]}"
    return json.loads(stdout[start:])


@pytest.mark.parametrize("command", [_param(c) for c in COMMANDS])
def test_readme_command_runs_at_a_small_size(command: Command, workspace: Path):
    small = SMALL.get(command.text)
    if small is None:
        pytest.fail(f"README.md:{command.line}: `{command.text}` has no entry in SMALL "
                    "(tests/test_readme_commands.py): add how to run it at a small size")
    if "../shared" in command.text and not SHARED.is_dir():
        pytest.skip(f"{SHARED} (the official reference outputs) is absent")
    argv = _argv(command, small)
    out = subprocess.run(argv, cwd=workspace, env=_env(workspace), capture_output=True, text=True, timeout=600)
    (workspace / ".outputs").mkdir(exist_ok=True)
    (workspace / ".outputs" / f"L{command.line}.txt").write_text(out.stdout)  # for the checks below
    shown = (f"$ {shlex.join(argv)}\nrc {out.returncode}\nstdout:\n{out.stdout[-3000:]}\n"
             f"stderr:\n{out.stderr[-3000:]}")
    assert not PROJECT_FRAME.search(out.stderr), f"a traceback through the project:\n{shown}"
    if command.needs:  # it cannot run here: it must say what it lacks
        assert out.returncode != 0, f"marked `needs: {', '.join(command.needs)}` but succeeded:\n{shown}"
        named = [n for n in command.needs if n.lower() in out.stderr.lower()]
        assert named, f"the error names none of {command.needs}:\n{shown}"
        return
    assert out.returncode == 0, shown
    if small.help_only:
        options = [a.split("=")[0] for a in shlex.split(command.text) if a.startswith("--")]
        assert all(o in out.stdout for o in options), f"an option of the README is not in --help:\n{shown}"
        return
    for text in small.stdout:
        assert text in out.stdout + out.stderr, f"{text!r} not shown:\n{shown}"
    if small.json_keys:
        found = _json_object(out.stdout)
        assert set(small.json_keys) <= set(found), f"JSON keys missing: {set(small.json_keys) - set(found)}"
    for name in small.files:
        assert (workspace / name).is_file(), f"{name} not written:\n{shown}"


def test_zoo_bench_commands_ran_and_name_the_zoo_weights(workspace: Path):
    """The bench JSON says which weights ran (issue 13, item 17); for var_zoo_d5 they are the zoo's files."""
    benches = [c for c in COMMANDS if c.text.startswith("varbench bench --variant var_zoo_d5")]
    outputs = [workspace / ".outputs" / f"L{c.line}.txt" for c in benches]
    if not benches or not all(o.is_file() for o in outputs):
        pytest.skip("runs after test_readme_command_runs_at_a_small_size, on its outputs")
    for output in outputs:
        assert _json_object(output.read_text())["weights"].startswith("zoo:var_d5 (sha256 ")


def test_python_blocks_run_or_say_what_they_need(workspace: Path):
    """The example variant is tests/test_readme.py's; every other python block must fail naming its needs."""
    blocks = [(line, body) for line, body in readme_blocks("python") if "example_late_unguided" not in body]
    assert blocks, "the README lost its real-checkpoint example"
    for line, body in blocks:
        needs = _needs(body.splitlines()[0])
        assert needs, f"README.md:{line}: a python block without `# needs:` must run in a test instead"
        out = subprocess.run([sys.executable, "-c", body], cwd=workspace, env=_env(workspace),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode != 0 and any(n.lower() in out.stderr.lower() for n in needs), out.stderr[-2000:]
        assert "CheckpointError" in out.stderr or "CUDA" in out.stderr, out.stderr[-2000:]
