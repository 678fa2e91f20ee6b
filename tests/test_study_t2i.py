"""Text-to-image cells in a study: the prompt set drives the variant, and CLIP scores each image against the
prompt its label indexes (harness/run/text.py)."""

import numpy as np
import pytest

from varbench.harness.core.records import load_records
from varbench.harness.run.cells import check_names
from varbench.harness.run.config import parse_study
from varbench.harness.run.study import run_study

pytest.importorskip("transformers")  # the tiny T5 and CLIP are transformers models (extra `t2i`, in `dev`)

STUDY = {"study": "t2i", "variants": ["test_infinity", "test_var"], "device": "cpu", "threads": 2,
         "engine": {"precision": "fp32"}, "speed": False,
         "quality": {"num_samples": 6, "block_size": 3, "metrics": ["fid", "clip"], "extractor": "varbench-cnn",
                     "reference": "synthetic", "bootstrap": 10, "consistency": False,
                     "prompts": "synthetic_captions", "clip_model": "test-clip"}}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))


def test_a_text_to_image_cell_is_driven_by_the_prompt_set_and_clip_scored_against_its_prompts(tmp_path):
    from varbench.harness.eval.clip_score import clip_score, tiny_clip_embedder
    from varbench.harness.eval.prompts import load_prompt_set

    run_study(parse_study(STUDY), tmp_path)
    quality = {r["label"]: r for r in load_records(tmp_path / "records.jsonl") if r["kind"] == "quality"}
    t2i, c2i = quality["test_infinity full"], quality["test_var full"]
    with np.load(t2i["samples"]) as saved:
        images, labels = saved["arr_0"], saved["labels"]
    assert labels.tolist() == [0, 1, 2, 3, 4, 5]  # six prompts, one per sample: the labels index them
    prompts = load_prompt_set("synthetic_captions").prompts[:6]
    expected = clip_score(images, [prompts[i] for i in labels], tiny_clip_embedder(), bootstrap=10, seed=0)
    assert t2i["metrics"]["clip_score"] == pytest.approx(expected["clip_score"], abs=1e-6)
    assert t2i["metrics"]["clip_score_n"] == 6 and t2i["quality"]["clip_model"] == "test-clip-0"
    assert np.isfinite(t2i["metrics"]["fid"])
    assert "clip_score" not in c2i["metrics"] and np.isfinite(c2i["metrics"]["fid"])  # class-conditional: no prompts


def test_prompt_settings_are_checked_before_anything_is_sampled():
    with pytest.raises(ValueError, match="names no prompt set"):
        parse_study({**STUDY, "quality": {**STUDY["quality"], "prompts": None}})
    with pytest.raises(ValueError, match="no variant of this study takes prompts"):
        check_names(parse_study({**STUDY, "variants": ["test_var"]}))
    with pytest.raises(KeyError, match="synthetic_captions"):
        check_names(parse_study({**STUDY, "quality": {**STUDY["quality"], "prompts": "synthetic_caption"}}))
    with pytest.raises(FileNotFoundError, match="coco30k"):
        check_names(parse_study({**STUDY, "quality": {**STUDY["quality"], "prompts": "coco30k",
                                                      "prompts_path": "/nonexistent/captions_val2014.json"}}))
