"""HMAR (arXiv:2506.04421): the official code's outputs replayed, strict loading and its errors, parameter counts
against the key listings and the closed form, Markov attention against per-scale dense passes, the mask schedule
as a free knob, and the absence of a KV cache."""

import json
from types import SimpleNamespace

import pytest
import torch

from varbench.harness import create_variant
from varbench.harness.run.bench import bench_variant
from varbench.harness.core.checkpoints import CheckpointError
from varbench.harness.cli import main
from varbench.harness.core.loop import generate
from varbench.harness.core.registry import KV_POLICIES
from varbench.harness.core.sampling import SampleConfig
from varbench.kernels import block_causal_ranges, block_sparse_attention
from varbench.variants import describe
from varbench.variants.hmar import HMAR_FILES, build_hmar, load_hmar_net, resolve_mask_schedule
from varbench.variants.hmar_model import HMARConfig, HMARNet, param_count_closed_form
from varbench.variants.params import param_count
from varbench.variants.loading import random_var_net
from varbench.variants.var import EngineConfig
from varbench.variants.var_model import VARConfig

from conftest import CONFORMANCE, KEYS, need

LABELS = torch.tensor([7, 980])
# docs/HMAR_SPEC.md §1: exact counts of the official builds (n_layers_train = 8).
PUBLISHED_PARAMS = {16: 467_691_904, 20: 845_517_872, 24: 1_384_328_960, 30: 2_556_324_212}
DENSE = [[1], [1, 3], [1, 1, 2, 5], [5, 11], [5, 10, 10], [36], [64], [100], [169], [256]]


@pytest.fixture(scope="module")
def d2_file():
    return need(CONFORMANCE / "hmar_d2" / "hmar_d2.pth")


@pytest.fixture(scope="module")
def tiny():
    return create_variant("test_hmar")


def test_official_fixture_passes_through_the_command_line(capsys):
    folder = need(CONFORMANCE / "hmar_d2")
    need(CONFORMANCE / "var_d2" / "vae.pth")
    assert main(["conformance", str(folder)]) == 0
    report = json.loads(capsys.readouterr().out)
    checks = {c["check"]: c for c in report["checks"]}
    assert report["passed"] and all(c["pass"] for c in checks.values())
    runs = ("gen_greedy", "gen_topk900_topp096", "gen_topk50_topp090_dense", "gen_topk900_topp096_nomask")
    for prefix in ("", "engine.", "reference."):
        for run in runs:
            assert checks[f"{prefix}{run}.tokens"]["mismatches"] == 0
            assert checks[f"{prefix}{run}.image"]["max_abs_err"] <= (1e-5 if not prefix else 1e-4)
        # greedy: every confidence is 1.0, so the masked positions are decided by the stable tie order alone
        assert checks[f"{prefix}gen_greedy.mask_trace.s2_step3.idx_to_mask"]["pass"]
        assert len([k for k in checks if k.startswith(f"{prefix}gen_topk50_topp090_dense.mask_trace.s")]) == 3 * 11
    for path in ("ns", "mask"):
        for impl in ("auto", "sdpa"):
            assert checks[f"hmar.teacher_forced.{impl}.{path}_logits"]["max_abs_err"] <= 1e-4
            assert checks[f"hmar.teacher_forced.{impl}.{path}_argmax"]["mismatches"] == 0
    assert checks["hmar_params"]["got"] == 2_233_862


def test_checkpoint_loads_strictly_and_the_split_is_read_from_the_keys(d2_file):
    net = load_hmar_net(d2_file, expect_depth=2)
    cfg = net.cfg
    assert (cfg.depth, cfg.width, cfg.heads, cfg.n_layers_train, cfg.n_base) == (2, 128, 2, 1, 1)
    want = torch.load(d2_file, weights_only=True)
    got = net.state_dict()
    assert sorted(got) == sorted(want)  # buffers included (within a block var_model's order, not the file's)
    assert all(torch.equal(v, want[k]) for k, v in got.items())
    lvl = net.lvl_1L[0]
    assert torch.equal(net.attn_bias_for_masking[0, 0] == 0, lvl[:, None] == lvl[None, :])  # block-DIAGONAL


def test_wrong_depth_and_damaged_state_dicts_say_what_is_wrong(d2_file, tmp_path):
    with pytest.raises(CheckpointError, match=r"depth-2 HMAR .*depth-16 model was asked for.*hmar_d2"):
        load_hmar_net(d2_file, expect_depth=16)
    with pytest.raises(CheckpointError, match=r"depth-2 HMAR"):
        build_hmar(16, weights=str(d2_file), vae="random")
    sd = torch.load(d2_file, weights_only=True)
    cases = {
        "no_head": ({k: v for k, v in sd.items() if k != "mask_head.weight"}, r"missing keys \(1\): mask_head.weight"),
        "extra": (sd | {"blocks.0.attn.q_bias": sd["pos_start"]}, r"unexpected keys \(1\): blocks.0.attn.q_bias"),
        "no_ns_block": ({k: v for k, v in sd.items() if not k.startswith("ns_blocks.")},
                        r"same, non-zero number of blocks.*'ns_blocks': 0, 'mask_blocks': 1"),
        "no_embed": ({k: v for k, v in sd.items() if k != "word_embed.weight"}, r"missing 'word_embed.weight'"),
    }
    for name, (broken, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(broken, path)
        with pytest.raises(CheckpointError, match=message):
            load_hmar_net(path)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(d2_file.read_bytes()[:20000])
    with pytest.raises(CheckpointError, match=r"cut.pth is a damaged PyTorch checkpoint \(truncated"):
        load_hmar_net(cut)
    var_file = tmp_path / "var.pth"
    torch.save(random_var_net(VARConfig(depth=2)).state_dict(), var_file)
    with pytest.raises(CheckpointError, match=r"not a HMAR state dict: it looks like a VAR state dict"):
        load_hmar_net(var_file)


def test_official_weights_resolve_through_the_hub_cache_or_fail_clearly(d2_file, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert HMAR_FILES[16] == "hf:nvidia/HMAR/hmar-d16.pth"
    with pytest.raises(CheckpointError, match=r"hmar-d16.pth is not in the local Hugging Face cache.*"
                                              r"huggingface.co/nvidia/HMAR/resolve/main/hmar-d16.pth"):
        create_variant("hmar_d16", allow_download=False)
    rev = "0" * 40
    repo = tmp_path / "hub" / "models--nvidia--HMAR"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    (repo / "snapshots" / rev / "hmar-d2.pth").write_bytes(d2_file.read_bytes())
    variant = build_hmar(2, weights="hf:nvidia/HMAR/hmar-d2.pth", vae="random", vae_ch=32, allow_download=False)
    assert variant.cfg.n_layers_train == 1 and variant.weights == "hf:nvidia/HMAR/hmar-d2.pth"


def _listing(depth: int) -> list[tuple[str, tuple[int, ...], str, bool]]:
    rows = []
    for line in need(KEYS / f"keys_hmar_d{depth}.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, dtype, *flag = line.split("\t")
        rows.append((name, tuple(int(x) for x in shape.strip("(,)").split(",") if x.strip()), dtype, bool(flag)))
    return rows


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_parameter_counts_and_layout_match_the_official_builds(depth):
    cfg = HMARConfig(depth=depth)
    assert param_count(cfg) == param_count_closed_form(cfg) == PUBLISHED_PARAMS[depth]
    assert describe(f"hmar_d{depth}")["params"] == f"{PUBLISHED_PARAMS[depth]:,}"
    with torch.device("meta"):
        net = HMARNet(cfg)
    buffers = {name for name, _ in net.named_buffers()}
    ours = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch."), k in buffers) for k, v in net.state_dict().items()]
    assert sorted(ours) == sorted(_listing(depth))  # names, shapes, dtypes and buffer flags
    params = sum(numel for name, shape, _, buf in _listing(depth) if not buf
                 for numel in [torch.Size(shape).numel()])
    assert params == PUBLISHED_PARAMS[depth]


@pytest.mark.parametrize("path", ["ns", "mask"])
def test_block_diagonal_teacher_forcing_equals_per_scale_dense_passes(tiny, path):
    net, vae, pn = tiny.net, tiny.vae, tiny.patch_nums
    gen = torch.Generator().manual_seed(3)
    idx = [torch.randint(0, 4096, (2, p * p), generator=gen) for p in pn]
    from varbench.variants.hmar import mask_token_input

    with torch.inference_mode():
        x_ns = vae.tokens_to_var_input(idx, pn)
        x_mask = mask_token_input(vae, idx, pn) if path == "mask" else None
        positions = torch.randperm(x_ns.shape[1], generator=gen)[:300] if path == "mask" else None
        full = {impl: net(LABELS, x_ns, x_mask, positions, attn_impl=impl) for impl in ("auto", "sdpa")}
        # The same sequence, each scale's slice through the blocks alone with plain dense attention.
        cond = net.class_emb(LABELS)
        mods = net.modulations(cond)
        tokens = net.embed(x_ns)
        if x_mask is not None:
            e = net.embed(x_mask)
            e[:, positions] = net.mask_embed.weight[0]
            tokens = tokens + e
        x = torch.cat((cond.unsqueeze(1) + net.pos_start, tokens + net.word_embed_bias), 1) + net.level_pos()
        dense = torch.cat([net.run(x[:, b:e], mods, path) for b, e in net.begin_ends], dim=1)
        # Negative control: VAR's block-causal pattern (scales see coarser scales) must differ.
        start, end = block_causal_ranges(pn)
        causal = net.run(x, mods, path, attend=lambda q, k, v: block_sparse_attention(q, k, v, start, end, 1.0,
                                                                                      impl="ref")[0])
    for logits in full.values():
        assert (logits - dense).abs().max() < 2e-5
    b1 = net.begin_ends[1][0]
    assert (causal[:, :b1] - dense[:, :b1]).abs().max() < 2e-5  # scale 0 sees only itself either way
    assert (causal[:, b1:] - dense[:, b1:]).abs().max() > 0.1


def _calls(variant, sampling, seed=11):
    """Runs generate and counts the sampler calls (one per commit)."""
    count = []
    commit = variant.commit
    variant.commit = lambda state, step, draw: (count.append((step.si, step.sub)), commit(state, step, draw))
    try:
        return generate(variant, LABELS, sampling, g_seed=seed), count
    finally:
        del variant.commit


def test_mask_schedule_sets_the_number_of_sub_steps_and_gives_valid_tokens():
    greedy = SampleConfig(cfg=1.5, top_k=1, top_p=0.0)
    runs = {}
    for schedule, passes in (("none", 10), ("official", 14), (DENSE, 17), ("benchmark", 13)):
        variant = create_variant("test_hmar", mask_schedule=schedule)
        assert len(variant.steps()) == passes
        out, calls = _calls(variant, SampleConfig())
        assert len(calls) == passes and calls == [(s.si, s.sub) for s in variant.steps()]
        assert [t.shape for t in out.tokens] == [(2, p * p) for p in variant.patch_nums]
        assert all(int(t.min()) >= 0 and int(t.max()) < 4096 for t in out.tokens)
        assert out.images.shape == (2, 3, 256, 256) and 0 <= float(out.images.min()) <= float(out.images.max()) <= 1
        runs[str(schedule)] = out
        if schedule == DENSE:  # masked positions per step: sum(s[step:]) of each scale's schedule
            greedy_out = generate(variant, LABELS, greedy, g_seed=3)
            sizes = [(si, sub, tuple(m.shape)) for si, sub, m in greedy_out.state.mask_trace]
            assert sizes == [(1, 1, (2, 3)), (2, 1, (2, 8)), (2, 2, (2, 7)), (2, 3, (2, 5)), (3, 1, (2, 11)),
                             (4, 1, (2, 20)), (4, 2, (2, 10))]
            # all confidences tie at 1.0: the first positions in index order are masked, kept in that order
            assert torch.equal(greedy_out.state.mask_trace[1][2], torch.arange(8).expand(2, 8))
            # a 25-entry row of ties is ordered as the official unstable argsort orders it (HMAR_SPEC §6 "Ties"),
            # which on the CPU is not index order for rows longer than 16
            official = torch.ones(2, 25).argsort(dim=1)[:, :20]
            assert not torch.equal(official, torch.arange(20).expand(2, 20))
            assert torch.equal(greedy_out.state.mask_trace[5][2], official)
    assert torch.equal(runs["none"].tokens[0], runs["official"].tokens[0])  # same stream up to the first masked step
    assert any(not torch.equal(a, b) for a, b in zip(runs["none"].tokens[1:], runs["official"].tokens[1:]))
    for bad, message in (([[1]] * 9, "has 9 entries"), ([[1], [2, 3]] + DENSE[2:], r"summing to 2² = 4"),
                         ([[0, 1]] + DENSE[1:], "1×1 scale has no masked steps"), ("fancy", "unknown mask schedule")):
        with pytest.raises(ValueError, match=message):
            resolve_mask_schedule(bad, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))


def test_no_kv_cache(tiny):
    out = generate(tiny, LABELS, SampleConfig(), g_seed=0)
    assert out.state.kv_bytes == [0] * 10
    assert bench_variant(tiny, 2, warmup=0, repeats=1)["kv_bytes"] == 0
    full = create_variant("test_hmar", kv_policy=KV_POLICIES.get("full")())
    assert torch.equal(generate(full, LABELS, SampleConfig(), g_seed=0).tokens[-1], out.tokens[-1])
    with pytest.raises(ValueError, match=r"HMAR has no KV cache.*'h2o' cannot apply"):
        create_variant("test_hmar", kv_policy=SimpleNamespace(name="h2o"))
    with pytest.raises(ValueError, match="does not capture CUDA graphs"):
        create_variant("test_hmar", engine=EngineConfig(cuda_graphs=True))


def test_precision_is_honoured():
    bf16 = create_variant("test_hmar", engine=EngineConfig("bf16"))
    assert bf16.net.ns_blocks[0].attn.mat_qkv.weight.dtype == torch.bfloat16
    assert bf16.net.mask_embed.weight.dtype == torch.float32  # adds into the fp32 residual stream
    out = generate(bf16, LABELS, SampleConfig(), g_seed=0, batch=None)
    assert out.images.dtype == torch.float32 and bool(torch.isfinite(out.images).all())
    assert [t.shape for t in out.tokens] == [(2, p * p) for p in bf16.patch_nums]
