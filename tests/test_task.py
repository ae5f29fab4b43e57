"""
The task layer: the `--task answer` verifier (final number, parsed, never evaluated), the Tokenizer read from a
model folder (special ids, several EOS ids, prompt rendering) and the Task every stage receives. CPU only.
"""

import json
import os
from decimal import Decimal

import pytest
import torch

import posttrain
from data import answer, task
from data.tokenizer import Tokenizer
from model import GPT, GPTConfig
from rollout import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILTIN = Tokenizer(task.DATA_DIR)


# ---------------------------------------------------------------------------------------------- the verifier


@pytest.mark.parametrize("completion, value", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,200", "1200"),  # thousands commas
    ("The total is $1,200.", "1200"),  # a leading $, a full stop after the number
    ("so 15 - 3 = 12 #### 12.0", "12"),  # trailing .0
    ("#### -5", "-5"),
    ("first 3, then 9 #### 4 and 8", "4"),  # the number right after the last ####, not the last number
    ("10 apples, 2 pears and 31 cherries", "31"),  # no ####: the last number
    ("1.50 per cup", "1.5"),
])
def test_final_number(completion, value):
    assert answer.final_number(completion) == Decimal(value)


@pytest.mark.parametrize("completion", ["no number here", "#### seven", ""])
def test_no_number_is_none_and_wrong(completion):
    assert answer.final_number(completion) is None
    assert not answer.is_correct(completion, Decimal(7))


def test_text_is_parsed_never_evaluated():
    # an expression is not a number: "3+4" reads as its last number, 4, never as 7
    assert answer.final_number("#### 3+4") == Decimal(3)
    assert not answer.is_correct("__import__('os') #### 2*3", Decimal(6))


@pytest.mark.parametrize("raw, value", [(7, "7"), ("1,200", "1200"), (2.5, "2.5"), ("$30", "30"), (" 12 ", "12")])
def test_answer_value_of_a_jsonl_field(raw, value):
    assert answer.answer_value(raw) == Decimal(value)


@pytest.mark.parametrize("raw", [True, None, "seven", "1/2", [3]])
def test_answer_value_refuses_non_numbers(raw):
    with pytest.raises(ValueError):
        answer.answer_value(raw)


# ----------------------------------------------------------------------------------------------- tokenizers


def test_builtin_tokenizer_gives_the_arithmetic_sequences():
    # [bos] + characters for a prompt, characters + [eos] for a completion: the layout the task defines
    assert BUILTIN.prompt_ids("12+3=") == [task.BOS] + task.encode(task.load_tokenizer(), "12+3=")
    assert BUILTIN.completion_ids("15;#15") == task.encode(task.load_tokenizer(), "15;#15") + [task.EOS]
    assert BUILTIN.decode(BUILTIN.completion_ids("12+3=15;#15") + [5, 6]) == "12+3=15;#15"  # cut at EOS
    assert (BUILTIN.bos_id, BUILTIN.stop_ids, BUILTIN.pad_id) == (task.BOS, [task.EOS], task.PAD)


def test_checkpoint_without_tokenizer_config_still_starts_with_bos(tmp_path):
    # checkpoints written before tokenizer_config.json was saved hold tokenizer.json alone
    (tmp_path / "tokenizer.json").write_text(open(task.TOKENIZER_PATH).read())
    assert Tokenizer(str(tmp_path)).prompt_ids("1+2=") == BUILTIN.prompt_ids("1+2=")


def test_unencodable_character_is_named():
    with pytest.raises(ValueError, match=r"'x'.*tokenizer.json"):
        BUILTIN.encode("12x")


def folder_with(tmp_path, config=None, generation=None, chat_template=None):
    """The built-in tokenizer.json with a hand-written tokenizer_config.json / generation_config.json."""
    (tmp_path / "tokenizer.json").write_text(open(task.TOKENIZER_PATH).read())
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    if chat_template is not None:
        (tmp_path / "chat_template.jinja").write_text(chat_template)
    return str(tmp_path)


def test_every_eos_id_stops_and_the_turn_end_ends_completions(tmp_path):
    # generation_config lists two ids; tokenizer_config's eos_token is the one a training completion ends with
    tok = Tokenizer(folder_with(tmp_path, {"eos_token": "<pad>", "pad_token": "<bos>"},
                                {"eos_token_id": [task.EOS, task.PAD]}))
    assert tok.eos_id == task.PAD and tok.stop_ids == [task.PAD, task.EOS]
    assert tok.completion_ids("1")[-1] == task.PAD
    assert tok.decode(tok.encode("12") + [task.EOS] + tok.encode("3")) == "12"
    # the sampler stops a row at either id: a model that always says EOS ends after one token
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=18, n_layer=1, n_embd=32, n_head=4, n_kv_head=2, intermediate_size=64))
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[task.PAD] = 1.0  # logits put all mass near <pad> (one of the stop ids)
        model.model.norm.weight.fill_(50.0)
    s = sample(model, [[1, 4]], 8, temperature=0, eos_id=tok.stop_ids)
    assert s.completion_mask.sum().item() == 1 and bool(s.finished[0])


def test_chat_template_renders_the_prompt_and_a_flag_turns_it_off(tmp_path):
    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}" \
               "{% if add_generation_prompt %}={% endif %}"
    folder = folder_with(tmp_path, {"bos_token": "<bos>", "eos_token": "<eos>"}, chat_template=template)
    tok = Tokenizer(folder)
    assert tok.render("1+2") == "<bos>[user]1+2="
    assert Tokenizer(folder, chat=False, prompt_template="{prompt}=").render("1+2") == "1+2="


def test_prompt_template_without_the_field_is_refused(refused):
    assert "--prompt-template" in refused("--stage", "sft", "--prompt-template", "Q: A:",
                                          "--out-dir", "/nonexistent/never-written")


# ----------------------------------------------------------------------------------------------- the task


def answer_task(tmp_path, rows):
    (tmp_path / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = posttrain.Task("answer", str(tmp_path), BUILTIN)
    t.rows("rl")
    return t


def test_answer_task_verifies_by_the_rows_answer_and_cuts_off_unfinished(tmp_path):
    t = answer_task(tmp_path, [{"prompt": "1+2=", "answer": 3}, {"prompt": "9-1=", "answer": "8"}])
    assert t.verify("1+2=", "1+2=3;#3").correct and not t.verify("1+2=", "#4").correct
    assert t.verify("9-1=", "#### 8").correct
    assert not t.verify("1+2=", "#3", finished=False).correct  # never emitted EOS: wrong whatever it says
    assert t.verify("1+2=", "#3").step_labels == []  # no step labels outside the arithmetic task


@pytest.mark.parametrize("argv, flag", [
    (["--stage", "prm"], "prm"),
    (["--stage", "grpo", "--reward", "prm"], "--reward prm"),
    (["--stage", "dpo", "--pairs", "self"], "--pairs self"),
])
def test_stages_that_need_step_labels_refuse_the_answer_task(refused, argv, flag):
    err = refused(*argv, "--task", "answer", "--out-dir", "/nonexistent/never-written")
    assert flag in err and "--task" in err


def test_answer_task_from_scratch_is_refused_before_any_work(tmp_path, refused):
    assert "--init" in refused("--stage", "pretrain", "--task", "answer", "--out-dir", str(tmp_path / "out"))
    assert not (tmp_path / "out" / "pretrain").exists()


def test_data_the_tokenizer_cannot_encode_names_the_file_line_and_tokenizer(tmp_path, capsys):
    (tmp_path / "rl.jsonl").write_text('{"prompt": "1+2=", "answer": 3}\n{"prompt": "Tom has 3", "answer": 3}\n')
    with pytest.raises(SystemExit) as e:
        posttrain.Task("answer", str(tmp_path), BUILTIN).rows("rl")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"{tmp_path / 'rl.jsonl'}:2" in err and "'prompt'" in err and "'T'" in err and BUILTIN.path in err


def test_missing_answer_file_is_named(tmp_path, capsys):
    t = posttrain.Task("answer", str(tmp_path), BUILTIN)
    with pytest.raises(SystemExit):
        t.rows("rl")
    err = capsys.readouterr().err
    assert os.path.join(str(tmp_path), "rl.jsonl") in err and err.count("\n") == 1


def test_a_row_longer_than_the_context_is_refused_before_training(tmp_path, refused):
    # a 200-character prompt does not fit the 128-token context of a model made from scratch; a pipeline
    # must not train pretrain first and find out when sft draws the row
    data = tmp_path / "data"
    data.mkdir()
    for name in ("pretrain", "test"):
        (data / f"{name}.jsonl").write_text(open(os.path.join(task.DATA_DIR, f"{name}.jsonl")).read())
    (data / "sft.jsonl").write_text(json.dumps({"prompt": "1+" * 100 + "1=", "completion": "#101"}) + "\n")
    err = refused("--stage", "pretrain,sft", "--data-dir", str(data), "--out-dir", str(tmp_path / "out"))
    assert f"{data / 'sft.jsonl'}: row 1" in err and "context of 128" in err
    assert not (tmp_path / "out" / "pretrain").exists()
