"""Prompt sets: each file format read from a small file written here, the named sets' missing-file errors (the
file and the URL are named), path resolution by argument, env variable and folder, and subset determinism."""

from __future__ import annotations

import json

import pytest
from varbench.harness.eval import prompts as pr
from varbench.harness.eval.synthetic import CLASSES


def test_txt_skips_blank_lines_and_comments(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# a comment\na cat\n\n   \n  a dog on a sofa  \n  # indented comment\nthe sea\n")
    ps = pr.read_prompt_file(f)
    assert ps.prompts == ["a cat", "a dog on a sofa", "the sea"]
    assert ps.name == "p" and ps.images is None and ps.metadata is None


def test_jsonl_keeps_geneval_fields(tmp_path):
    rows = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
            {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
             "prompt": "a photo of a cat and a dog"}]
    f = tmp_path / "evaluation_metadata.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ps = pr.load_prompt_set("geneval", path=f)
    assert ps.name == "geneval" and ps.prompts == ["a photo of a bench", "a photo of a cat and a dog"]
    assert ps.metadata[1] == {"tag": "two_object", "include": [{"class": "cat", "count": 1},
                                                                {"class": "dog", "count": 1}]}


def test_jsonl_without_prompt_names_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no \"prompt\" key"):
        pr.read_jsonl(f)


def test_coco_json_first_caption_per_image_in_image_order(tmp_path):
    data = {"images": [{"id": 7, "file_name": "COCO_val2014_7.jpg"}, {"id": 3, "file_name": "COCO_val2014_3.jpg"},
                       {"id": 9, "file_name": "no_caption.jpg"}],
            "annotations": [{"image_id": 3, "caption": "three, first"}, {"image_id": 7, "caption": " seven, first "},
                            {"image_id": 3, "caption": "three, second"}, {"image_id": 7, "caption": "seven, second"}]}
    f = tmp_path / "captions_val2014.json"
    f.write_text(json.dumps(data))
    ps = pr.read_prompt_file(f, image_root="/data/val2014")
    assert ps.prompts == ["seven, first", "three, first"]
    assert ps.images == ["/data/val2014/COCO_val2014_7.jpg", "/data/val2014/COCO_val2014_3.jpg"]
    assert ps.metadata == [{"image_id": 7}, {"image_id": 3}]
    # coco30k keeps all when the file has fewer than 30k images, and reads the file given by folder
    assert pr.load_prompt_set("coco30k", path=tmp_path).prompts == ps.prompts


def test_mjhq_meta_data_json(tmp_path):
    data = {"abc": {"category": "people", "prompt": "a portrait"}, "def": {"category": "food", "prompt": "soup"}}
    f = tmp_path / "meta_data.json"
    f.write_text(json.dumps(data))
    ps = pr.load_prompt_set("mjhq30k", path=f, image_root="imgs")
    assert ps.prompts == ["a portrait", "soup"] and ps.images == ["imgs/people/abc.jpg", "imgs/food/def.jpg"]
    assert ps.metadata == [{"image_id": "abc", "category": "people"}, {"image_id": "def", "category": "food"}]


def test_unknown_json_shape_is_rejected(tmp_path):
    f = tmp_path / "x.json"
    f.write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="neither COCO captions"):
        pr.read_json(f)


def test_csv_prompt_or_caption_column(tmp_path):
    f = tmp_path / "mjhq.csv"
    f.write_text("image,prompt,category\na.jpg,a red car,vehicles\nb.jpg,\"a cat, sleeping\",animals\n")
    ps = pr.read_prompt_file(f)
    assert ps.prompts == ["a red car", "a cat, sleeping"] and ps.images == ["a.jpg", "b.jpg"]
    assert ps.metadata == [{"category": "vehicles"}, {"category": "animals"}]
    g = tmp_path / "generic.csv"
    g.write_text("caption\nfirst\nsecond\n")
    gs = pr.read_prompt_file(g)
    assert gs.prompts == ["first", "second"] and gs.images is None and gs.metadata is None
    h = tmp_path / "bad.csv"
    h.write_text("text\nx\n")
    with pytest.raises(ValueError, match="'prompt' or 'caption' column"):
        pr.read_prompt_file(h)


@pytest.mark.parametrize("name, filename, url", [
    ("coco30k", "captions_val2014.json", "images.cocodataset.org/annotations/annotations_trainval2014.zip"),
    ("mjhq30k", "meta_data.json", "huggingface.co/datasets/playgroundai/MJHQ-30K"),
    ("geneval", "evaluation_metadata.jsonl", "github.com/djghosh13/geneval"),
])
def test_missing_path_names_set_file_env_and_url(name, filename, url, monkeypatch, tmp_path):
    env = f"VARBENCH_PROMPTS_{name.upper()}"
    monkeypatch.delenv(env, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        pr.load_prompt_set(name)
    for part in (repr(name), filename, "$" + env, url):
        assert part in str(err.value)
    with pytest.raises(FileNotFoundError, match=f"file not found: {tmp_path / 'nope'}.*{filename}"):
        pr.load_prompt_set(name, path=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"no {filename} under"):
        pr.load_prompt_set(name, path=tmp_path)  # an empty folder


def test_env_variable_resolves_the_path(monkeypatch, tmp_path):
    f = tmp_path / "evaluation_metadata.jsonl"
    f.write_text('{"prompt": "a photo of a zebra", "tag": "single_object"}\n')
    monkeypatch.setenv("VARBENCH_PROMPTS_GENEVAL", str(f))
    assert pr.load_prompt_set("geneval").prompts == ["a photo of a zebra"]


def test_registry_lists_the_sets_and_suggests_names():
    assert {"coco30k", "mjhq30k", "geneval", "synthetic_captions"} <= set(pr.PROMPT_SETS.list())
    with pytest.raises(KeyError, match="Did you mean: geneval"):
        pr.load_prompt_set("genevall")


def test_synthetic_captions_cover_every_class():
    ps = pr.load_prompt_set("synthetic_captions")
    assert len(ps) == 2 * len(CLASSES) and len(set(ps.prompts)) == len(ps)
    assert ps.prompts[0] == "a red disc" and ps.prompts[len(CLASSES)] == "a picture of a red disc, centred"
    assert [m["label"] for m in ps.metadata] == list(range(len(CLASSES))) * 2
    assert all(m["class"] == CLASSES[m["label"]] for m in ps.metadata)


def test_subset_is_deterministic_sorted_and_without_repeats():
    ps = pr.PromptSet("n", [f"p{i}" for i in range(100)], images=[f"{i}.png" for i in range(100)],
                      metadata=[{"i": i} for i in range(100)])
    a, b, c = ps.subset(10, seed=1), ps.subset(10, seed=1), ps.subset(10, seed=2)
    assert a.prompts == b.prompts and a.prompts != c.prompts
    idx = [int(p[1:]) for p in a.prompts]
    assert idx == sorted(set(idx)) and len(idx) == 10
    assert a.images == [f"{i}.png" for i in idx] and a.metadata == [{"i": i} for i in idx]
    assert ps.subset(100).prompts == ps.prompts and ps.subset(500) is ps
    # the documented rule, so the draw can be reproduced outside the project
    import numpy as np
    assert idx == sorted(np.random.default_rng(1).choice(100, size=10, replace=False).tolist())
    assert len(ps.subset(0)) == 0
    with pytest.raises(ValueError):
        ps.subset(-1)


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="1 entries for 2 prompts"):
        pr.PromptSet("x", ["a", "b"], images=["a.png"])
