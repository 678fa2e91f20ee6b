"""`varbench train` is honest (issue 13, items 13 and 15): var/hmar never train on a random tokenizer unless
asked to, --help names the zoo build and documents every option, and the phases before the first step
(rendering, tokenisation) show progress, as sparse plain lines when stderr is a log file."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from varbench.harness.cli import main as cli
from varbench.harness.eval.synthetic import make_dataset
from varbench.harness.train import TrainConfig
from varbench.harness.train.progress import bar
from varbench.harness.train.tasks import _images
from varbench.harness.train.command import _parser
from varbench.variants.zoo import zoo_dir

TINY = ["--preset", "tiny", "--steps", "1", "--batch-size", "4", "--num-train", "8", "--num-heldout", "4",
        "--threads", "1"]


def _exit(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as err:
        cli(argv)
    out = capsys.readouterr()
    return err.value.code, out.out, out.err


@pytest.mark.parametrize("kind", ["var", "hmar"])
def test_var_without_vqvae_refused(kind, tmp_path, capsys):
    code, _, err = _exit(["train", kind, "--out", str(tmp_path / "run"), *TINY], capsys)
    assert code == 2
    assert f"{kind} trains on a frozen tokenizer's tokens: pass --vqvae PATH" in err
    assert str(zoo_dir() / "vqvae.pt") in err and "variants/zoo/vqvae.pt" in err and "--random-vqvae" in err
    assert not (tmp_path / "run").exists()  # refused before anything ran


@pytest.mark.parametrize("extra, message", [
    (["var", "--random-vqvae", "--vqvae", "v.pt"], "either --vqvae PATH or --random-vqvae, not both"),
    (["classifier", "--random-vqvae"], "--random-vqvae applies to kinds var and hmar, not classifier"),
    (["var", "--vqvae", "missing.pt"], "--vqvae missing.pt: no such file"),
    (["var", "--random-vqvae", "--init", "missing.pt"], "--init missing.pt: no such file"),
])
def test_tokenizer_flag_misuse_refused(extra, message, tmp_path, capsys):
    code, _, err = _exit(["train", *extra, "--out", str(tmp_path / "run"), *TINY], capsys)
    assert code == 2 and message in err


def test_help_lists_zoo_and_every_option(capsys):
    code, out, _ = _exit(["train", "--help"], capsys)
    assert code == 0 and out.startswith("usage: varbench train ")
    assert "python -m" not in out
    assert "zoo" in out.split("positional arguments:")[1].split("options:")[0]  # among the kinds
    assert "varbench train zoo --out runs/zoo --export" in out
    undocumented = [a.option_strings or a.dest for a in _parser()._actions if not a.help]
    assert undocumented == []


def test_zoo_help_through_train(capsys):
    code, out, _ = _exit(["train", "zoo", "--help"], capsys)
    assert code == 0 and out.startswith("usage: varbench train zoo ") and "--export" in out


def test_random_vqvae_run_shows_every_phase(tmp_path, capsys):
    """A smoke run with the explicit flag trains, records the random tokenizer, and prints its phases as
    whole lines (stderr is not a terminal under pytest)."""
    assert cli(["train", "var", "--random-vqvae", "--out", str(tmp_path / "run"), *TINY]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert summary["vqvae"] == "random (seed 1)" and summary["finished"] is True
    for phase in ("render training images", "render held-out images", "tokenize training images",
                  "tokenize held-out images", "train var"):
        assert phase in out.err
    assert "\r" not in out.err
    assert "tokenize training images: 100%" in out.err and "8/8" in out.err


def test_log_progress_is_sparse():
    """In a log, tqdm prints its first line at once, then at most one line per interval, and the final count."""
    stream = io.StringIO()
    with bar(5000, "tokenize training images", "img", stream=stream) as shown:
        for _ in range(5000):
            shown.update(1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue()
    assert lines[0].startswith("tokenize training images:   0%") and "0/5000" in lines[0]
    assert lines[1].startswith("tokenize training images: 100%") and "5000/5000" in lines[1]
    silent = io.StringIO()
    with bar(10, "x", "img", enabled=False, stream=silent) as shown:
        shown.update(10)
    assert silent.getvalue() == ""


def test_chunked_rendering_is_the_same_data(capsys):
    """Rendering in chunks (for the progress bar) gives exactly the images of one make_dataset call."""
    cfg = TrainConfig("vqvae", "unused", steps=1, num_train=2300, data_seed=3)
    images, labels = _images(cfg, heldout=False, progress=True)
    whole, whole_labels = make_dataset(2300, seed=3, size=64)
    np.testing.assert_array_equal(images.numpy(), whole)
    np.testing.assert_array_equal(labels.numpy(), whole_labels)
    assert "render training images: 100%" in capsys.readouterr().err

