"""
Your own checkpoint, tokenizer and task: tiny random Llama, Qwen2 and Qwen3 folders with real BPE tokenizers and
chat templates (tests/fixtures, written by tests/make_hf_fixtures.py, the one file that imports transformers),
trained for a few steps with --task answer on a tiny GSM8K-style data dir. CPU only.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

import posttrain
from data.tokenizer import FILES, Tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GSM = str(FIXTURES / "gsm")
CHAT = json.loads((FIXTURES / "chat.json").read_text())
FAMILIES = ["llama", "qwen2", "qwen3"]
SMALL = ["--threads", "1", "--device", "cpu", "--task", "answer", "--data-dir", GSM, "--steps", "2",
         "--batch-size", "2", "--group-size", "2", "--micro-batch-size", "4", "--max-new-tokens", "12",
         "--eval-problems", "3", "--eval-samples", "1", "--eval-n", "2", "--log-every", "1"]

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_renders_what_transformers_renders(family):
    tok = Tokenizer(str(FIXTURES / family))
    for entry in CHAT[family]:
        if "enable_thinking" in entry:
            continue  # a template argument we do not pass
        assert tok.render(entry["prompt"]) == entry["text"]
        assert tok.prompt_ids(entry["prompt"]) == entry["ids"]  # one BOS at most: the template's own


@pytest.mark.parametrize("family", FAMILIES)
def test_without_the_chat_template_a_prompt_is_tokenised_as_transformers_does(family):
    tok = Tokenizer(str(FIXTURES / family), chat=False)
    for entry in CHAT[family]:
        assert tok.prompt_ids(entry["prompt"]) == entry["plain_ids"]  # llama's post-processor adds BOS


@pytest.mark.parametrize("family", FAMILIES)
def test_every_eos_id_of_the_folder_stops_and_completions_end_with_the_turn_end(family):
    tok = Tokenizer(str(FIXTURES / family))
    cfg = json.loads((FIXTURES / family / "tokenizer_config.json").read_text())
    eos_ids = CHAT[family][0]["eos_ids"]
    assert len(eos_ids) == 2 and set(eos_ids) <= set(tok.stop_ids)
    assert tok.completion_ids("#### 4")[-1] == tok.tok.token_to_id(cfg["eos_token"])
    # decoding drops the model's special tokens and stops at the first EOS id of either kind
    ids = tok.encode("#### 4") + [eos_ids[1]] + tok.encode(" junk")
    assert tok.decode(ids) == "#### 4"


# -------------------------------------------------------------------------------------------------- stages


def run(tmp_path, stage, family, *flags):
    out = tmp_path / "out"
    posttrain.main(["--stage", stage, "--init", str(FIXTURES / family), "--out-dir", str(out), *SMALL, *flags])
    return out / stage


@pytest.mark.parametrize("stage, family", [("sft", "llama"), ("dpo", "qwen2"), ("grpo", "qwen3"),
                                           ("grpo", "llama"), ("rm", "qwen3"), ("ppo", "qwen2"), ("pretrain", "qwen3")])
def test_a_stage_trains_on_the_answer_task_and_keeps_the_init_tokenizer(tmp_path, stage, family):
    # a random model solves nothing, so every group is all wrong: without dynamic sampling grpo still steps
    folder = run(tmp_path, stage, family, *(["--no-dynamic-sampling"] if stage == "grpo" else []))
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics if "loss" in m)
    # the output holds the init's tokenizer files, byte for byte, so transformers loads it with them
    for name in FILES:
        src = FIXTURES / family / name
        if src.exists():
            assert (folder / name).read_bytes() == src.read_bytes(), name
    # and it loads back as the same architecture with the same tokenizer
    args = posttrain.get_args(["--task", "answer", "--data-dir", GSM])
    assert posttrain.load_task(args, str(folder)).tok.identity() == Tokenizer(str(FIXTURES / family)).identity()
    arch = json.loads((FIXTURES / family / "config.json").read_text())["architectures"]
    assert json.loads((folder / "config.json").read_text())["architectures"] == arch


def test_grpo_rewards_come_from_the_final_number(tmp_path, monkeypatch):
    # the sampler is replaced by one that writes, for every prompt, "#### <its answer>" or a wrong number:
    # the logged reward is then exactly the share of right ones, whatever the tiny model would have said
    real = posttrain.sample_and_verify
    calls = []

    def scripted(model, task, prompts, args, temperature, generator):
        texts, verdicts, roll = real(model, task, prompts, args, temperature, generator)
        texts = [f"#### {task.answers[p]}" if i % 2 == 0 else "#### -1" for i, p in enumerate(prompts)]
        verdicts = [task.verify(p, t) for p, t in zip(prompts, texts)]
        calls.append(sum(v.correct for v in verdicts) / len(verdicts))
        return texts, verdicts, roll

    monkeypatch.setattr(posttrain, "sample_and_verify", scripted)
    folder = run(tmp_path, "grpo", "qwen2", "--eval-problems", "0")
    rewards = [json.loads(line)["reward"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert rewards == [0.5, 0.5] and calls[:2] == [0.5, 0.5]


def test_distill_between_two_checkpoints_of_one_tokenizer(tmp_path):
    sft = run(tmp_path, "sft", "qwen3")
    out = tmp_path / "out"
    posttrain.main(["--stage", "distill", "--init", str(FIXTURES / "qwen3"), "--teacher", str(sft),
                    "--out-dir", str(out), *SMALL])
    ev = json.loads((out / "distill" / "eval.json").read_text())
    assert ev["after"]["teacher_params"] == ev["after"]["student_params"]  # same shape: a copy distilled


def test_eval_compares_checkpoints_on_the_answer_task(tmp_path):
    sft = run(tmp_path, "sft", "llama")
    out = tmp_path / "eval.json"
    posttrain.main(["--stage", "eval", "--ckpt", str(sft), "--base", str(FIXTURES / "llama"),
                    "--eval-out", str(out), *SMALL])
    res = json.loads(out.read_text())
    assert list(res["problems"]) == ["test"]  # no test_ood.jsonl in this data dir: only test
    base, after = res["checkpoints"]
    assert base["test"]["kl_base"] == 0.0 and len(base["test"]["counts"]) == 3


# -------------------------------------------------------------------------------------------------- errors


def test_teacher_and_student_tokenizers_must_match(tmp_path, refused):
    err = refused("--stage", "distill", "--init", str(FIXTURES / "llama"), "--teacher",
                  str(FIXTURES / "qwen3"), "--out-dir", str(tmp_path / "out"), *SMALL)
    assert str(FIXTURES / "llama" / "tokenizer.json") in err and str(FIXTURES / "qwen3" / "tokenizer.json") in err
    assert not (tmp_path / "out" / "distill").exists()


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, refused):
    folder = tmp_path / "big"
    shutil.copytree(FIXTURES / "qwen2", folder)
    tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(60)])  # 460 tokens, the embedding has 448 rows
    tok.save(str(folder / "tokenizer.json"))
    err = refused("--stage", "sft", "--init", str(folder), "--out-dir", str(tmp_path / "out"), *SMALL)
    assert str(folder / "tokenizer.json") in err and str(folder / "config.json") in err and "448" in err


def test_a_folder_without_a_tokenizer_is_refused(tmp_path, refused):
    folder = tmp_path / "bare"
    shutil.copytree(FIXTURES / "qwen3", folder)
    os.remove(folder / "tokenizer.json")
    err = refused("--stage", "sft", "--init", str(folder), "--out-dir", str(tmp_path / "out"), *SMALL)
    assert "tokenizer.json" in err and str(folder) in err


def test_a_missing_data_file_is_named(tmp_path, refused):
    data = tmp_path / "data"
    shutil.copytree(GSM, data)
    os.remove(data / "rl.jsonl")
    err = refused("--stage", "grpo", "--init", str(FIXTURES / "qwen2"), "--out-dir",
                  str(tmp_path / "out"), *SMALL, "--data-dir", str(data))
    assert str(data / "rl.jsonl") in err


def test_gradient_checkpointing_gives_the_same_gradients():
    from model import GPT
    model = GPT.from_pretrained(FIXTURES / "qwen3")
    ids = torch.randint(0, 400, (2, 10), generator=torch.Generator().manual_seed(0))
    grads = []
    for on in (False, True):
        model.grad_checkpointing = on
        model.zero_grad()
        torch.log_softmax(model(ids), -1)[..., 7].sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (grads[0] - grads[1]).abs().max() <= 1e-6 and grads[0].abs().max() > 0


def test_sft_loss_and_pair_log_probs_are_the_same_in_head_chunks(tmp_path, monkeypatch):
    args, ctx = posttrain.prepare("sft", posttrain.get_args(["--stage", "sft", "--init", str(FIXTURES / "qwen3"),
                                                             "--out-dir", str(tmp_path), *SMALL]))
    batch = posttrain.lm_batch(ctx, args, 0)
    model = ctx["policy"]
    results = []
    for chunk in (10 ** 9, 1):  # one chunk; then one row per chunk, recomputed in backward
        monkeypatch.setattr(posttrain.rollout, "LOGIT_CHUNK", chunk)
        model.zero_grad()
        loss, _ = posttrain.lm_loss(ctx, args, batch)
        loss.backward()
        with torch.no_grad():
            seq = posttrain.sequence_logps(model, batch["ids"], (batch["labels"] != -100).long(), args)
        results.append((loss.detach(), model.model.embed_tokens.weight.grad.clone(), seq))
    (a, ga, sa), (b, gb, sb) = results
    assert (a - b).abs() <= 1e-6 and (ga - gb).abs().max() <= 1e-6 and (sa - sb).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", ["forward", "jsd"])
def test_distillation_loss_is_the_same_in_head_chunks(tmp_path, monkeypatch, mode):
    sft = run(tmp_path, "sft", "qwen3")
    args, ctx = posttrain.prepare("distill", posttrain.get_args(
        ["--stage", "distill", "--init", str(FIXTURES / "qwen3"), "--teacher", str(sft), "--out-dir",
         str(tmp_path / "d"), "--distill-mode", mode, *SMALL]))
    batch, _ = posttrain.distill_batch(ctx, args, 0)
    results = []
    for chunk in (10 ** 9, 1):
        monkeypatch.setattr(posttrain.rollout, "LOGIT_CHUNK", chunk)
        ctx["policy"].zero_grad()
        loss, metrics = posttrain.distill_loss(ctx, args, batch)
        loss.backward()
        results.append((loss.detach(), metrics["kl_forward"], ctx["policy"].model.norm.weight.grad.clone()))
    (a, ka, ga), (b, kb, gb) = results
    assert a > 0 and (a - b).abs() <= 1e-6 and abs(ka - kb) <= 1e-6 and (ga - gb).abs().max() <= 1e-6


def test_step_label_stages_refuse_a_bpe_tokenizer(tmp_path, refused):
    # the PRM finds step ends as the character tokenizer's ';' token: on a BPE model it would find none
    err = refused("--stage", "prm", "--init", str(FIXTURES / "qwen2"), "--out-dir", str(tmp_path / "out"),
                  "--threads", "1")
    assert "character-level tokenizer" in err and str(FIXTURES / "qwen2" / "tokenizer.json") in err
