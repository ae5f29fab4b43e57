"""Process supervision: the cut-off rule in every reward path, the oracle step rewards (--reward steps) against a
hand computation of DeepSeekMath's process advantages, outcome plus process (--process-coef) on a hand-made
group where a biased process reward would rank a cut-off completion above the right one, and the balanced PRM
loss. CPU, a few seconds.
"""

import json
import math

import pytest
import torch

import posttrain
from data import task
from data.tokenizer import Tokenizer
from losses import group_advantages, outcome_process_advantages, prm_loss, process_advantages
from model import GPT, GPTConfig

TOK = Tokenizer(task.DATA_DIR)
TINY = ["--n-layer", "1", "--n-embd", "32", "--threads", "1"]

# One group of the kind that broke --reward prm: 10+5+3-2+7 = 23.
PROMPT = "10+5+3-2+7="
GROUP = [
    ("10+5=15;15+3=18;18-2=16;16+7=23;#23", True),  # right, finished
    ("10+5=15;15+3=19;19-2=17;17+7=24;#24", True),  # a slip in step 1, finished, wrong answer
    ("10+5=15;15+3=18;18-2=16;16+7=23;", False),  # right steps, cut off before the answer
    ("10+5=15;15+3=18;18-2=16;16+7=23;23+7=30;30+", False),  # an extra (wrong) step, cut off mid-step
]


def group_roll(group=GROUP):
    """Rollout tensors and verdicts of hand-written completions; a cut-off one has no EOS."""
    ids = [TOK.completion_ids(t) if done else TOK.encode(t) for t, done in group]
    roll = posttrain.completion_rows(TOK, [PROMPT] * len(group), ids, "cpu")
    verdicts = [posttrain.Task("arith", task.DATA_DIR, TOK).verify(PROMPT, t, done) for t, done in group]
    return roll, verdicts


def args_for(*flags):
    return posttrain.stage_args(posttrain.get_args(["--stage", "grpo", *TINY, *flags]), "grpo")


def token_means(adv, mask):
    return ((adv * mask).sum(1) / mask.sum(1)).tolist()


# -----------------------------------------------------------------------------------------------------------
# the cut-off rule


def test_verifier_calls_a_cut_off_completion_wrong_even_with_a_right_answer():
    t = posttrain.Task("arith", task.DATA_DIR, TOK)
    right = "10+5=15;15+3=18;18-2=16;16+7=23;#23"
    assert t.verify(PROMPT, right, True).correct and not t.verify(PROMPT, right, False).correct


def test_rm_gives_a_cut_off_completion_the_lowest_score_of_the_batch(monkeypatch):
    roll, verdicts = group_roll()
    # the RM likes the cut-off rows best; the rule overrides that
    monkeypatch.setattr(posttrain, "sequence_scores", lambda model, ids, last, args, attn_mask=None:
                        torch.tensor([0.5, -1.0, 3.0, 2.0])[:len(ids)])
    stats = {}
    rewards, steps = posttrain.rollout_rewards({"reward_model": None}, args_for("--reward", "rm"), roll, verdicts,
                                               stats)
    assert steps is None and rewards.tolist() == [0.5, -1.0, -1.0, -1.0]


def test_prm_and_oracle_steps_score_every_step_of_a_cut_off_completion_as_wrong(monkeypatch):
    roll, verdicts = group_roll()
    monkeypatch.setattr(posttrain, "chunked_scores", lambda model, roll, args, shift=False:
                        torch.full(roll["completion_ids"].shape, 2.0))  # a PRM that trusts every step
    for reward in ("prm", "steps"):
        stats = {}
        seq, steps = posttrain.rollout_rewards({"reward_model": None}, args_for("--reward", reward), roll,
                                               verdicts, stats)
        n = steps["mask"].sum(1).tolist()
        # 4 ';' + the EOS; 4 ';' + the slip's EOS; 4 ';' and the last token is one; 5 ';' + the closing '+'
        assert n == [5, 5, 4, 6]
        last = roll["completion_mask"].sum(1) - 1
        assert steps["ends"][3, 5] == last[3] and steps["ends"][2, 3] == last[2]  # cut off: closed at the end
        r = steps["rewards"]
        assert r[2:].abs().sum() == 0  # the cut-off rows: every step 0
        if reward == "prm":
            assert torch.allclose(r[:2, :5], torch.full((2, 5), torch.sigmoid(torch.tensor(2.0)).item()))
            assert stats["prm_step_reward"] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())  # before
        else:
            # local labels: the slip (step 1) is wrong, the steps after it continue correctly from it
            assert r[0, :5].tolist() == [1, 1, 1, 1, 1] and r[1, :5].tolist() == [1, 0, 1, 1, 0]
        assert seq[2:].abs().sum() == 0


# -----------------------------------------------------------------------------------------------------------
# the oracle against DeepSeekMath's formula by hand


def test_oracle_process_advantages_equal_a_hand_computation():
    roll, verdicts = group_roll()
    _, steps = posttrain.rollout_rewards({}, args_for("--reward", "steps"), roll, verdicts, {})
    T = roll["completion_ids"].shape[1]
    adv = process_advantages(steps["rewards"], steps["ends"], steps["mask"], 4, T)
    # by hand: the group's 20 valid step rewards, their mean and unbiased std, each normalised; a token's
    # advantage sums the normalised rewards of its row's steps that end at or after it
    labels = [[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [0] * 4, [0] * 6]
    ends = [[i for i, c in enumerate(t) if c == ";"] + [len(t) if done else len(t) - 1] for t, done in GROUP]
    ends[2] = ends[2][:4]  # cut off right after a ';': that ';' is its last token, no extra step
    flat = [x for row in labels for x in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / (len(flat) - 1))
    for b in range(4):
        assert steps["ends"][b, :len(ends[b])].tolist() == ends[b]
        for t in range(T):
            expected = sum((r - mean) / (std + 1e-6) for r, e in zip(labels[b], ends[b]) if e >= t)
            assert adv[b, t].item() == pytest.approx(expected, abs=1e-5)
    mask = roll["completion_mask"].float()
    means = token_means(adv, mask)
    assert means[0] == max(means)  # with the cut-off rule the right, finished solution ranks first


# -----------------------------------------------------------------------------------------------------------
# outcome plus process: the ordering guarantee


def biased_process_rewards(roll):
    """Step rewards as a frozen PRM without the cut-off rule gave them: plausible steps of the cut-off rows
    trusted (0.88), every answer step doubted (0.3)."""
    ends, step_mask = posttrain.step_positions(roll["completion_ids"], roll["completion_mask"])
    rewards = torch.full(ends.shape, 0.88) * step_mask
    is_answer = roll["completion_ids"].gather(1, ends) == task.EOS
    rewards[is_answer & step_mask.bool()] = 0.3
    return rewards, ends, step_mask


@pytest.mark.parametrize("coef", [0.1, 1.0, 10.0, 1000.0])
def test_a_right_finished_solution_never_gets_a_lower_mean_advantage(coef):
    roll, verdicts = group_roll()
    mask = roll["completion_mask"].float()
    rewards, ends, step_mask = biased_process_rewards(roll)
    process = process_advantages(rewards, ends, step_mask, 4, mask.shape[1])
    # the failure this guards against: the process advantage alone ranks both cut-off rows above the right one
    alone = token_means(process, mask)
    assert alone[2] > alone[0] and alone[3] > alone[0]
    outcome = group_advantages(torch.tensor([float(v.correct) for v in verdicts]), 4)  # (4,) [1, 0, 0, 0]
    adv = outcome_process_advantages(outcome, process, mask, coef)
    means = token_means(adv, mask)
    # the token mean is the outcome's, any coef (to fp32 rounding of the centred process term)
    assert means == pytest.approx(outcome.tolist(), abs=1e-5 * max(1.0, coef))
    assert all(means[0] > m for m in means[1:])
    assert torch.equal(adv[mask == 0], torch.zeros(int((mask == 0).sum())))
    # within a completion the process term still moves credit: the slip row's tokens are not all equal
    assert adv[1][mask[1] > 0].std() > 0


def test_grpo_batch_with_process_coef_combines_outcome_and_oracle(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=TOK.vocab_size, n_layer=1, n_embd=32, n_head=4, n_kv_head=2,
                    intermediate_size=96, max_seq_len=128)
    GPT(cfg).save_pretrained(tmp_path / "init")
    TOK.save(tmp_path / "init")
    roll, verdicts = group_roll()
    roll["sampler_logps"] = torch.zeros(roll["completion_ids"].shape)
    flags = ["--group-size", "4", "--batch-size", "1", "--reward", "steps"]
    for coef in (None, "0.5"):
        args, ctx = posttrain.prepare("grpo", posttrain.get_args(
            ["--stage", "grpo", "--init", str(tmp_path / "init"), *TINY, *flags,
             *(["--process-coef", coef] if coef else [])]))
        monkeypatch.setattr(posttrain, "sample_groups",
                            lambda ctx, args, model: ([PROMPT] * 4, [t for t, _ in GROUP], verdicts, dict(roll)))
        batch, stats = posttrain.grpo_batch(ctx, args, 0)
        assert stats["cut_off"] == 0.5 and stats["reward"] == 0.25
        mask = batch["completion_mask"].float()
        means = token_means(batch["adv"], mask)
        if coef:
            expected = group_advantages(torch.tensor([1.0, 0, 0, 0]), 4).tolist()
            assert means == pytest.approx(expected, abs=1e-5)
        else:
            assert means[0] == max(means)


def test_process_coef_needs_grpo_with_a_process_reward(refused, tmp_path):
    out = str(tmp_path / "out")
    assert "--process-coef" in refused("--stage", "grpo", "--process-coef", "1", "--out-dir", out)
    assert "--process-coef" in refused("--stage", "ppo", "--reward", "steps", "--process-coef", "1",
                                       "--out-dir", out)
    assert "--process-coef" in refused("--stage", "grpo", "--reward", "prm", "--process-coef", "-1",
                                       "--out-dir", out)
    assert "--reward steps" in refused("--stage", "grpo", "--reward", "steps", "--policy-loss", "gspo",
                                       "--out-dir", out)


# -----------------------------------------------------------------------------------------------------------
# the balanced PRM loss


def test_balanced_prm_loss_weighs_the_two_classes_half_each():
    logits = torch.tensor([[2.0, 1.0, -0.5], [3.0, 0.5, 9.9]])
    labels = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # by hand: right steps 2.0, 1.0, 3.0 -> softplus(-z); wrong steps -0.5, 0.5 -> softplus(z)
    sp = lambda z: math.log1p(math.exp(z))  # noqa: E731
    right = (sp(-2.0) + sp(-1.0) + sp(-3.0)) / 3
    wrong = (sp(-0.5) + sp(0.5)) / 2
    assert prm_loss(logits, labels, mask, balance=True).item() == pytest.approx((right + wrong) / 2, rel=1e-6)
    assert prm_loss(logits, labels, mask).item() == pytest.approx((3 * right + 2 * wrong) / 5, rel=1e-6)
    assert prm_loss(torch.zeros(2, 3), labels, mask, balance=True).item() == pytest.approx(math.log(2))
    only_right = torch.ones(2, 3)  # one class absent: the plain mean
    assert prm_loss(logits, only_right, mask, balance=True).item() == pytest.approx(
        prm_loss(logits, only_right, mask).item(), rel=1e-6)
    z = logits.clone().requires_grad_(True)
    prm_loss(z, labels, mask, balance=True).backward()
    assert z.grad[1, 2] == 0  # padding gets no gradient
    assert z.grad[0, 2].item() == pytest.approx(torch.sigmoid(torch.tensor(-0.5)).item() / 4, rel=1e-5)


def test_prm_token_rows_label_every_step_token_and_agree_with_the_step_rows_at_each_step_end():
    roll, verdicts = group_roll()
    texts = [t for t, _ in GROUP]
    rows = posttrain.prm_token_rows(roll, [PROMPT] * len(GROUP), texts, verdicts)
    steps = posttrain.prm_rows(roll, verdicts, [v.step_labels for v in verdicts])
    for b, (text, done) in enumerate(GROUP):
        n = int(rows["step_mask"][b].sum())
        ends, labels = rows["step_ends"][b, :n].tolist(), rows["step_labels"][b, :n].tolist()
        # every character up to the last ';', then the EOS of a finished row
        assert ends == list(range(text.rindex(";") + 1)) + [len(text)] * done
        assert labels[:len(ends) - done] == task.token_labels(PROMPT, text)
        # at every ';' and at the EOS the labels are the step rows' labels
        k = int(steps["step_mask"][b].sum())
        assert [labels[ends.index(e)] for e in steps["step_ends"][b, :k].tolist()] == steps["step_labels"][b, :k].tolist()
    # the slip "15+3=19;" of row 1 is wrong from its "9" on, and so is its answer
    slip = GROUP[1][0].index("19;") + 1
    assert rows["step_labels"][1, slip - 1:slip + 2].tolist() == [1.0, 0.0, 0.0]
    assert rows["step_labels"][1, int(rows["step_mask"][1].sum()) - 1] == 0.0
    assert rows["w"].tolist() == rows["step_mask"].sum(1).tolist()


def test_prm_tokens_is_refused_with_monte_carlo_labels(refused, tmp_path):
    assert "--prm-tokens" in refused("--stage", "prm", "--prm-labels", "mc", "--prm-tokens",
                                     "--out-dir", str(tmp_path / "out"))


def test_ranking_auc_and_best_balanced_accuracy_by_hand():
    z = torch.tensor([0.9, 0.8, 0.8, 0.3, 0.1])
    right = torch.tensor([True, True, False, False, False])
    # pairs (right, wrong): 0.9 beats all 3; 0.8 ties one 0.8 (a half) and beats 2 -> (3 + 2.5) / 6
    assert posttrain.ranking_auc(z, right) == pytest.approx(5.5 / 6)
    # t = 0.9: (1/2 + 1) / 2; t = 0.8: (1 + 2/3) / 2 (the tied wrong step comes along); t = 0.3: (1 + 1/3) / 2
    assert posttrain.best_balanced_accuracy(z, right) == pytest.approx((5 / 6, 0.8))
    assert posttrain.ranking_auc(-z, right) == pytest.approx(0.5 / 6)  # reversed scores: 1 - AUC
    assert math.isnan(posttrain.ranking_auc(z, torch.ones(5, dtype=torch.bool)))


# -----------------------------------------------------------------------------------------------------------
# the log-odds PRM (--prm-score logodds): the step's least likely written token, scaled and shifted


def test_token_logodds_is_log_p_over_one_minus_p_and_stays_finite_where_p_rounds_to_one():
    logits = torch.randn(3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(1))
    p = logits.softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    assert torch.allclose(posttrain.token_logodds(logits, ids), (p / (1 - p)).log())
    sure = torch.tensor([[[30.0, 0.0, 0.0]]])  # fp32 softmax gives p = 1 exactly: log(p / (1 - p)) = inf
    assert sure.softmax(-1)[0, 0, 0] == 1.0
    assert posttrain.token_logodds(sure, torch.tensor([[0]])).item() == pytest.approx(30 - math.log(2))


def test_step_minimum_takes_the_minimum_within_each_step_and_over_the_whole_completion_at_eos():
    # "12;3;#4" + EOS, and a shorter, padded row "5;#5" + EOS
    ids = [TOK.completion_ids("12;3;#4"), TOK.completion_ids("5;#5")]
    roll = posttrain.completion_rows(TOK, ["1+2="] * 2, ids, "cpu")
    x = torch.tensor([[5.0, 0.5, 4.0, 6.0, 2.0, 7.0, 3.0, 8.0],
                      [4.0, 9.0, 6.0, 5.0, 7.0, 1.0, 1.0, 1.0]], requires_grad=True)
    m = posttrain.step_minimum(x, roll["completion_ids"], roll["completion_mask"])
    # step "12;": 5, then 0.5 twice; step "3;": 6, 2; the answer "#4": 7, 3; the EOS: 0.5, the whole row's least
    assert m[0].tolist() == [5.0, 0.5, 0.5, 6.0, 2.0, 7.0, 3.0, 0.5]
    assert m[1].tolist() == [4.0, 4.0, 6.0, 5.0, 4.0, 0.0, 0.0, 0.0]  # padding reads 0
    m[0, 7].backward()
    assert x.grad[0].tolist() == [0, 1, 0, 0, 0, 0, 0, 0] and x.grad[1].abs().sum() == 0


def logodds_prm(a, b):
    torch.manual_seed(0)
    prm = GPT(GPTConfig(vocab_size=TOK.vocab_size, n_layer=1, n_embd=32, n_head=2, n_kv_head=1,
                        score_head=True, score_from="token_logodds"))
    with torch.no_grad():
        prm.score.weight.fill_(a), prm.score.bias.fill_(b)
    return prm


def test_logodds_prm_scores_each_step_by_its_least_likely_written_token():
    roll, _ = group_roll()
    prm = logodds_prm(2.0, -1.0)
    scores = posttrain.completion_scores(prm, roll, args_for())  # (B, N)
    # by hand: the forward's probability of each written completion token, then log p / (1 - p)
    ids, attn = posttrain.rollout.sequence(roll["prompt_ids"], roll["prompt_mask"], roll["completion_ids"],
                                           roll["completion_mask"])
    P = roll["prompt_ids"].shape[1]
    with torch.no_grad():
        probs = prm(ids, attn_mask=attn)[:, P - 1:-1].double().softmax(-1)
    p = probs.gather(-1, roll["completion_ids"][..., None]).squeeze(-1)
    z = (p / (1 - p)).log()
    for b, (text, done) in enumerate(GROUP):
        start = 0
        for end in [i for i, c in enumerate(text) if c == ";"]:
            assert scores[b, end].item() == pytest.approx(2 * z[b, start:end + 1].min().item() - 1, abs=1e-4)
            start = end + 1
        if done:  # the answer step, at the EOS: the least likely token of the whole completion
            assert scores[b, len(text)].item() == pytest.approx(2 * z[b, :len(text) + 1].min().item() - 1,
                                                                abs=1e-4)
    with pytest.raises(ValueError, match="log-odds"):
        posttrain.completion_scores(prm, roll, args_for(), shift=True)  # no critic reading


def test_fit_scale_bias_reaches_the_closed_form_of_a_saturated_logistic_regression():
    # two values of the feature, both classes at each: the optimum puts sigmoid(a z + b) at the (class-weighted)
    # fraction of right steps at each z. z = 0: 1 right, 6 wrong; z = 1: 3 right, 2 wrong.
    z = torch.tensor([0.0] * 7 + [1.0] * 5, dtype=torch.float64)
    y = torch.tensor([1.0] + [0.0] * 6 + [1.0] * 3 + [0.0] * 2, dtype=torch.float64)
    # balanced: a right step weighs 1/8, a wrong one 1/16 -> 1/4 right at z = 0, 3/4 at z = 1
    a, b = posttrain.fit_scale_bias(z, y, balance=True)  # prm_loss computes in fp32: 1e-3 is its precision here
    assert (a, b) == pytest.approx((2 * math.log(3), -math.log(3)), abs=1e-3)
    # plain mean: 1/7 right at z = 0, 3/5 at z = 1
    a, b = posttrain.fit_scale_bias(z, y, balance=False)
    assert b == pytest.approx(-math.log(6), abs=1e-3) and a + b == pytest.approx(math.log(1.5), abs=1e-3)
    assert posttrain.fit_scale_bias(z, torch.ones(12, dtype=torch.float64), balance=True) == (1.0, 0.0)


def test_a_logodds_prm_checkpoint_keeps_its_kind_scale_and_bias(tmp_path):
    prm = logodds_prm(0.75, -3.5)
    prm.save_pretrained(tmp_path / "prm")
    cfg = json.loads((tmp_path / "prm" / "config.json").read_text())
    assert cfg["score_head"] is True and cfg["score_from"] == "token_logodds"
    back = GPT.from_pretrained(tmp_path / "prm")
    assert back.config.score_from == "token_logodds" and back.score.weight.shape == (1, 1)
    assert (back.score.weight.item(), back.score.bias.item()) == (0.75, -3.5)
    GPT(GPTConfig(score_head=True)).save_pretrained(tmp_path / "plain")  # a hidden-state head: no new key
    assert "score_from" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    cfg["score_from"] = "entropy"
    (tmp_path / "prm" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: score_from is 'entropy'"):
        GPT.from_pretrained(tmp_path / "prm")
