"""experiments/ffn_probe.py: the variants keep the units they name, a zeroed unit is a pruned one, and the
probe runs end to end on a tiny ChatML GGUF parent."""
import json

import pytest
import torch

import cascade as C
from experiments import ffn_probe as FP
from experiments import real_parent as R
from test_gguf import tiny_parent_gguf

pytestmark = pytest.mark.usefixtures("one_thread")


def test_variants_keep_the_units_they_name():
    L, F, k = 6, 10, 4
    scores = torch.rand(L, F, generator=torch.Generator().manual_seed(0))
    scores[2] *= 100  # layer 2's units outscore every other layer's: the global pool takes them all
    v = FP.variants(scores, k, FP.ProbeConfig(keep="0.5", random_draws=2, bands=3))
    assert list(v) == ["activation 4/10", "activation 5/10", "random 4/10 (seed 0)", "random 4/10 (seed 1)",
                       "layers 0-1 at 4/10", "layers 2-3 at 4/10", "layers 4-5 at 4/10", "global top 24"]
    top = v["activation 4/10"]
    assert top.sum(1).tolist() == [k] * L
    for i in range(L):  # every kept unit outscores every dropped one in its layer
        assert scores[i][top[i]].min() > scores[i][~top[i]].max()
    assert v["activation 5/10"].sum(1).tolist() == [5] * L
    for seed in (0, 1):
        assert v[f"random 4/10 (seed {seed})"].sum(1).tolist() == [k] * L
    assert not torch.equal(v["random 4/10 (seed 0)"], v["random 4/10 (seed 1)"])
    assert v["layers 2-3 at 4/10"].sum(1).tolist() == [F, F, k, k, F, F]
    assert torch.equal(v["layers 2-3 at 4/10"][2], top[2])
    g = v["global top 24"]
    assert int(g.sum()) == k * L and bool(g[2].all())  # the pool favours the high-scoring layer
    none = FP.variants(scores, k, FP.ProbeConfig(keep="0.5", random_draws=0, bands=0))
    assert list(none) == ["activation 4/10", "activation 5/10", "global top 24"]


def test_combined_keeps_what_each_source_needs():
    L, F, k = 2, 8, 4
    a = torch.full((L, F), 0.1)
    b = torch.full((L, F), 10.0)  # b's scale is 100x a's: a raw max would let b alone choose
    a[:, [0, 1]] = torch.tensor([2.0, 1.0])  # source a needs units 0 and 1
    b[:, [6, 7]] = torch.tensor([300.0, 200.0])  # source b needs units 6 and 7
    b[:, 5] = 50.0  # b's third unit
    a[:, 4] = 0.5  # a's third unit, a smaller share of a's mean than unit 5 of b's
    v = FP.combined({"a": a, "b": b}, k, FP.ProbeConfig(keep=""))
    assert list(v) == ["a only 4/8", "b only 4/8", "max 4/8", "rank union 4/8"]
    assert v["a only 4/8"][0, [0, 1]].all() and not v["a only 4/8"][0, [6, 7]].any()
    assert v["b only 4/8"][0, [6, 7]].all() and not v["b only 4/8"][0, [0, 1]].any()
    for name in ("max 4/8", "rank union 4/8"):  # each source's top two units survive
        assert v[name].sum(1).tolist() == [k] * L and v[name][:, [0, 1, 6, 7]].all(), name
    two = FP.combined({"a": a, "b": b}, 6, FP.ProbeConfig(keep=""))
    assert two["rank union 6/8"][0].nonzero().flatten().tolist() == [0, 1, 4, 5, 6, 7]  # the third of each
    # over its layer mean: unit 4 is 1.0 of a's, unit 5 0.67 of b's, every other unit at most 0.2
    assert two["max 6/8"][0].nonzero().flatten().tolist() == [0, 1, 4, 5, 6, 7]


def test_a_zeroed_unit_is_a_pruned_unit():
    import prune as P
    from test_gguf import ARGS, tiny_model
    model = tiny_model(ARGS).eval()
    L, F = ARGS.n_layers, ARGS.hidden_dim
    keep = torch.stack([torch.randperm(F, generator=torch.Generator().manual_seed(i))[:F // 2].sort().values
                        for i in range(L)])
    mask = torch.zeros(L, F, dtype=torch.bool).scatter_(1, keep, True)
    x = torch.randint(0, ARGS.vocab_size, (2, 7))
    zeroed = FP.masked(model, mask)(x)
    assert not torch.allclose(zeroed, FP.masked(model, ~mask)(x), atol=1e-3)  # other units, other outputs
    assert torch.allclose(zeroed, P.prune_ffn(model, keep)(x), atol=1e-5)  # (prune_ffn works in place)


def test_contribution_weighs_each_unit_by_its_output_column():
    import prune as P
    from test_gguf import ARGS, tiny_model
    model = tiny_model(ARGS).eval()
    L, F = ARGS.n_layers, ARGS.hidden_dim
    scores = torch.ones(L, F)
    scores[:, 0] = 0.5  # unit 0 fires half as much as the others ...
    with torch.no_grad():
        for layer in model.layers:
            w = layer.mlp.down_proj.weight  # [D, F]
            w.copy_(w / w.norm(dim=0, keepdim=True))  # unit columns of norm 1
            w[:, 0] *= 10  # ... but writes ten times as much
            w[:, 1] *= 0.1  # unit 1 fires fully and writes a tenth
    c = P.ffn_contribution(model, scores)
    assert torch.allclose(c[:, 0], torch.full((L,), 5.0)) and torch.allclose(c[:, 1], torch.full((L,), 0.1))
    keep_act, keep_con = FP._top(scores, F - 1), FP._top(c, F - 1)
    assert not keep_act[:, 0].any() and keep_act[:, 1].all()  # the activation rule drops unit 0
    assert keep_con[:, 0].all() and not keep_con[:, 1].any()  # the contribution rule drops unit 1


@pytest.mark.slow
def test_probe_runs_on_a_tiny_parent(tmp_path):
    parent, args = tiny_parent_gguf(tmp_path / "p.gguf")
    argv = ["--parent", str(parent), "--preset", "cpu-real", "--size", "14b", "--seq-len", "32", "--batch-size", "2",
            "--micro-batch-size", "2", "--calib-seqs", "4", "--eval-batches", "1", "--math-problems", "3",
            "--math-new-tokens", "3", "--random-draws", "1", "--bands", "2", "--out", str(tmp_path / "run")]
    result = FP.run_probe(*C.parse_args(argv, FP.ProbeConfig, R.TaskConfig))
    rows = {r["stage"]: r for r in result["rows"]}
    k, F, L = args.hidden_dim // 2, args.hidden_dim, args.n_layers
    assert list(rows) == ["parent", f"activation {k}/{F}", f"activation {round(0.75 * F)}/{F}",
                          f"random {k}/{F} (seed 0)", f"layers 0-1 at {k}/{F}", f"layers 2-3 at {k}/{F}",
                          f"global top {k * L}"]
    assert rows["parent"]["kl"] == pytest.approx(0, abs=1e-6) and rows[f"activation {k}/{F}"]["kl"] > 0
    assert rows[f"layers 0-1 at {k}/{F}"]["per_layer"] == [k, k, F, F]
    assert rows[f"activation {k}/{F}"]["params"] == rows["parent"]["params"] - 3 * args.dim * (F - k) * L
    table = (tmp_path / "run" / "results" / "table.md").read_text()
    assert "(draw" not in table and "only" not in table
    assert "| variant | FFN units kept |" in table and "## Sample answers" in table
    record = json.loads((tmp_path / "run" / "results" / "table.json").read_text())
    assert [r["stage"] for r in record["rows"]] == list(rows)


@pytest.mark.slow
def test_probe_scores_further_draws_and_each_source(tmp_path):
    parent, args = tiny_parent_gguf(tmp_path / "p.gguf")
    src = tmp_path / "src"
    src.mkdir()
    lines = {"a.jsonl": [{"text": f"alpha beta gamma {i} delta epsilon " * 3} for i in range(20)],
             "b.jsonl": [{"messages": [{"role": "user", "content": f"what is {i} + {i}?"},
                                       {"role": "assistant", "content": f"{i} + {i} = {2 * i}"}]} for i in range(20)]}
    for name, items in lines.items():
        (src / name).write_text("".join(json.dumps(r) + "\n" for r in items))
    argv = ["--parent", str(parent), "--preset", "cpu-real", "--size", "14b", "--seq-len", "32", "--batch-size", "2",
            "--micro-batch-size", "2", "--calib-seqs", "4", "--eval-batches", "1", "--math-problems", "3",
            "--math-new-tokens", "3", "--random-draws", "0", "--bands", "0", "--keep", "", "--calib-draws", "2",
            "--contribution", "--sources", f"{src / 'a.jsonl'},{src / 'b.jsonl'}", "--out", str(tmp_path / "run")]
    rows = {r["stage"]: r for r in FP.run_probe(*C.parse_args(argv, FP.ProbeConfig, R.TaskConfig))["rows"]}
    k, F = args.hidden_dim // 2, args.hidden_dim
    assert list(rows) == ["parent", f"activation {k}/{F}", f"global top {k * args.n_layers}",
                          f"contribution {k}/{F}", f"activation {k}/{F} (draw 1)",
                          f"contribution {k}/{F} (draw 1)", f"a.jsonl only {k}/{F}", f"b.jsonl only {k}/{F}",
                          f"max {k}/{F}", f"rank union {k}/{F}", f"a.jsonl only {k}/{F} (draw 1)",
                          f"b.jsonl only {k}/{F} (draw 1)"]
    # other calibration text, other units kept: the two files' own rows are not one child
    assert rows[f"a.jsonl only {k}/{F}"]["ce"] != rows[f"b.jsonl only {k}/{F}"]["ce"]
    assert rows[f"activation {k}/{F}"]["ce"] != rows[f"activation {k}/{F} (draw 1)"]["ce"]
    with pytest.raises(FileNotFoundError, match="--sources"):
        FP.run_probe(*C.parse_args(argv[:-4] + ["--sources", str(src / "missing.jsonl"), "--out", str(tmp_path / "r2")],
                                   FP.ProbeConfig, R.TaskConfig))
