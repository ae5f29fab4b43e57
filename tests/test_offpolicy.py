"""dpo, rm, distill and the eval stage through the real stage code: values at initialisation, learning on a
toy preference, zero distillation loss for a student equal to its teacher, each stage end to end via main().

CPU only, tiny models (1 layer, width 32). The learning tests use a toy preference that a tiny model picks up
in a few dozen steps (a finished solution over the same steps without its "#answer"): they check that the pair
code learns what the pairs say and generalises to held-out prompts, not that a tiny model learns arithmetic.
"""

import json
import math
import os
from contextlib import nullcontext

import pytest
import torch

import posttrain
from data import task
from data.tokenizer import Tokenizer
from model import GPT, GPTConfig
from posttrain import STAGES

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
TINY = ["--n-layer", "1", "--n-embd", "32", "--threads", "1", "--eval-problems", "6", "--eval-samples", "1",
        "--max-new-tokens", "16"]
RUN = TINY[4:]  # the same without the model-shape flags, for a run whose --init gives the model
TOK = Tokenizer(task.DATA_DIR)  # the built-in character-level tokenizer


def tiny_checkpoint(folder, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=18, n_layer=1, n_embd=32, n_head=4, n_kv_head=2, intermediate_size=96))
    model.save_pretrained(folder, tokenizer_path=task.TOKENIZER_PATH)
    return str(folder)


def small_data(folder, n=256):
    """A data dir with the first n rows of every shipped file: the same data, set up in a fraction of time."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(DATA):
        if name.endswith(".jsonl"):
            with open(os.path.join(DATA, name)) as src, open(os.path.join(folder, name), "w") as dst:
                dst.writelines(line for _, line in zip(range(n), src))
    return str(folder)


def stage_ctx(name, argv):
    """What train_stage does before its loop (posttrain.prepare): the stage's flags and its ctx."""
    args, ctx = posttrain.prepare(name, posttrain.get_args(["--stage", name, "--device", "cpu", *argv]))
    return ctx, args


def test_pack_rows_first_fit_decreasing():
    # longest first, each into the first row with room: 6 | 5 | 4 + 2 | 3
    assert posttrain.pack_rows([5, 3, 4, 2, 6], 6) == [[4], [0], [2, 3], [1]]
    assert posttrain.pack_rows([2, 2, 2], 6) == [[0, 1, 2]]
    assert posttrain.pack_rows([3], 3) == [[0]]


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_packed_lm_batch_is_the_unpacked_loss(tmp_path, stage):
    # lm_batch packs several sequences into a row; the loss and its gradient must be those of the same
    # sequences one per row: the token mean of -log p over every labelled token
    init = [] if stage == "pretrain" else ["--init", tiny_checkpoint(tmp_path / "init")]
    ctx, args = stage_ctx(stage, ["--out-dir", str(tmp_path / "out"), "--batch-size", "16",
                                  "--data-dir", small_data(tmp_path / "data"), *TINY, *init])
    order = posttrain.Shuffler(len(ctx["seqs"]), args.seed)  # the stage's own order, replayed
    batch = posttrain.lm_batch(ctx, args, 0)
    idx = order.take(16)
    assert len(batch["ids"]) < 16 and batch["ids"].shape[1] == max(len(ctx["seqs"][i]) for i in idx)
    # every sequence is in the batch exactly once, as one segment of the mask
    segments = []
    for row, m in zip(batch["ids"].tolist(), batch["mask"].tolist()):
        for k in range(1, max(m) + 1):
            segments.append([t for t, mk in zip(row, m) if mk == k])
    assert sorted(segments) == sorted(ctx["seqs"][i] for i in idx)
    model = ctx["policy"]
    loss, _ = posttrain.lm_loss(ctx, args, batch)
    loss.backward()
    grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    total, count = 0.0, 0
    for i in idx:
        seq, n_prompt = torch.tensor(ctx["seqs"][i]), ctx["n_prompt"][i]
        logp = model(seq[None])[0, :-1].log_softmax(-1).gather(-1, seq[1:, None])[:, 0]  # (n - 1,)
        total = total - logp[n_prompt - 1:].sum()  # targets from the first completion token on
        count += len(seq) - n_prompt
    (total / count).backward()
    assert abs(loss.item() - (total / count).item()) <= 1e-5
    assert (grad - model.model.embed_tokens.weight.grad).abs().max() <= 1e-6
    assert batch["w"].sum() == count


def toy_rows(split, n):
    rows = task.read_jsonl(os.path.join(DATA, split + ".jsonl"), {"prompt": str, "answer": int})[:n]
    out = []
    for r in rows:
        solution = task.solution(task.parse_prompt(r["prompt"]))
        out.append({"prompt": r["prompt"], "chosen": solution, "rejected": solution[:solution.index("#")]})
    return out


@pytest.fixture
def toy_data(tmp_path, monkeypatch):
    """A data dir whose pairs.jsonl holds the toy preference; held-out toy pairs on the test prompts."""
    data = small_data(tmp_path / "data")
    task.write_jsonl(os.path.join(data, "pairs.jsonl"), toy_rows("rl", 256))
    held_out = toy_rows("test", 64)
    monkeypatch.setattr(posttrain, "heldout_pairs", lambda t, args: posttrain.encode_pairs(t.tok, held_out))
    return data


# ------------------------------------------------------------------------------------------------------ dpo


# the loss at initialisation (policy == reference, margin d = 0), per --loss-type, at beta = 0.1:
# sigmoid -log sigmoid(0) = ln 2, with or without label smoothing; IPO (0 - 1 / (2 beta))^2 = 25; hinge 1
# KTO: each completion's loss is lambda / 2 at the reference, and a pair averages its two: (1 + 2) / 4 = 0.75
@pytest.mark.parametrize("flags,expected", [([], math.log(2)), (["--label-smoothing", "0.1"], math.log(2)),
                                            (["--loss-type", "ipo"], 25.0), (["--loss-type", "hinge"], 1.0),
                                            (["--loss-type", "kto"], 0.5),
                                            (["--loss-type", "kto", "--kto-weights", "1", "2"], 0.75)])
def test_dpo_loss_at_init(tmp_path, flags, expected):
    init = tiny_checkpoint(tmp_path / "init")
    ctx, args = stage_ctx("dpo", ["--init", init, "--data-dir", small_data(tmp_path / "data", 64),
                                  "--batch-size", "16", "--eval-problems", "8"] + flags)
    batch, _ = STAGES["dpo"].make_batch(ctx, args, 0)
    loss, metrics = STAGES["dpo"].loss(ctx, args, batch)
    assert loss.item() == pytest.approx(expected, abs=1e-4)
    assert metrics["margin"] == pytest.approx(0.0, abs=1e-5)
    held = STAGES["dpo"].evaluate(ctx, args)
    assert held == {"pair_acc": 0.5, "pair_margin": 0.0}  # exact ties: the same chunks as the reference


def test_orpo_needs_no_reference_and_is_sft_on_the_chosen_at_lambda_0(tmp_path):
    init = tiny_checkpoint(tmp_path / "init")
    ctx, args = stage_ctx("dpo", ["--init", init, "--data-dir", small_data(tmp_path / "data", 64),
                                  "--batch-size", "8", "--eval-problems", "8", "--loss-type", "orpo",
                                  "--orpo-lambda", "0"])
    assert "ref_chosen_logps" not in ctx["train"]
    batch, _ = STAGES["dpo"].make_batch(ctx, args, 0)
    loss, _ = STAGES["dpo"].loss(ctx, args, batch)
    # independently: the chosen completion's per-token NLL, averaged over pairs
    with torch.no_grad():
        logp = torch.log_softmax(ctx["policy"](batch["chosen_ids"]).float(), -1)[:, :-1]
        tok = logp.gather(-1, batch["chosen_ids"][:, 1:, None]).squeeze(-1)  # (B, T-1)
        m = batch["chosen_mask"][:, 1:].float()
        nll = -((tok * m).sum(1) / m.sum(1)).mean()
    assert loss.item() == pytest.approx(nll.item(), abs=1e-5)


def test_simpo_needs_no_reference(tmp_path):
    init = tiny_checkpoint(tmp_path / "init")
    ctx, args = stage_ctx("dpo", ["--init", init, "--data-dir", small_data(tmp_path / "data", 64),
                                  "--batch-size", "16", "--eval-problems", "8", "--loss-type", "simpo"])
    assert args.beta == 2.0 and "ref_chosen_logps" not in ctx["train"]
    ctx["order"] = posttrain.Shuffler(len(ctx["train"]["pairs"]), 0)
    batch, _ = STAGES["dpo"].make_batch(ctx, args, 0)
    loss, _ = STAGES["dpo"].loss(ctx, args, batch)
    # independently: -log sigmoid(beta * (avg_c - avg_r) - gamma), each avg over one unpadded forward
    idx = posttrain.Shuffler(len(ctx["train"]["pairs"]), 0).take(16)
    expected = []
    with torch.no_grad():
        for i in idx:
            prompt, chosen, rejected = ctx["train"]["pairs"][i]
            avg = []
            for completion in (chosen, rejected):
                ids = torch.tensor([prompt + completion])
                logp = torch.log_softmax(ctx["policy"](ids)[0].double(), -1)  # (T, V)
                avg.append(sum(logp[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1]))
                           / len(completion))
            expected.append(math.log1p(math.exp(-(2.0 * (avg[0] - avg[1]) - 0.5))))
    assert loss.item() == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def test_rpo_adds_the_chosen_per_token_nll(tmp_path):
    """At init the DPO part is ln 2, so the loss is ln 2 + alpha * mean over pairs of the chosen completion's
    per-token NLL, here recomputed from one unpadded forward per pair."""
    init = tiny_checkpoint(tmp_path / "init")
    ctx, args = stage_ctx("dpo", ["--init", init, "--data-dir", small_data(tmp_path / "data", 64),
                                  "--batch-size", "8", "--eval-problems", "8", "--rpo-alpha", "0.5"])
    ctx["order"] = posttrain.Shuffler(len(ctx["train"]["pairs"]), 0)
    batch, _ = STAGES["dpo"].make_batch(ctx, args, 0)
    loss, metrics = STAGES["dpo"].loss(ctx, args, batch)
    nll = []
    with torch.no_grad():
        for i in posttrain.Shuffler(len(ctx["train"]["pairs"]), 0).take(8):
            prompt, chosen, _ = ctx["train"]["pairs"][i]
            ids = torch.tensor([prompt + chosen])
            logp = torch.log_softmax(ctx["policy"](ids)[0].double(), -1)  # (T, V)
            nll.append(-sum(logp[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1])) / len(chosen))
    assert nll and min(nll) > 0
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * sum(nll) / len(nll), abs=1e-5)
    assert metrics["margin"] == pytest.approx(0.0, abs=1e-5)  # the NLL term leaves the implicit rewards alone


def test_sequence_logps_count_completion_tokens_only(tmp_path):
    """Padding and prompt add nothing: a pair's log-prob is the same alone or padded in a
    batch, and equals the sum over its completion tokens of an unpadded forward."""
    model = GPT.from_pretrained(tiny_checkpoint(tmp_path / "m"))
    args = posttrain.get_args([])
    args.amp = nullcontext
    pairs = posttrain.encode_pairs(TOK, [{"prompt": "1+2=", "chosen": "1+2=3;#3", "rejected": "#3"},
                                         {"prompt": "10+20-5+7=", "chosen": "10+20=30;30-5=25;25+7=32;#32",
                                          "rejected": "#31"}])
    both = posttrain.pair_batch({"pairs": pairs, "pad": TOK.pad_id}, [0, 1], "cpu")
    alone = posttrain.pair_batch({"pairs": pairs, "pad": TOK.pad_id}, [0], "cpu")
    with torch.no_grad():
        lp_both = posttrain.sequence_logps(model, both["rejected_ids"], both["rejected_mask"], args)
        lp_alone = posttrain.sequence_logps(model, alone["rejected_ids"], alone["rejected_mask"], args)
        ids = torch.tensor([pairs[0][0] + pairs[0][2]])  # [bos] 1 + 2 = # 3 [eos]: no padding
        logp = torch.log_softmax(model(ids)[0].double(), -1)  # (T, V)
        P = len(pairs[0][0])
        manual = sum(logp[t - 1, ids[0, t]].item() for t in range(P, ids.shape[1]))  # completion tokens only
    assert both["rejected_ids"].shape[1] > alone["rejected_ids"].shape[1]  # row 0 really is padded in `both`
    assert lp_both[0].item() == pytest.approx(lp_alone[0].item(), abs=1e-5)
    assert lp_alone[0].item() == pytest.approx(manual, abs=1e-5)


def test_dpo_preference_accuracy_rises_on_held_out_pairs(tmp_path, toy_data):
    init = tiny_checkpoint(tmp_path / "init")
    posttrain.main(["--stage", "dpo", "--init", init, "--data-dir", toy_data, "--out-dir",
                    str(tmp_path / "out"), "--steps", "30", "--lr", "3e-3", "--beta", "0.5"] + RUN)
    ev = json.loads((tmp_path / "out" / "dpo" / "eval.json").read_text())
    assert ev["before"]["pair_acc"] == 0.5
    assert ev["after"]["pair_acc"] > 0.9
    assert ev["after"]["pair_margin"] > 0


def test_self_pairs_pair_a_fully_right_sample_with_a_wrong_one(tmp_path, monkeypatch):
    # 3 prompts x G=3 samples; "clean" = worked solution, "lucky" = the right answer with no steps, "wrong"
    kinds = [["wrong", "clean", "wrong"], ["wrong", "wrong", "lucky"], ["clean", "lucky", "wrong"]]

    def fake_solve(model, task_, prompts, n, temperature, args, seed):
        assert n == 3 and len(prompts) == 3
        texts = []
        for prompt, row in zip(prompts, kinds):
            problem = task.parse_prompt(prompt)
            text = {"clean": task.solution(problem), "lucky": f"#{problem.answer}",
                    "wrong": f"#{problem.answer + 1}"}
            texts += [text[k] for k in row]
        correct = torch.tensor([[k != "wrong" for k in row] for row in kinds])  # (3, 3) outcome only
        return correct, texts, [[10 + i] for i in range(9)]  # sample i of the flat list is [10 + i]

    monkeypatch.setattr(posttrain, "solve", fake_solve)
    args = posttrain.get_args(["--group-size", "3", "--pair-prompts", "3", "--pairs", "self",
                               "--data-dir", small_data(tmp_path / "data", 64)])
    pairs = posttrain.self_pairs(args, None, posttrain.Task("arith", args.data_dir, TOK))
    # prompt 1 has no fully right sample (lucky is right by outcome only): no pair; lucky is never rejected
    assert len(pairs) == 2
    assert pairs[0][1] == [11] and pairs[0][2] in ([10], [12])
    assert pairs[1][1] == [16] and pairs[1][2] == [18]


# ------------------------------------------------------------------------------------------------------- rm


def test_reward_model_ranks_held_out_pairs_after_short_training(tmp_path, toy_data):
    init = tiny_checkpoint(tmp_path / "init")
    posttrain.main(["--stage", "rm", "--init", init, "--data-dir", toy_data, "--out-dir",
                    str(tmp_path / "out"), "--steps", "30", "--lr", "3e-3"] + RUN)
    ev = json.loads((tmp_path / "out" / "rm" / "eval.json").read_text())
    assert ev["before"]["pair_acc"] == 0.5  # a zero-initialised head scores every sequence 0: all ties
    assert ev["after"]["pair_acc"] > 0.9


def test_reward_score_is_read_at_the_eos(tmp_path):
    model = GPT.from_pretrained(tiny_checkpoint(tmp_path / "m"), score_head=True)
    with torch.no_grad():
        model.score.weight.normal_()
    args = posttrain.get_args([])
    args.amp = nullcontext
    rows = [{"prompt": "1+2=", "chosen": "1+2=3;#3", "rejected": "#3"}]
    pairs = posttrain.encode_pairs(TOK, rows)
    b = posttrain.pair_batch({"pairs": pairs, "pad": TOK.pad_id}, [0], "cpu")
    last = posttrain.last_index(b["rejected_mask"])
    assert b["rejected_ids"][0, last[0]].item() == task.EOS
    with torch.no_grad():
        score = posttrain.sequence_scores(model, b["rejected_ids"], last, args)
        direct = model.score(model(b["rejected_ids"], return_hidden=True))[0, -1, 0]  # unpadded: EOS is last
    assert score.item() == pytest.approx(direct.item(), abs=1e-6)


# -------------------------------------------------------------------------------------------------- distill


@pytest.mark.parametrize("mode", ["forward", "reverse", "jsd", "onpolicy"])
def test_distill_loss_is_zero_when_teacher_is_student(tmp_path, mode):
    a = tiny_checkpoint(tmp_path / "a", seed=0)
    b = tiny_checkpoint(tmp_path / "b", seed=1)
    common = ["--batch-size", "2", "--group-size", "2", "--max-new-tokens", "12", "--distill-mode", mode]
    ctx, args = stage_ctx("distill", ["--init", a, "--teacher", a] + common)
    batch, _ = STAGES["distill"].make_batch(ctx, args, 0)
    loss, m = STAGES["distill"].loss(ctx, args, batch)
    assert loss.item() == 0.0 and m["kl_forward"] == 0.0
    ctx, args = stage_ctx("distill", ["--init", a, "--teacher", b] + common)  # so the check above can fail
    batch, _ = STAGES["distill"].make_batch(ctx, args, 0)
    assert STAGES["distill"].loss(ctx, args, batch)[0].item() > 1e-4


# -------------------------------------------------------------------------------------- end to end via main


@pytest.fixture(scope="module")
def fresh_out(tmp_path_factory):
    """A fresh OUT_DIR: distill builds its student's small pretrain and its teacher (grpo, sft, pretrain)."""
    out = str(tmp_path_factory.mktemp("out"))
    data = small_data(tmp_path_factory.mktemp("data"))
    posttrain.main(["--stage", "distill", "--out-dir", out, "--data-dir", data, "--steps", "2",
                    "--batch-size", "4", "--group-size", "2", "--no-dynamic-sampling"] + TINY)
    return out, data


def test_distill_end_to_end_from_a_fresh_folder(fresh_out):
    fresh_out, _ = fresh_out
    for stage in ("pretrain-small", "pretrain", "sft", "grpo", "distill"):
        assert os.path.exists(os.path.join(fresh_out, stage, "model.safetensors")), stage
    saved = json.loads(open(os.path.join(fresh_out, "distill", "args.json")).read())
    assert saved["teacher"] == os.path.join(fresh_out, "grpo")
    assert saved["init"] == os.path.join(fresh_out, "pretrain-small")
    ev = json.loads(open(os.path.join(fresh_out, "distill", "eval.json")).read())
    assert {"teacher_greedy", "teacher_params", "student_params"} <= set(ev["after"])


@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_pair_stages_end_to_end(fresh_out, stage):
    fresh_out, data = fresh_out
    posttrain.main(["--stage", stage, "--out-dir", fresh_out, "--data-dir", data, "--steps", "2",
                    "--batch-size", "4"] + TINY)
    ev = json.loads(open(os.path.join(fresh_out, stage, "eval.json")).read())
    assert "pair_acc" in ev["after"]


def test_eval_stage_end_to_end(fresh_out):
    fresh_out, data = fresh_out
    posttrain.main(["--stage", "eval", "--out-dir", fresh_out, "--data-dir", data, "--eval-n", "2"] + TINY)
    res = json.loads(open(os.path.join(fresh_out, "eval.json")).read())
    names = [r["name"] for r in res["checkpoints"]]
    assert names[0] == "pretrain" and "rm" not in names  # the base first; a reward model generates nothing
    assert {"sft", "grpo", "distill"} <= set(names)


def test_pipeline_runs_the_eval_over_every_stage(fresh_out):
    # sft -> distill: distill's teacher is the previous stage's output, its student starts from pretrain-small
    fresh_out, data = fresh_out
    posttrain.main(["--stage", "sft,distill", "--out-dir", fresh_out, "--data-dir", data, "--steps", "2",
                    "--batch-size", "4", "--group-size", "2", "--eval-n", "2", "--no-dynamic-sampling"] + TINY)
    saved = json.loads(open(os.path.join(fresh_out, "distill", "args.json")).read())
    assert saved["teacher"] == os.path.join(fresh_out, "sft")
    assert saved["init"] == os.path.join(fresh_out, "pretrain-small")
    res = json.loads(open(os.path.join(fresh_out, "eval.json")).read())
    assert [r["name"] for r in res["checkpoints"]] == ["pretrain", "sft", "distill"]  # base = sft's init
