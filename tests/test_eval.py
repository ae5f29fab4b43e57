"""The eval stage: unbiased pass@k, support accounting (gained / lost / kept), the KL estimate, one real run.

Expected numbers come from the definitions (binomials, enumeration of subsets, hand-made tables), never from
the code under test. CPU only, tiny models, a few seconds.
"""

import itertools
import json
import math
import os

import pytest
import torch

import posttrain
from data import task
from model import GPT, GPTConfig
from posttrain import kl_estimate, pass_at_k, support_change


def tiny_checkpoint(folder, seed=0, head_scale=1.0):
    """A random 1-layer, width-32 model saved as a checkpoint folder; head_scale sharpens its outputs."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=18, n_layer=1, n_embd=32, n_head=4, n_kv_head=2, intermediate_size=96))
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(folder, tokenizer_path=task.TOKENIZER_PATH)
    return str(folder)


# ----------------------------------------------------------------------------------------------------- pass@k


def test_pass_at_k_small_exact_cases():
    # n=4, c=2, k=2: 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6, abs=1e-12)
    assert pass_at_k(4, 0, 2) == 0.0  # nothing correct: no subset can contain a correct sample
    assert pass_at_k(4, 3, 2) == 1.0  # n - c = 1 < k = 2: every 2-subset holds a correct sample
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-12)  # pass@1 is the fraction correct
    assert pass_at_k(16, 16, 16) == 1.0


@pytest.mark.parametrize("n,c,k", [(4, 1, 2), (5, 2, 3), (6, 1, 1), (6, 3, 4), (7, 2, 2), (8, 1, 4),
                                   (8, 5, 3), (9, 0, 3), (10, 4, 7)])
def test_pass_at_k_matches_enumeration_of_subsets(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_rejects_impossible_arguments():
    for n, c, k in [(4, 5, 1), (4, 2, 0), (4, 2, 5), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


# ------------------------------------------------------------------------------------------- support, KL


def test_support_change_on_hand_made_sample_tables():
    # 6 problems x 3 samples. Solved at least once: base {0, 1, 3, 5}, checkpoint {1, 2, 3, 4}
    base = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 0, 0], [1, 1, 1], [0, 0, 0], [0, 1, 0]], dtype=torch.bool)
    ckpt = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    # gained: 2, 4; lost: 0, 5; kept: 1, 3
    assert support_change(base.any(1), ckpt.any(1)) == {"gained": 2, "lost": 2, "kept": 2}
    # the other way round, gained and lost swap
    assert support_change(ckpt.any(1), base.any(1)) == {"gained": 2, "lost": 2, "kept": 2}
    assert support_change(base.any(1), base.any(1)) == {"gained": 0, "lost": 0, "kept": 4}


def test_kl_estimate_closed_form():
    p = torch.tensor([-1.0, -2.0, -3.0])  # log p(y_i) of three samples y_i ~ p
    q = torch.tensor([-1.5, -2.0, -2.0])  # log q(y_i)
    ratios = [0.5, 0.0, -1.0]
    mean, se = kl_estimate(p, q)
    m = sum(ratios) / 3
    sd = math.sqrt(sum((r - m) ** 2 for r in ratios) / 2)  # unbiased, as torch.std
    assert mean == pytest.approx(m, abs=1e-6)
    assert se == pytest.approx(sd / math.sqrt(3), abs=1e-6)
    assert kl_estimate(p, p) == (0.0, 0.0)


# ------------------------------------------------------------------------------------------- the stage itself


def test_eval_stage_kl_zero_for_a_copy_of_the_base(tmp_path):
    base = tiny_checkpoint(tmp_path / "base", seed=0)
    copy = tiny_checkpoint(tmp_path / "copy", seed=0)  # the same weights in another folder
    sharp = tiny_checkpoint(tmp_path / "sharp", seed=0, head_scale=30.0)  # far from the base
    out = tmp_path / "eval.json"
    posttrain.main(["--stage", "eval", "--ckpt", copy, "--ckpt", sharp, "--base", base,
                    "--out-dir", str(tmp_path), "--eval-out", str(out), "--eval-problems", "5",
                    "--eval-n", "4", "--max-new-tokens", "12", "--threads", "1"])
    res = json.loads(out.read_text())
    names = [r["name"] for r in res["checkpoints"]]
    assert names == ["base", "copy", "sharp"]
    for split in posttrain.EVAL_SPLITS:
        b, c, s = (r[split] for r in res["checkpoints"])
        assert c["kl_base"] == 0.0 and c["kl_base_se"] == 0.0  # identical numbers, not merely close
        assert c["counts"] == b["counts"] and c["entropy"] == b["entropy"]
        assert c["vs_base"]["gained"] == 0 and c["vs_base"]["lost"] == 0
        assert s["kl_base"] > 1.0  # so the check above can fail
        assert s["entropy"] < b["entropy"]
        assert sorted(k for k in b if k.startswith("pass@")) == ["pass@1", "pass@2", "pass@4"]
    assert os.path.exists(out)


def test_pass_at_k_and_support_pictures_are_svg_of_the_numbers():
    import xml.etree.ElementTree as ET
    n = 4
    rows = [{"name": name, "test": {"counts": counts, "vs_base": vs}} for name, counts, vs in (
        ("base", [0, 1, 4, 2], {"gained": 0, "lost": 0}), ("sft", [4, 4, 0, 3], {"gained": 0, "lost": 2}))]
    res = {"n": n, "problems": {"test": 4}, "checkpoints": rows}
    svg = ET.fromstring(posttrain.pass_at_k_svg(res))
    lines = [e for e in svg.iter() if e.tag.endswith("polyline")]
    assert len(lines) == 2  # one curve per checkpoint
    for line, r in zip(lines, rows):
        points = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
        assert len(points) == n  # k = 1..n
        # the first point is pass@1 = mean(c) / n, the last pass@n = share of problems solved at least once
        pass1 = sum(r["test"]["counts"]) / (n * 4)
        passn = sum(c > 0 for c in r["test"]["counts"]) / 4
        assert abs(points[0][1] - posttrain.PANEL_H * (1 - pass1)) < 0.06
        assert abs(points[-1][1] - posttrain.PANEL_H * (1 - passn)) < 0.06
        assert points[0][0] == 0 and abs(points[-1][0] - posttrain.PANEL_W) < 0.06
    bars = ET.fromstring(posttrain.support_svg(res))
    texts = [e.text for e in bars.iter() if e.tag.endswith("text")]
    assert "+0" in texts and "-2" in texts and "sft" in texts


def test_seed_summary_is_mean_and_sd_across_seeds_of_the_paired_changes():
    import seeds
    # seed 1: 2 problems, 0 -> 1 on one of them: +50 points; seed 2: +0 points
    evals = {1: {"before": {"greedy": [0.0, 1.0]}, "after": {"greedy": [1.0, 1.0]}},
             2: {"before": {"greedy": [1.0, 0.0]}, "after": {"greedy": [1.0, 0.0]}}}
    g = seeds.summarise(evals)["greedy"]
    assert [p["change"] for p in g["per_seed"]] == [50.0, 0.0]
    assert g["change_mean"] == 25.0 and abs(g["change_sd"] - 50 / 2 ** 0.5) < 1e-9
    assert abs(g["per_seed"][0]["paired_se"] - 50.0) < 1e-9  # sd of the differences (100, 0) / sqrt(2)
    assert g["after_mean"] == 75.0


def test_seed_summary_carries_scorer_checks_and_the_last_steps_signals():
    import seeds
    # a prm variant: no greedy / sampled, a held-out check; the last 5 of 6 logged steps average the signals
    steps = [{"reward": r, "cut_off": c} for r, c in ((0.0, 1.0), (1, 0), (1, 0), (0, 0), (0, 0), (0.5, 0.5))]
    evals = {1: {"before": {}, "after": {"step_balanced_accuracy": 0.8}, "metrics": steps},
             2: {"before": {}, "after": {"step_balanced_accuracy": 0.9}, "metrics": steps[1:]}}
    out = seeds.summarise(evals)
    assert "greedy" not in out
    held = out["held_out"]["step_balanced_accuracy"]
    assert held["per_seed"] == [0.8, 0.9] and abs(held["mean"] - 0.85) < 1e-12
    assert out["last_steps"]["reward"]["per_seed"] == [0.5, 0.5] and out["last_steps"]["cut_off"]["mean"] == 0.1
    table = seeds.signals_table({"prm": {"result": out}}, ["prm"])
    assert "`step_balanced_accuracy`" in table and "0.85 ± 0.071" in table


def test_score_samples_scores_each_distinct_pair_once(tmp_path, monkeypatch):
    """Repeated (prompt, completion) pairs are scored once and every row gets its own pair's numbers: each
    row's summed log-prob equals a full forward over that row alone."""
    import rollout
    model = posttrain.load_model(tiny_checkpoint(tmp_path / "m", seed=2, head_scale=3.0), "cpu").eval()
    args = posttrain.stage_args(posttrain.get_args(["--stage", "eval"]), "eval")
    args.temperature = 1.0
    t = posttrain.Task("arith", task.DATA_DIR, posttrain.Tokenizer(task.DATA_DIR))
    a, b = [r["prompt"] for r in t.rows("test")[:2]]
    x, y = [5, 6, 7, 8], [9, 10]
    rows = [(a, x), (b, y), (a, x), (a, y), (b, y), (a, x)]  # 3 distinct pairs; a gets two completions
    scored = []
    forward = posttrain.completion_forward
    monkeypatch.setattr(posttrain, "completion_forward",
                        lambda m, mb, args: scored.append(len(mb["completion_ids"])) or forward(m, mb, args))
    logps, _, n_tokens = posttrain.score_samples(model, t.tok, [p for p, _ in rows], [c for _, c in rows], args)
    assert sum(scored) == 3 and n_tokens.tolist() == [len(c) for _, c in rows]
    for i, (p, c) in enumerate(rows):
        ids = torch.tensor([t.tok.prompt_ids(p)])
        alone = rollout.completion_logps(model, ids, torch.ones_like(ids), torch.tensor([c]),
                                         torch.ones(1, len(c), dtype=torch.long)).sum()
        assert abs(logps[i].item() - alone.item()) <= 1e-5
    assert logps[0] != logps[3]  # same prompt, other completion: the check above can tell rows apart


def test_eval_batches_by_prompt_length_in_the_usual_order_with_the_sampler_s_scores(tmp_path):
    """solve(by_length=True) regroups rows by prompt length and hands them back in the usual order: greedy
    (deterministic) completions are those of consecutive batches, and the sampler's summed log-probs and
    entropies are what a forward over the samples computes."""
    model = posttrain.load_model(tiny_checkpoint(tmp_path / "m", seed=1, head_scale=3.0), "cpu").eval()
    args = posttrain.stage_args(posttrain.get_args(["--stage", "eval", "--max-new-tokens", "10"]), "eval")
    t = posttrain.Task("arith", task.DATA_DIR, posttrain.Tokenizer(task.DATA_DIR))
    prompts = [r["prompt"] for r in t.rows("test")[:12]]
    assert len({len(p) for p in prompts}) > 2  # several lengths, so regrouping changes the batches
    plain = posttrain.solve(model, t, prompts, 1, 0.0, args, seed=0, batch_rows=5)
    grouped = posttrain.solve(model, t, prompts, 1, 0.0, args, seed=0, batch_rows=5, by_length=True)
    assert grouped[2] == plain[2] and grouped[1] == plain[1] and torch.equal(grouped[0], plain[0])
    scores = {}
    _, _, completions = posttrain.solve(model, t, prompts, 3, 1.0, args, seed=0, batch_rows=4, by_length=True,
                                        scores=scores)
    rows = [p for p in prompts for _ in range(3)]
    logps, entropy, n_tokens = posttrain.score_samples(model, t.tok, rows, completions, args)
    assert n_tokens.tolist() == scores["n_tokens"].tolist() == [len(c) for c in completions]
    assert (scores["seq_logps"] - logps).abs().max() <= 1e-4
    assert (scores["entropy"] - entropy).abs().max() <= 1e-4
    assert logps.abs().min() > 0  # the check above can fail: random weights give every token a real cost
