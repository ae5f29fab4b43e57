"""Tests of data/task.py: the verifier on hand-worked completions, the generator's bounds, the solutions
with and without mistakes, the train/test split of the shipped files, the tokenizer and the JSONL reader."""

import json
import os
import random
import string

import pytest

from data import task

PROMPT = "37+48-19+5="
RIGHT = "37+48=85;85-19=66;66+5=71;#71"  # ';' at offsets 8, 17, 25


@pytest.fixture(scope="module")
def shipped():
    """Every shipped JSONL file, read with its declared fields."""
    return {name: task.read_jsonl(os.path.join(task.DATA_DIR, name + ".jsonl"), spec.fields)
            for name, spec in task.FILES.items()}


def prompt_of(row):
    return row["prompt"] if "prompt" in row else row["text"][:row["text"].index("=") + 1]


# -----------------------------------------------------------------------------------------------------------
# verify on hand-worked completions


def test_verify_right_solution():
    v = task.verify(PROMPT, RIGHT)
    assert v.correct and v.answer == 71
    assert v.step_labels == [1, 1, 1] and v.step_ends == [8, 17, 25]
    assert v.first_error is None and v.prefix_labels == [1, 1, 1]


def test_verify_arithmetic_slip_is_local():
    # 37+48 slips to 84; the student carries on correctly from 84: only the slip is labelled 0
    v = task.verify(PROMPT, "37+48=84;84-19=65;65+5=70;#70")
    assert not v.correct and v.answer == 70
    assert v.step_labels == [0, 1, 1] and v.first_error == 0
    assert v.prefix_labels == [0, 0, 0]  # Math-Shepherd style: wrong from the first mistake on


def test_verify_copy_error_and_later_slip():
    # step 1 starts from 58 instead of 85 (computes 58-19=39 right), step 2 then slips (39+5=45)
    v = task.verify(PROMPT, "37+48=85;58-19=39;39+5=45;#45")
    assert v.step_labels == [1, 0, 0] and v.first_error == 1 and v.prefix_labels == [1, 0, 0]
    assert not v.correct and v.answer == 45


def test_verify_skipped_and_extra_steps():
    # -19 left out: the second step applies +5 where the prompt's second operation is -19
    v = task.verify(PROMPT, "37+48=85;85+5=90;#90")
    assert v.step_labels == [1, 0] and v.step_ends == [8, 16] and not v.correct
    # a step past the last operation has nothing to apply: 0; the outcome only checks the answer
    v = task.verify(PROMPT, RIGHT[:-3] + "71+0=71;#71")
    assert v.step_labels == [1, 1, 1, 0] and v.correct
    # stopping early: every written step is right, the answer is not
    v = task.verify(PROMPT, "37+48=85;85-19=66;#66")
    assert v.step_labels == [1, 1] and v.first_error is None and not v.correct


def test_verify_wrong_final_answer():
    v = task.verify(PROMPT, RIGHT[:-3] + "#17")
    assert v.step_labels == [1, 1, 1] and v.answer == 17 and not v.correct


def test_verify_answer_only_is_correct():
    # the outcome is the answer and the format, not the work (as rule-based RL rewards)
    v = task.verify(PROMPT, "#71")
    assert v.correct and v.step_labels == [] and v.step_ends == []


@pytest.mark.parametrize("completion", [
    "", "abc", "#", "#x", RIGHT[:-4], RIGHT + "#3", RIGHT + ";", RIGHT + "+", RIGHT + "\n", " " + RIGHT,
    RIGHT[:-3] + "#-71", RIGHT[:-3] + "#071x", RIGHT[:-3] + "#" + "7" * 5000, "#٧١",
    "37+48=85;85-19=66;66+5=71#71",  # last ';' missing
])
def test_verify_malformed_is_incorrect(completion):
    v = task.verify(PROMPT, completion)
    assert not v.correct
    assert len(v.step_labels) == len(v.step_ends) == completion.count(";")


def test_verify_malformed_steps_get_zero():
    v = task.verify("1+1=", "1+1=2;#2#3")  # junk after the answer
    assert not v.correct and v.answer is None and v.step_labels == [1]
    # a garbled step is 0, and so is the next one: there is no written result to continue from
    v = task.verify(PROMPT, "37+48=8x;85-19=66;66+5=71;#71")
    assert v.step_labels == [0, 0, 1] and v.answer is None and not v.correct
    huge = "9" * 5000
    v = task.verify(PROMPT, f"{huge}+48={huge};#{huge}")
    assert v.step_labels == [0] and v.answer is None


def test_verify_never_crashes_on_random_strings():
    rng = random.Random(0)
    chars = task.ALPHABET * 4 + string.ascii_letters + " \n٣"
    for _ in range(2000):
        s = "".join(rng.choice(chars) for _ in range(rng.randint(0, 40)))
        v = task.verify(PROMPT, s)
        assert len(v.step_labels) == len(v.step_ends) == s.count(";")
        assert v.correct == (v.answer == 71)


# token labels: where in a wrong step the mistake is


@pytest.mark.parametrize("completion, labels", [
    (RIGHT, "11111111" "1" "11111111" "1" "1111111" "1"),
    ("37+48=86;86-19=67;67+5=72;#72", "1111111" "00" "111111111" "11111111"),  # "86": wrong at the 6
    ("37+48=85;85-19=66;#66", "111111111" "111111111"),  # a skipped step is not a wrong one (verify agrees)
    ("37+48=85;58-19=39;39+5=44;#44", "111111111" "000000000" "11111111"),  # a copy error from the first digit
    ("37+48=85;85-9=76;76+5=81;#81", "111111111" "11100000" "11111111"),  # "-9" for "-19": wrong at the 9
    ("37+48=8;8-19=", "11111110"),  # "8;" for "85;": wrong at the ';', and nothing after the last ';'
    ("37+48=85;85-19=66;66+5=71;71+0=71;#71", "111111111" "111111111" "11111111" "00000000"),  # extra step
    ("37+48=85;;85-19=66;#66", "111111111" "0" "000000000"),  # malformed: nothing to continue from after it
])
def test_token_labels_mark_a_step_wrong_from_its_first_wrong_character(completion, labels):
    got = task.token_labels(PROMPT, completion)
    assert "".join(map(str, got)) == labels
    v = task.verify(PROMPT, completion)
    assert [got[end] for end in v.step_ends] == v.step_labels  # every ';' carries verify's step label


def test_token_labels_agree_with_verify_on_random_mistakes():
    rng = random.Random(0)
    for _ in range(300):
        problem = task.make_problem(rng, rng.randint(2, 6), 99)
        text = task.solution(problem, rng, error_rate=0.7)
        got, v = task.token_labels(problem.prompt, text), task.verify(problem.prompt, text)
        assert len(got) == (v.step_ends[-1] + 1 if v.step_ends else 0)
        assert [got[end] for end in v.step_ends] == v.step_labels
        # within a step the labels never go back from 0 to 1
        for start, end in zip([0] + [e + 1 for e in v.step_ends], v.step_ends):
            step = got[start:end + 1]
            assert step == sorted(step, reverse=True)


@pytest.mark.parametrize("prompt", ["37+48", "37+48-=", "037+48=", "37*48=", ""])
def test_verify_rejects_a_bad_prompt(prompt):
    with pytest.raises(ValueError):
        task.verify(prompt, RIGHT)


# -----------------------------------------------------------------------------------------------------------
# the generator and its solutions


@pytest.mark.parametrize("max_value,max_operand", [(99, 49), (99, None), (9, 9), (20, 5)])
def test_make_problem_respects_difficulty(max_value, max_operand):
    rng = random.Random(1)
    for _ in range(2000):
        n_ops = rng.randint(2, 9)
        p = task.make_problem(rng, n_ops, max_value, max_operand)
        assert len(p.operands) == n_ops and len(p.ops) == n_ops - 1
        assert all(0 <= b <= (max_operand if max_operand is not None else max_value) for b in p.operands)
        value = p.operands[0]
        for op, b in zip(p.ops, p.operands[1:]):
            value = value + b if op == "+" else value - b
            assert 0 <= value <= max_value  # every intermediate result
        assert value == p.answer and task.parse_prompt(p.prompt) == p


def problems(n=3000, seed=2):
    rng = random.Random(seed)
    return [task.sample(rng, task.Difficulty(2, 8)) for _ in range(n)]


def test_clean_solutions_verify():
    for p in problems():
        v = task.verify(p.prompt, task.solution(p))
        assert v.correct and v.step_labels == [1] * (len(p.operands) - 1)


def test_mistaken_solutions_never_verify_and_stay_well_formed():
    rng = random.Random(3)
    patterns = set()
    for p in problems():
        text = task.solution(p, rng, error_rate=1.0)
        v = task.verify(p.prompt, text)
        assert not v.correct and v.answer is not None  # wrong, but in the task's format (no negatives)
        assert text.count(";") <= len(p.ops)
        patterns.add("wrong step" if v.first_error is not None else "only the answer")
    assert patterns == {"wrong step", "only the answer"}


def test_error_rate_is_a_probability():
    rng = random.Random(4)
    ps = problems(2000)
    wrong = sum(not task.verify(p.prompt, task.solution(p, rng, error_rate=0.3)).correct for p in ps)
    assert 0.25 < wrong / len(ps) < 0.35


def test_corrupt_never_verifies():
    rng = random.Random(5)
    for p in problems():
        assert not task.verify(p.prompt, task.corrupt(p, rng)).correct


# -----------------------------------------------------------------------------------------------------------
# splits and the shipped files


def test_split_of_is_stable():
    # pinned: SHA-256 of the prompt, not Python's per-process salted hash(); a change would leak test prompts
    assert [task.split_of(p) for p in (PROMPT, "1+1=", "3+8=", "4+0=", "4+1=")] == [
        "train", "train", "test", "test", "train"]
    test = sum(task.split_of(p.prompt) == "test" for p in problems(5000, seed=6))
    assert 0.08 < test / 5000 < 0.12


def test_shipped_files_respect_splits_and_difficulty(shipped):
    prompts = {}
    for name, rows in shipped.items():
        spec = task.FILES[name]
        assert len(rows) == spec.count
        ps = [prompt_of(r) for r in rows]
        assert len(set(ps)) == len(ps), f"{name}: duplicate prompts"
        assert all(task.split_of(p) == spec.split for p in ps), f"{name}: a prompt of the wrong split"
        for p in ps[:200]:
            problem = task.parse_prompt(p)
            assert spec.difficulty.min_ops <= len(problem.operands) <= spec.difficulty.max_ops
        prompts[name] = set(ps)
    train = set().union(*(prompts[n] for n, s in task.FILES.items() if s.split == "train"))
    assert not train & (prompts["test"] | prompts["test_ood"])
    longest_train = max(s.difficulty.max_ops for s in task.FILES.values() if s.split == "train")
    assert task.FILES["test_ood"].difficulty.min_ops > longest_train


def test_shipped_rows_are_what_they_say(shipped):
    for name in ("rl", "test", "test_ood"):
        assert all(task.parse_prompt(r["prompt"]).answer == r["answer"] for r in shipped[name][:200])
    assert all(task.verify(r["prompt"], r["completion"]).correct for r in shipped["sft"][:200])
    for r in shipped["pairs"][:200]:
        assert task.verify(r["prompt"], r["chosen"]).correct
        assert not task.verify(r["prompt"], r["rejected"]).correct
    rows = shipped["pretrain"][:2000]
    wrong = sum(not task.verify(prompt_of(r), r["text"][len(prompt_of(r)):]).correct for r in rows)
    assert 0.25 < wrong / len(rows) < 0.35  # noisy on purpose (--error-rate 0.3)


def test_main_is_deterministic(tmp_path):
    small = ["--pretrain-count", "300", "--sft-count", "100", "--rl-count", "50", "--pairs-count", "50",
             "--test-count", "20", "--test-ood-count", "20"]
    for out in ("a", "b"):
        task.main(small + ["--out-dir", str(tmp_path / out)])
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted([n + ".jsonl" for n in task.FILES] + ["tokenizer.json"])
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()
    # each file draws from its own stream: the shipped files begin with the same lines
    with open(os.path.join(task.DATA_DIR, "test.jsonl")) as f:
        assert (tmp_path / "a" / "test.jsonl").read_text().splitlines() == f.read().splitlines()[:20]


# -----------------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_ids_and_shipped_file():
    tok = task.load_tokenizer()
    assert [tok.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>")] == [0, 1, 2]
    assert (task.PAD, task.BOS, task.EOS) == (0, 1, 2)
    assert tok.get_vocab_size() == 18 and tok.token_to_id("0") == 3 and tok.token_to_id("#") == 17
    with open(task.TOKENIZER_PATH) as f:
        assert json.load(f) == json.loads(task.build_tokenizer().to_str())  # the shipped file is current
    assert task.encode(tok, "12+3=") == [4, 5, 13, 6, 15]  # one token per character


def test_tokenizer_round_trip(shipped):
    tok = task.load_tokenizer()
    for rows in shipped.values():
        for row in rows[:50]:
            for s in (v for v in row.values() if isinstance(v, str)):
                ids = task.encode(tok, s)
                assert len(ids) == len(s) and task.decode(tok, ids) == s
                # decoding a sampled completion: BOS/PAD dropped, everything from EOS on cut
                assert task.decode(tok, [task.BOS] + ids + [task.EOS, 5, task.PAD]) == s


def test_encode_rejects_unknown_characters():
    with pytest.raises(ValueError, match="'x'"):
        task.encode(task.load_tokenizer(), "1x2")


# -----------------------------------------------------------------------------------------------------------
# JSONL


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": "1+1=", "answer": 2}, {"prompt": "3-1=", "answer": 2}]
    task.write_jsonl(path, rows)
    assert os.listdir(tmp_path) == ["rows.jsonl"]  # no temp file left behind
    with open(path, "a") as f:
        f.write("\n")  # blank lines are skipped
    assert task.read_jsonl(path, task.PROMPT_ANSWER) == rows


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "1+1=", "answer": 2', "not valid JSON"),
    ('["1+1=", 2]', "expected a JSON object"),
    ('{"prompt": "1+1="}', "missing field 'answer'"),
    ('{"prompt": "1+1=", "answer": "abc"}', "field 'answer' must be an integer, got 'abc'"),
    ('{"prompt": "1+1=", "answer": true}', "field 'answer' must be an integer, got True"),
    ('{"prompt": 11, "answer": 2}', "field 'prompt' must be a string, got 11"),
    ('{"prompt": "1 + 1=", "answer": 2}', "field 'prompt' has character ' '"),
])
def test_read_jsonl_one_line_errors(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "2+2=", "answer": 4}\n\n' + line + "\n")
    with pytest.raises(ValueError) as e:
        task.read_jsonl(path, task.PROMPT_ANSWER)
    text = str(e.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text
