"""The on-policy stages (grpo, ppo, rft) and the process reward model (prm), on tiny models. CPU, < 1 minute.

Closed-form where possible: the first PPO/GRPO ratio is exactly 1 and the KL to an identical reference exactly
0; equal rewards give exactly zero gradient; the PPO reward and GAE targets are checked against a hand loop;
RFT and the Monte-Carlo PRM labels are checked against the verifier and an oracle continuer. Then each stage
runs end to end through posttrain.main from an empty folder (pretrain and sft are built first, 2 steps each).
"""

import dataclasses
import json
import os
import random
import shutil

import pytest
import torch

import posttrain
from data import task
from losses import group_advantages
from data.tokenizer import Tokenizer
from model import GPT, GPTConfig

torch.set_num_threads(1)
TOK = Tokenizer(task.DATA_DIR)  # the built-in character-level tokenizer
TINY = ["--n-layer", "1", "--n-embd", "32", "--threads", "1"]


def tiny_folder(path, seed=0, n_layer=1, n_embd=32):
    """A random tiny model saved as a checkpoint folder (the init of a stage)."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=TOK.vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=4, n_kv_head=2,
                    intermediate_size=3 * n_embd, max_seq_len=128)
    GPT(cfg).save_pretrained(path)
    TOK.save(path)
    return str(path)


def stage_args(stage, init, *flags):
    """The flags a stage sees inside train_stage, for calling its functions directly."""
    args = posttrain.stage_args(posttrain.get_args(["--stage", stage, "--init", init, "--device", "cpu", *TINY,
                                                    *flags]), stage)
    args.init_folder = init
    return args


def toy_roll(prompt, completions):
    """Rollout tensors (as sample_groups returns them) of hand-written finished completions of one prompt."""
    ids = [TOK.completion_ids(c) for c in completions]
    return posttrain.completion_rows(TOK, [prompt] * len(completions), ids, "cpu")


def seq_logps(model, roll, args):
    return posttrain.chunked_logps(model, roll, args).sum(1)  # (B,) masked positions hold 0


# -----------------------------------------------------------------------------------------------------------
# grpo / ppo: the first update, the direction of an update, equal rewards


@pytest.mark.parametrize("stage,kl_coef,chunked,extra", [
    ("grpo", "0.1", False, []), ("grpo", "0", False, []), ("ppo", "0.1", False, []), ("grpo", "0.1", True, []),
    ("grpo", "0.1", False, ["--policy-loss", "gspo"]),
    ("grpo", "0.1", False, ["--policy-loss", "cispo", "--tis-cap", "2", "--entropy-coef", "0.01"]),
    ("ppo", "0.1", False, ["--policy-loss", "cispo", "--tis-cap", "2"])])
def test_first_update_ratio_is_one_and_kl_is_zero(tmp_path, monkeypatch, stage, kl_coef, chunked, extra):
    if chunked:  # the LM head one row at a time, recomputed in backward: still one log-prob path
        monkeypatch.setattr(posttrain.rollout, "LOGIT_CHUNK", 1)
    init = tiny_folder(tmp_path / "init")
    # 6 rows in micro-batches of 4: the rollout's log-probs and the update's forward see the same chunks.
    # At --kl-coef 0 the KL is still measured and logged, and must be 0 too.
    args = stage_args(stage, init, "--kl-coef", kl_coef, "--batch-size", "2", "--group-size", "3",
                      "--max-new-tokens", "12", "--micro-batch-size", "4", "--no-dynamic-sampling", *extra)
    args, ctx = posttrain.prepare(stage, args)
    policy = ctx["policy"]
    roll, stats = posttrain.STAGES[stage].make_batch(ctx, args, 0)
    assert stats["kl_ref"] == 0.0  # the reference is a second copy of the same weights
    if "--tis-cap" in extra:  # sampler and trainer agree up to float noise in fp32: weights of about 1
        assert abs(stats["tis_weight_mean"] - 1) < 1e-3 and stats["tis_clip_frac"] == 0.0
    for sl in posttrain.chunks(len(roll["w"]), args.micro_batch_size):
        mb = {k: v[sl] for k, v in roll.items()}
        valid = mb["completion_mask"].bool()
        logps, _ = posttrain.completion_forward(policy, mb, args)
        assert torch.equal(logps[valid], mb["old_logps"][valid])  # bitwise: one log-prob path
        _, metrics = posttrain.STAGES[stage].loss(ctx, args, mb)
        assert metrics["ratio_mean"].item() == 1.0
        assert metrics["approx_kl"].item() == 0.0 and metrics["clip_frac"].item() == 0.0
        if stage == "grpo":
            assert torch.equal(mb["ref_logps"][valid], mb["old_logps"][valid])


def grpo_toy(tmp_path, rewards):
    """One prompt, two hand-written completions with the given rewards, ready for grpo_loss."""
    init = tiny_folder(tmp_path / "init")
    args = stage_args("grpo", init, "--group-size", "2")
    policy = GPT.from_pretrained(init)
    roll = toy_roll("1+1=", ["1+1=2;#2", "1+1=3;#3"])
    roll["old_logps"] = posttrain.chunked_logps(policy, roll, args)  # (2, N)
    roll["adv"] = group_advantages(torch.tensor(rewards), 2)  # (2,)
    return policy, {"policy": policy}, args, roll


def test_grpo_update_moves_probability_to_the_rewarded_completion(tmp_path):
    policy, ctx, args, roll = grpo_toy(tmp_path, [1.0, 0.0])
    before = seq_logps(policy, roll, args)  # (2,)
    loss, _ = posttrain.grpo_loss(ctx, args, roll)
    loss.backward()
    torch.optim.SGD(policy.parameters(), lr=0.5).step()
    after = seq_logps(policy, roll, args)
    assert after[0] > before[0] + 1e-3  # the rewarded completion became more likely
    assert after[1] < before[1] - 1e-3  # the unrewarded one less likely


def test_grpo_equal_rewards_give_exactly_zero_gradient(tmp_path):
    policy, ctx, args, roll = grpo_toy(tmp_path, [1.0, 1.0])
    loss, _ = posttrain.grpo_loss(ctx, args, roll)
    loss.backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and all(bool((g == 0).all()) for g in grads)


# -----------------------------------------------------------------------------------------------------------
# ppo: where the reward sits, GAE targets by hand


def test_ppo_token_rewards_sit_on_the_last_real_token():
    score = torch.tensor([1.0, 0.5])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).float()
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.4, 0.5, 9.0, 9.0]])  # 9.0: junk on padding, must not count
    r = posttrain.ppo_token_rewards(score, kl, mask, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 1.0, 0.0], [-0.2, -0.25 + 0.5, 0.0, 0.0]])
    torch.testing.assert_close(r, expected)


def hand_gae(rewards, values, mask, gamma, lam):
    """GAE over the valid tokens of each row, by plain Python loops (bootstrap 0 after the last valid one)."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t] > 0]
        next_value, next_adv = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t].item()
            adv[b, t] = next_adv
    return adv, (adv + values) * mask


def test_ppo_batch_rewards_and_gae_targets_match_a_hand_computation(tmp_path, monkeypatch):
    init = tiny_folder(tmp_path / "init")
    args = stage_args("ppo", init, "--kl-coef", "0.1", "--group-size", "3", "--lam", "0.9")
    args, ctx = posttrain.prepare("ppo", args)
    # a critic with non-zero values (a fresh one says 0 everywhere) and a reference unlike the policy
    with torch.no_grad():
        ctx["critic"].score.weight.normal_(0, 1.0)
        for p in ctx["ref"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompt = "12+5-3="
    texts = ["12+5=17;17-3=14;#14", "12+5=17;17-3=15;#15", "#14"]  # right, wrong, right (no steps)
    fake = (
        [prompt] * 3, texts, [task.verify(prompt, t) for t in texts], toy_roll(prompt, texts))
    monkeypatch.setattr(posttrain, "sample_groups", lambda *a, **k: fake)
    roll, stats = posttrain.ppo_batch(ctx, args, 0)
    mask = roll["completion_mask"].float()
    ref_logps = posttrain.chunked_logps(ctx["ref"], roll, args)
    kl_part = -0.1 * (roll["old_logps"] - ref_logps) * mask  # (B, N)
    score_part = roll["rewards"] - kl_part
    last = mask.sum(1).long() - 1
    for b, correct in enumerate([1.0, 0.0, 1.0]):
        expected = torch.zeros(mask.shape[1])
        expected[last[b]] = correct  # the verifier's score on the EOS, nowhere else (not on the first pad)
        torch.testing.assert_close(score_part[b], expected, atol=1e-6, rtol=0)
    adv, returns = hand_gae(roll["rewards"], roll["old_values"], mask, gamma=1.0, lam=0.9)
    torch.testing.assert_close(roll["returns"], returns, atol=1e-5, rtol=0)
    # the advantages are the hand ones whitened over the valid tokens: masked mean 0, masked variance 1
    valid = mask.bool()
    whitened = (adv[valid] - adv[valid].mean()) / adv[valid].var(unbiased=False).add(1e-8).sqrt()
    torch.testing.assert_close(roll["adv"][valid], whitened, atol=1e-5, rtol=0)
    assert stats["reward"] == pytest.approx(2 / 3)


# -----------------------------------------------------------------------------------------------------------
# rft: only verified samples are kept


def test_rft_keeps_only_verified_distinct_samples(tmp_path, monkeypatch):
    init = tiny_folder(tmp_path / "init")
    args = stage_args("rft", init, "--group-size", "4", "--batch-size", "1", "--round-prompts", "1",
                      "--steps", "4", "--rounds", "2")
    args, ctx = posttrain.prepare("rft", args)
    prompt = "30-7+2="
    right = "30-7=23;23+2=25;#25"
    texts = [right, "30-7=23;23+2=26;#26", right, right + ";"]  # right, wrong, duplicate (kept once), bad
    verdicts = [task.verify(prompt, t) for t in texts]
    # right text but cut off at the length limit: sample_groups marks it wrong
    cut_off = dataclasses.replace(task.verify(prompt, "30-7=23;#23"), correct=False)
    fake = ([prompt] * 5, texts + ["30-7=23;#23"], verdicts + [cut_off], None)
    monkeypatch.setattr(posttrain, "sample_groups", lambda *a, **k: fake)
    batch, stats = posttrain.rft_batch(ctx, args, 0)
    seqs = ctx["data"]["seqs"]
    assert len(seqs) == 1 and stats["kept_frac"] == pytest.approx(2 / 5) and stats["kept_distinct"] == 1
    kept_text = TOK.decode(seqs[0][len(TOK.prompt_ids(prompt)):])
    assert kept_text == right and task.verify(prompt, kept_text).correct
    # an SFT batch of it: loss only on the completion (and its EOS), never on the prompt
    n_prompt = len(TOK.prompt_ids(prompt))
    assert bool((batch["labels"][:, :n_prompt] == posttrain.IGNORE_INDEX).all())
    assert int(batch["w"][0]) == len(right) + 1
    # steps 1 is inside round 1: no new sampling; step 2 starts round 2
    calls = []
    monkeypatch.setattr(posttrain, "sample_groups", lambda *a, **k: calls.append(1) or fake)
    posttrain.rft_batch(ctx, args, 1)
    assert not calls
    posttrain.rft_batch(ctx, args, 2)
    assert calls and ctx["round"] == 2


# -----------------------------------------------------------------------------------------------------------
# prm: labels (verifier and Monte-Carlo), positions, a short real training


def consistent_continuer(prompts, prefixes):
    """An oracle policy: carries on from the last written result with the prompt's remaining operations."""
    texts = []
    for prompt, prefix in zip(prompts, prefixes):
        problem = task.parse_prompt(prompt)
        steps = prefix.split(";")[:-1]
        value = int(steps[-1].split("=")[1])
        rest = ""
        for op, b in list(zip(problem.ops, problem.operands[1:]))[len(steps):]:
            new = value + b if op == "+" else value - b
            rest += f"{value}{op}{b}={new};"
            value = new
        texts.append(prefix + rest + f"#{value}")
    return texts, [True] * len(texts)


def test_mc_labels_with_a_consistent_continuer_are_the_prefix_labels():
    rng = random.Random(0)
    problems = [task.make_problem(rng, rng.randint(3, 6), 99, 49) for _ in range(40)]
    prompts = [p.prompt for p in problems]
    texts = [task.solution(p, rng, error_rate=0.7) for p in problems]
    verdicts = [task.verify(p, t) for p, t in zip(prompts, texts)]
    labels = posttrain.mc_step_labels(prompts, texts, verdicts, consistent_continuer, n=2)
    assert labels == [v.prefix_labels for v in verdicts]
    assert any(0 in lab for lab in labels) and any(1 in lab for lab in labels)  # both kinds occur


def test_mc_labels_are_a_hard_estimate_any_of_n():
    prompt, text = "5+3-2=", "5+3=8;8-2=6;#6"
    verdicts = [task.verify(prompt, text)]

    def one_in_three(prompts, prefixes):  # only the last of every n = 3 tries reaches the answer
        right, _ = consistent_continuer(prompts, prefixes)
        return [t if i % 3 == 2 else "#7" for i, t in enumerate(right)], [True] * len(right)

    def never(prompts, prefixes):
        return ["#7"] * len(prefixes), [True] * len(prefixes)

    def cut_off(prompts, prefixes):  # right text, but no EOS: does not count
        return consistent_continuer(prompts, prefixes)[0], [False] * len(prefixes)

    assert posttrain.mc_step_labels([prompt], [text], verdicts, consistent_continuer, n=3) == [[1, 1]]
    assert posttrain.mc_step_labels([prompt], [text], verdicts, one_in_three, n=3)[0] == [1, 1]
    assert posttrain.mc_step_labels([prompt], [text], verdicts, never, n=3) == [[0, 0]]
    assert posttrain.mc_step_labels([prompt], [text], verdicts, cut_off, n=3) == [[0, 0]]


def test_prm_rows_put_labels_on_step_ends_and_the_answer_on_eos():
    prompt = "12+5-3="
    texts = ["12+5=17;17-3=15;#15", "#14"]
    verdicts = [task.verify(prompt, t) for t in texts]
    roll = toy_roll(prompt, texts)
    roll["completion_ids"][1, 6] = posttrain.STEP_END  # a ';' in row 1's padding (mask 0) is not a step
    rows = posttrain.prm_rows(roll, verdicts, [v.step_labels for v in verdicts])
    # row 0: ';' at 7 and 15 (right, then a wrong result), the EOS at 19 closes a wrong answer
    assert rows["step_ends"][0].tolist() == [7, 15, 19] and rows["step_labels"][0].tolist() == [1, 0, 0]
    # row 1: no steps, only the (right) answer at its EOS
    assert rows["step_mask"][1].tolist() == [1, 0, 0] and rows["step_ends"][1, 0] == 3
    assert rows["step_labels"][1, 0] == 1 and rows["w"].tolist() == [3, 1]
    ends = rows["step_ends"][0]
    assert [texts[0][e] for e in ends[:2]] == [";", ";"] and roll["completion_ids"][0, ends[2]] == task.EOS


def blatant_solution(problem, rng):
    """A worked solution whose last step, half the time, has its result (and so the answer) off by +50: every
    true value here is <= 19, so a wrong step is one whose result is >= 50: a label learnt in seconds."""
    text = task.solution(problem)
    if rng.random() < 0.5:
        steps = text.split(";")  # [..., "a+b=c", "#c"]
        lhs, c = steps[-2].split("=")
        steps[-2:] = [f"{lhs}={int(c) + 50}", f"#{int(c) + 50}"]
        text = ";".join(steps)
    return text


def prm_data(rng, split, n):
    """n (prompt, completion) pairs of 2..4 operands in 0..9 with values in 0..19, from one hash split."""
    problems = task.sample_distinct(rng, task.Difficulty(2, 4, max_value=19, max_operand=9), n, split)
    prompts = [p.prompt for p in problems]
    texts = [blatant_solution(p, rng) for p in problems]
    verdicts = [task.verify(p, t) for p, t in zip(prompts, texts)]
    roll = posttrain.completion_rows(TOK, prompts, [TOK.completion_ids(t) for t in texts], "cpu")
    return posttrain.prm_rows(roll, verdicts, [v.step_labels for v in verdicts])


def test_prm_trained_on_verifier_labels_beats_chance(tmp_path):
    """A few seconds of real PRM training (prm_rows -> prm_loss_fn; prm_evaluate) on clear labels."""
    init = tiny_folder(tmp_path / "init", n_layer=1, n_embd=32)
    args = stage_args("prm", init)
    prm = GPT.from_pretrained(init, score_head=True)
    rng = random.Random(0)
    ctx = {"policy": prm, "heldout": prm_data(rng, "test", 150)}
    before = posttrain.prm_evaluate(ctx, args)
    train = prm_data(rng, "train", 1000)
    opt = torch.optim.AdamW(prm.parameters(), lr=3e-3)
    for step in range(100):
        idx = torch.randint(0, len(train["w"]), (32,), generator=torch.Generator().manual_seed(step))
        loss, _ = posttrain.prm_loss_fn(ctx, args, {k: v[idx] for k, v in train.items()})
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = posttrain.prm_evaluate(ctx, args)
    base = after["prm_step_base_rate"]
    assert 0.55 < base < 0.95  # both kinds of steps occur in the held-out set
    assert before["prm_step_balanced_acc"] == 0.5  # a zero score head is a constant guess
    assert after["prm_step_balanced_acc"] > 0.9  # any constant guess scores 0.5
    assert after["prm_step_acc"] > max(base, 1 - base) + 0.05  # better than the majority class
    assert after["prm_answer_acc"] > 0.9


# -----------------------------------------------------------------------------------------------------------
# every stage end to end, from an empty folder: pretrain and sft are built first (2 steps each)

E2E = ["--steps", "2", "--eval-problems", "8", "--eval-samples", "1", "--batch-size", "4", "--group-size",
       "2", "--max-new-tokens", "16", "--micro-batch-size", "8", "--round-prompts", "8", "--mc-rollouts", "2",
       "--no-dynamic-sampling", *TINY]  # 2-step models solve nothing: without it every grpo group is dropped


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


def assert_stage_folder(folder):
    for name in ("config.json", "model.safetensors", "metrics.jsonl", "args.json", "eval.json"):
        assert os.path.isfile(os.path.join(folder, name)), name
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        assert len(f.readlines()) == 2


def test_a_stage_that_made_no_optimizer_step_writes_nothing(out_dir, capsys):
    # rft from a 2-step sft keeps no sample (none is right), so every batch is empty: no update, no folder
    with pytest.raises(SystemExit) as e:
        posttrain.main(["--stage", "rft", "--out-dir", str(out_dir), *E2E])
    assert e.value.code == 1 and "no optimizer step" in capsys.readouterr().err
    assert not (out_dir / "rft").exists() and (out_dir / "sft" / "model.safetensors").is_file()


@pytest.mark.parametrize("stage, extra", [
    ("grpo", []), ("ppo", []), ("prm", []), ("prm", ["--prm-labels", "mc"]),
    ("grpo", ["--reward", "prm"]), ("ppo", ["--reward", "prm"]), ("grpo", ["--reward", "rm"]),
    ("grpo", ["--reward", "steps"]), ("ppo", ["--reward", "steps"]),
    ("grpo", ["--reward", "prm", "--process-coef", "1"]),
])
def test_stage_runs_end_to_end(out_dir, stage, extra):
    posttrain.main(["--stage", stage, "--out-dir", str(out_dir), *E2E, *extra])
    folder = out_dir / stage
    assert_stage_folder(folder)
    saved = json.load(open(folder / "args.json"))
    assert saved["stage"] == stage and saved["reward"] == (extra[1] if "--reward" in extra else "verifier")
    if stage == "prm":
        assert json.load(open(folder / "config.json"))["score_head"] is True
        after = json.load(open(folder / "eval.json"))["after"]
        assert after["step_accuracy"] == after["prm_step_acc"] and "step_balanced_accuracy" in after
    if "--reward" in extra and extra[1] != "steps":  # steps: the verifier's labels, no model
        assert (out_dir / extra[1] / "model.safetensors").is_file()  # the scorer was built (or found) first
    if stage in ("grpo", "ppo"):
        rows = [json.loads(line) for line in open(folder / "metrics.jsonl")]
        assert all(0 <= r["cut_off"] <= 1 for r in rows)  # a reward-hacking signal, logged every step


@pytest.mark.parametrize("score", ["hidden", "logodds"])
def test_both_kinds_of_prm_train_and_reward_grpo(out_dir, tmp_path, score):
    """A PRM of either --prm-score from the shared sft, then grpo --reward prm with it as its scorer."""
    if not (out_dir / "sft").is_dir():  # run alone (-k): build the shared chain first
        posttrain.main(["--stage", "sft", "--out-dir", str(out_dir), *E2E])
    shutil.copytree(out_dir / "sft", tmp_path / "sft")  # the init both stages find in their --out-dir
    run = ["--out-dir", str(tmp_path), *E2E]
    posttrain.main(["--stage", "prm", "--prm-score", score, *run])
    cfg = json.load(open(tmp_path / "prm" / "config.json"))
    assert cfg.get("score_from", "hidden") == {"hidden": "hidden", "logodds": "token_logodds"}[score]
    assert json.load(open(tmp_path / "prm" / "args.json"))["prm_score"] == score
    posttrain.main(["--stage", "grpo", "--reward", "prm", *run])
    rows = [json.loads(line) for line in open(tmp_path / "grpo" / "metrics.jsonl")]
    assert all(0 < r["prm_step_reward"] < 1 for r in rows)  # sigmoid of the PRM's logits, of either kind
