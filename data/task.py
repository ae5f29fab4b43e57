"""
data/task.py: the task every posttrain stage trains and is scored on.

Chained integer addition and subtraction, answered with a worked solution of one step per operation:

    prompt      37+48-19+5=
    completion  37+48=85;85-19=66;66+5=71;#71          (then the EOS token)
    sequence    [bos] + enc(prompt) + enc(completion) + [eos]

Step k (0-based) applies the prompt's (k+1)-th operator and operand to the previous result (step 0 starts
from the prompt's first operand) and ends with ';'. The final answer follows '#'. A problem with n_ops
operands has n_ops - 1 steps.

Problems (make_problem). Every operand lies in 0..max_operand and every intermediate result, hence the
answer, in 0..max_value: each next operand is drawn uniformly from what keeps the running value in range,
so subtraction never goes below 0. Defaults: max_value=99, max_operand=49. (Measured by the lead: operands
in 0..99 with negative intermediates were too hard for a laptop-sized model; results in 0..99 with operands
in 0..19 or 0..49 gave a workable difficulty.) The operator is '+' or '-' at random, except that when one of
them has no room left (running value 0 or max_value) the other is taken, so chains do not fill up with
"+0" / "-0" steps.

Splits. split_of(prompt) hashes the prompt string with SHA-256 (not Python's salted hash()) and puts
TEST_FRACTION = 10% of all possible prompts in "test", the rest in "train". Files of training data only
hold train-split prompts and test files only test-split prompts, so no prompt is ever trained on and then
tested. Prompts are unique within each file (the same prompt may appear in several training files).

Files, regenerated deterministically by `python -m data.task` (defaults; every count and operand range is
a flag, all held in FILES below):

    file             fields                          split  lines   operands   what for
    pretrain.jsonl   text (= prompt + completion)    train  60000   2..6       base model; noisy: 30% of
                                                                              solutions contain a mistake
    sft.jsonl        prompt, completion              train  20000   2..5       clean demonstrations, short of
                                                                              the longest pretraining chains
    rl.jsonl         prompt, answer (int)            train   5000   5..6       RL prompts: the longest chains,
                                                                              where the SFT model is weakest
    pairs.jsonl      prompt, chosen, rejected        train   5000   2..6       chosen clean, rejected wrong
    test.jsonl       prompt, answer (int)            test     500   2..6       in-distribution held out
    test_ood.jsonl   prompt, answer (int)            test     500   7..8       longer than any training chain

Completions in the files carry no EOS; whoever tokenizes appends it. Every string field uses only the
tokenizer's alphabet "0123456789+-=;#".

verify(prompt, completion) -> Verdict, on text (decode() already cut the ids at EOS), parsed, never run:

  * Steps. Every ';' in the completion ends one step; step k is the text between the previous ';' (or
    the start) and its ';', and step_ends[k] is the character offset of that ';' (= its token offset in
    the completion, the tokenizer being char-level). A step is well-formed if it reads A+B=C or A-B=C
    with A, B, C runs of 1..18 ASCII digits (no sign, no spaces).
  * step_labels[k] = 1 iff step k is well-formed AND its arithmetic is right (C = A op B) AND it continues
    from the previous step's written result (step 0: from the prompt's first operand) AND its operator and
    B are the prompt's (k+1)-th; else 0. So an extra step past the last operation is 0, and after a
    skipped operation every later step is 0 (it applies the wrong operand).
    These are LOCAL labels: a step that correctly continues from an earlier step's wrong result gets 1.
    We chose that for a process reward model because it asks one checkable question per step (is this
    step right, given what is written before it?), it pinpoints the mistake instead of smearing it over
    the rest of the solution, and the stricter Math-Shepherd / PRM800K-style labels (every step from the
    first mistake on is wrong) follow from it: Verdict.first_error is the index of the first 0 (None if
    there is none) and Verdict.prefix_labels gives those "still on track" labels.
  * Outcome. The completion is well-formed iff it is exactly zero or more well-formed steps, each followed
    by ';', then '#' and 1..18 digits, and nothing after. answer = that integer if the completion is
    well-formed, else None. correct iff answer equals the true result. The outcome checks the answer and
    the format only, not the steps (as rule-based RL rewards do): "#71" alone is correct, trailing text
    ("#71;", "#7#1", "#71+") is not. A completion cut off by a length limit before EOS is the caller's to
    score: its text may still end in "#<digits>".
  * Any completion string is accepted without raising (empty, garbage, huge numbers, non-ASCII digits);
    the prompt must be a valid problem prompt, or verify raises ValueError.

Tokenizer (build_tokenizer / load_tokenizer, data/tokenizer.json, tokenizers.Tokenizer.from_file loads it):
character level, WordLevel over the vocabulary <pad>=0, <bos>=1, <eos>=2, then "0".."9", "+", "-", "=",
";", "#" = 3..17 (vocab_size 18), a pre-tokenizer that isolates every character, and a Fuse decoder so
decoding joins characters without spaces. It has no unknown token on purpose: a character outside the
alphabet is an error (encode() raises ValueError naming it) rather than a silent <unk> the model learns.
It adds no specials itself; sequences are built as [BOS] + encode(...) + [EOS].

JSONL (read_jsonl / write_jsonl): one JSON object per line; blank lines are skipped. A malformed line
raises ValueError with one line "FILE:LINE: ..." naming the field at fault. Writes are atomic.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import random
import re
import sys
import tempfile
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_PATH = os.path.join(DATA_DIR, "tokenizer.json")

# -----------------------------------------------------------------------------------------------------------
# tokenizer

PAD, BOS, EOS = 0, 1, 2
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
ALPHABET = "0123456789+-=;#"
VOCAB = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(ALPHABET))}
MAX_SEQ_LEN = 128  # the model's context; every shipped sequence, BOS and EOS included, must fit


def build_tokenizer():
    """The character-level tokenizer of the task (see the module docstring)."""
    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character alone
    tok.decoder = decoders.Fuse()  # "3","7" -> "37", not "3 7"
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def load_tokenizer(path=None):
    """The shipped tokenizer, data/tokenizer.json by default."""
    return Tokenizer.from_file(path or TOKENIZER_PATH)


def _first_foreign_char(text):
    return next((c for c in text if c not in ALPHABET), None)


def encode(tok, text):
    """Token ids of `text`, without BOS/EOS. Raises ValueError on a character outside the alphabet."""
    bad = _first_foreign_char(text)
    if bad is not None:
        raise ValueError(f"character {bad!r} in {text[:40]!r} is not in the task's alphabet {ALPHABET!r}")
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok, ids):
    """Text of a completion's ids: everything before the first EOS, with PAD and BOS dropped."""
    ids = list(ids)
    if EOS in ids:
        ids = ids[:ids.index(EOS)]
    return tok.decode([i for i in ids if i not in (PAD, BOS)], skip_special_tokens=False)


# -----------------------------------------------------------------------------------------------------------
# problems


@dataclass(frozen=True)
class Problem:
    prompt: str  # "37+48-19+5="
    answer: int  # 71
    operands: tuple  # (37, 48, 19, 5)
    ops: tuple  # ("+", "-", "+"), one fewer than operands


def _apply(left, op, right):
    return left + right if op == "+" else left - right


def _problem(operands, ops):
    prompt = str(operands[0]) + "".join(op + str(b) for op, b in zip(ops, operands[1:])) + "="
    answer = operands[0]
    for op, b in zip(ops, operands[1:]):
        answer = _apply(answer, op, b)
    return Problem(prompt, answer, tuple(operands), tuple(ops))


# Numbers are capped at 18 digits: they fit an int64 and int() never meets Python's 4300-digit limit.
# [0-9], not \d: \d also matches non-ASCII digits such as "٣", which int() would accept.
_NUM = "[0-9]{1,18}"
_CANONICAL = "(?:0|[1-9][0-9]{0,17})"  # no leading zeros in a prompt: Problem.prompt is the prompt parsed
_PROMPT_RE = re.compile(f"{_CANONICAL}(?:[+-]{_CANONICAL})*=")
_STEP_RE = re.compile(f"({_NUM})([+-])({_NUM})=({_NUM})")
_ANSWER_RE = re.compile(f"#({_NUM})")


def parse_prompt(prompt):
    """The Problem of a prompt string such as "37+48-19+5="; ValueError if it is not one."""
    if not _PROMPT_RE.fullmatch(prompt):
        raise ValueError(f"not a task prompt: {prompt[:60]!r}")
    operands = [int(x) for x in re.findall("[0-9]+", prompt)]
    return _problem(operands, re.findall("[+-]", prompt))


def make_problem(rng, n_ops, max_value, max_operand=None):
    """A random problem of `n_ops` operands (>= 2), each in 0..max_operand (default max_value), every
    intermediate result in 0..max_value."""
    max_operand = max_value if max_operand is None else min(max_operand, max_value)
    if n_ops < 2 or max_operand < 0:
        raise ValueError(f"make_problem: need n_ops >= 2 and max_operand >= 0, got {n_ops}, {max_operand}")
    value = rng.randint(0, max_operand)
    operands, ops = [value], []
    for _ in range(n_ops - 1):
        room = {"+": min(max_operand, max_value - value), "-": min(max_operand, value)}
        # at 0 (or max_value) only one operator can do anything but +0 / -0: take it
        op = rng.choice("+-") if room["+"] and room["-"] else max(room, key=room.get)
        operand = rng.randint(0, room[op])
        value = _apply(value, op, operand)
        operands.append(operand)
        ops.append(op)
    return _problem(operands, ops)


@dataclass(frozen=True)
class Difficulty:
    min_ops: int  # operands per problem, drawn uniformly from min_ops..max_ops
    max_ops: int
    max_value: int = 99  # every intermediate result lies in 0..max_value
    max_operand: int = 49  # every operand lies in 0..max_operand

    def __post_init__(self):
        if not 2 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 2 <= min_ops <= max_ops, got {self.min_ops}..{self.max_ops}")
        if self.max_value < 0 or self.max_operand < 0:
            raise ValueError(f"need max_value, max_operand >= 0, got {self.max_value}, {self.max_operand}")


def sample(rng, difficulty):
    """One problem at `difficulty`."""
    d = difficulty
    return make_problem(rng, rng.randint(d.min_ops, d.max_ops), d.max_value, d.max_operand)


TEST_FRACTION = 0.1


def split_of(prompt):
    """"train" or "test": a stable hash of the prompt string, the same on every machine and run."""
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return "test" if h % 10_000 < TEST_FRACTION * 10_000 else "train"


def sample_distinct(rng, difficulty, count, split):
    """`count` problems at `difficulty` with distinct prompts, all of them in `split`."""
    problems, seen, draws = [], set(), 0
    while len(problems) < count:
        # small ranges hold few distinct prompts: say so rather than loop forever
        if draws == 100 * count + 1000:
            raise ValueError(f"found only {len(problems)} distinct {split} prompts of {difficulty}, "
                             f"asked for {count}")
        draws += 1
        p = sample(rng, difficulty)
        if p.prompt not in seen and split_of(p.prompt) == split:
            seen.add(p.prompt)
            problems.append(p)
    return problems


# -----------------------------------------------------------------------------------------------------------
# worked solutions, right and wrong

# How often each kind of mistake is made, among the kinds a problem allows (see _mistaken_solution).
MISTAKE_WEIGHTS = {"slip": 0.6, "copy": 0.15, "skip": 0.15, "answer": 0.1}


def _steps(value, moves):
    """The worked steps (left, op, operand, result) that fold `moves` [(op, operand)] into `value`."""
    steps = []
    for op, b in moves:
        result = _apply(value, op, b)
        steps.append((value, op, b, result))
        value = result
    return steps


def _render(steps, answer):
    return "".join(f"{a}{op}{b}={c};" for a, op, b, c in steps) + f"#{answer}"


def _wrong_value(rng, x, lowest):
    """A number a student might write instead of x: off by one or two, a carry slip (+-10), one digit
    changed, or two adjacent digits swapped; never below `lowest` (<= x) and never x itself."""
    s = str(x)
    digit = [s[:i] + d + s[i + 1:] for i in range(len(s)) for d in "0123456789" if d != s[i]]
    swap = [s[:i] + s[i + 1] + s[i] + s[i + 2:] for i in range(len(s) - 1) if s[i] != s[i + 1]]
    kinds = [[x - 2, x - 1, x + 1, x + 2], [x - 10, x + 10],
             [int(t) for t in digit + swap if t[0] != "0" or len(t) == 1]]  # no "07": nobody writes that
    # keep only valid candidates; x + 1 always is, so at least one kind survives
    kinds = [vs for vs in ([v for v in vs if v >= lowest and v != x] for vs in kinds) if vs]
    return rng.choice(rng.choice(kinds))


def _mistaken_solution(problem, rng):
    """A worked solution with exactly one realistic mistake, after which the student carries on
    consistently, so the final answer is wrong. Kinds (weights in MISTAKE_WEIGHTS):
      slip    a step's result is wrong (_wrong_value); later steps continue from the wrong value
      copy    a step starts from a wrong copy of the previous result and computes from there
      skip    one operation is left out (its operand is not 0, so the answer changes)
      answer  every step is right, the number after '#' is miscopied
    Every written number stays >= 0 (the format has no sign): a wrong value is never so low that a later
    running value goes negative, and an operation is only skipped if none does then."""
    values = [problem.operands[0]]  # values[k] = the true running value after k operations
    for op, b in zip(problem.ops, problem.operands[1:]):
        values.append(_apply(values[-1], op, b))
    moves = list(zip(problem.ops, problem.operands[1:]))
    clean = _steps(values[0], moves)
    # Leaving out "+b" lowers every later value by b; we need more than one step so that something is left.
    skippable = [i for i, (op, b) in enumerate(moves)
                 if b > 0 and len(moves) > 1 and (op == "-" or min(values[i + 1:]) >= b)]
    kinds = ["answer"] + ["slip", "copy"] * bool(moves) + ["skip"] * bool(skippable)
    kind = rng.choices(kinds, weights=[MISTAKE_WEIGHTS[k] for k in kinds])[0]
    # Replacing values[k] by v shifts every later value by v - values[k], so v must be at least
    # values[k] - min(values[k:]) for all of them to stay >= 0.
    if kind == "slip":
        i = rng.randrange(len(moves))
        wrong = _wrong_value(rng, values[i + 1], values[i + 1] - min(values[i + 1:]))
        left, op, b, _ = clean[i]
        steps = clean[:i] + [(left, op, b, wrong)] + _steps(wrong, moves[i + 1:])
    elif kind == "copy":
        i = rng.randrange(len(moves))
        steps = clean[:i] + _steps(_wrong_value(rng, values[i], values[i] - min(values[i:])), moves[i:])
    elif kind == "skip":
        i = rng.choice(skippable)
        steps = clean[:i] + _steps(values[i], moves[i + 1:])
    else:
        steps = clean
    final = steps[-1][3] if steps else values[0]
    return _render(steps, _wrong_value(rng, final, 0) if kind == "answer" else final)


def solution(problem, rng=None, error_rate=0.0):
    """The worked solution of `problem` (completion text, no EOS). With error_rate > 0, it contains one
    realistic mistake with that probability (then its answer is wrong); `rng` is needed then."""
    if error_rate > 0 and rng is None:
        raise ValueError("solution: error_rate > 0 needs an rng")
    if error_rate > 0 and rng.random() < error_rate:
        return _mistaken_solution(problem, rng)
    return _render(_steps(problem.operands[0], zip(problem.ops, problem.operands[1:])), problem.answer)


def corrupt(problem, rng):
    """A wrong worked solution (verify(...).correct is always False): a DPO "rejected" completion."""
    return _mistaken_solution(problem, rng)


# -----------------------------------------------------------------------------------------------------------
# the verifier


@dataclass(frozen=True)
class Verdict:
    correct: bool  # well-formed and the answer is the true result
    answer: int | None  # the number after '#' of a well-formed completion, else None
    step_labels: list  # per ';'-terminated step: 1 right, 0 wrong (local labels, see the module docstring)
    step_ends: list  # character offset of each step's ';' in the completion
    first_error: int | None = None  # index of the first step labelled 0, None if every step is right

    @property
    def prefix_labels(self):
        """Math-Shepherd-style labels: 1 up to the first wrong step, 0 from it on."""
        n = len(self.step_labels) if self.first_error is None else self.first_error
        return [1] * n + [0] * (len(self.step_labels) - n)


def verify(prompt, completion):
    """Score a completion against its prompt: outcome and per-step labels (rules in the module docstring)."""
    problem = parse_prompt(prompt)
    step_ends = [i for i, c in enumerate(completion) if c == ";"]
    labels, well_formed = [], True
    start, left = 0, problem.operands[0]  # left: what the next step must start from (None: unknown)
    for k, end in enumerate(step_ends):
        m = _STEP_RE.fullmatch(completion, start, end)
        start = end + 1
        if m is None:
            labels.append(0)
            left, well_formed = None, False  # nothing was written to continue from
            continue
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        labels.append(int(k < len(problem.ops) and a == left and op == problem.ops[k]
                          and b == problem.operands[k + 1] and c == _apply(a, op, b)))
        left = c
    m = _ANSWER_RE.fullmatch(completion, start)
    answer = int(m[1]) if m and well_formed else None
    first_error = labels.index(0) if 0 in labels else None
    return Verdict(answer == problem.answer, answer, labels, step_ends, first_error)


def token_labels(prompt, completion):
    """Per-character labels of a completion's steps: 1 while a step still reads as the right step written
    so far, 0 from its first wrong character to its ';' (the local labels of verify, resolved to where the
    mistake is). One label per character up to and including the last ';'; the ';' of step k gets exactly
    verify's step_labels[k].

    The right step k is "{left}{op}{b}={left op b};", with left the previous step's written result (step 0:
    the prompt's first operand), op and b the prompt's (k+1)-th. "54-4=51;" for "54-4=50;" is 1 up to
    "54-4=5" and 0 at "1" and ";"; an extra step past the last operation is 0 from its first character, and
    so is every step after one that was malformed (nothing is written to continue from)."""
    v = verify(prompt, completion)
    problem = parse_prompt(prompt)
    labels, start, left = [], 0, problem.operands[0]
    for k, (end, label) in enumerate(zip(v.step_ends, v.step_labels)):
        written = completion[start:end + 1]
        m = _STEP_RE.fullmatch(completion, start, end)
        if label:
            labels += [1] * len(written)  # right (possibly with leading zeros the string check would flag)
        elif left is None or k >= len(problem.ops):
            labels += [0] * len(written)
        else:
            want = f"{left}{problem.ops[k]}{problem.operands[k + 1]}={_apply(left, problem.ops[k], problem.operands[k + 1])};"
            first = next((i for i, (a, b) in enumerate(zip(written, want)) if a != b), min(len(written), len(want)))
            first = min(first, len(written) - 1)  # the ';' of a wrong step is always 0
            labels += [1] * first + [0] * (len(written) - first)
        left = int(m[4]) if m else None
        start = end + 1
    return labels


# -----------------------------------------------------------------------------------------------------------
# JSONL

_TYPE_NAMES = {int: "an integer", str: "a string"}


def _short(value):
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."


def _alphabet_check(text):
    bad = _first_foreign_char(text)
    if bad is not None:
        raise ValueError(f"has character {bad!r} outside the tokenizer's alphabet {ALPHABET!r}")


def _check_row(row, fields, where, check_text):
    """Raise ValueError "where: ..." unless `row` holds each field with the right type; returns the row's
    fields. A field's kind is a type (checked, and a str is passed to check_text) or a converter function
    (its result is the value; a ValueError it raises names the field)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_short(row)}")
    out = {}
    for name, kind in fields.items():
        if name not in row:
            raise ValueError(f"{where}: missing field {name!r}")
        value = row[name]
        if not isinstance(kind, type):
            try:
                out[name] = kind(value)
            except ValueError as e:
                raise ValueError(f"{where}: field {name!r}: {e}") from None
            continue
        # bool is a subclass of int in Python: true in an integer field is a broken file, not a 1
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ValueError(f"{where}: field {name!r} must be {_TYPE_NAMES.get(kind, kind.__name__)}, "
                             f"got {_short(value)}")
        if kind is str and check_text is not None:
            try:
                check_text(value)
            except ValueError as e:
                raise ValueError(f"{where}: field {name!r} {e}") from None
        out[name] = value
    return out


def read_jsonl(path, fields, check_text=_alphabet_check):
    """Rows of a JSONL file, each a dict of exactly `fields` (name -> python type, e.g. {"answer": int}, or a
    converter function). Every string goes through check_text (default: the task's alphabet; None: no check),
    which raises ValueError to refuse it. Blank lines are skipped; any other bad line raises
    ValueError("PATH:LINE: ...") naming the field."""
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
            except ValueError as e:  # UnicodeDecodeError and JSONDecodeError both are ValueErrors
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            rows.append(_check_row(row, fields, where, check_text))
    return rows


def _atomic_write(path, text):
    # a temp file in the same folder, then os.replace: readers see the old file or the new one, never half
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a data file should be readable like any other
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_jsonl(path, rows):
    """Write rows (dicts), one JSON object per line, atomically."""
    _atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))


# -----------------------------------------------------------------------------------------------------------
# the shipped files: what each holds, in one place (main() turns every number into a flag)


@dataclass(frozen=True)
class FileSpec:
    count: int  # lines
    difficulty: Difficulty
    split: str  # the hash split all its prompts come from
    fields: dict  # JSONL field -> python type, as read_jsonl checks them


PROMPT_ANSWER = {"prompt": str, "answer": int}
FILES = {
    "pretrain": FileSpec(60_000, Difficulty(2, 6), "train", {"text": str}),
    "sft": FileSpec(20_000, Difficulty(2, 5), "train", {"prompt": str, "completion": str}),
    "rl": FileSpec(5_000, Difficulty(5, 6), "train", PROMPT_ANSWER),
    "pairs": FileSpec(5_000, Difficulty(2, 6), "train", {"prompt": str, "chosen": str, "rejected": str}),
    "test": FileSpec(500, Difficulty(2, 6), "test", PROMPT_ANSWER),
    "test_ood": FileSpec(500, Difficulty(7, 8), "test", PROMPT_ANSWER),
}
PRETRAIN_ERROR_RATE = 0.3


def make_row(name, problem, rng, error_rate):
    """One line of file `name` for `problem`."""
    if name == "pretrain":
        return {"text": problem.prompt + solution(problem, rng, error_rate)}
    if name == "sft":
        return {"prompt": problem.prompt, "completion": solution(problem)}
    if name == "pairs":
        return {"prompt": problem.prompt, "chosen": solution(problem), "rejected": corrupt(problem, rng)}
    return {"prompt": problem.prompt, "answer": problem.answer}


def model_texts(row, problem):
    """The texts a row puts between [bos] and [eos]; for prompt-only rows, with the right completion."""
    if "text" in row:
        return [row["text"]]
    if "chosen" in row:
        return [problem.prompt + row["chosen"], problem.prompt + row["rejected"]]
    return [problem.prompt + row.get("completion", solution(problem))]


def get_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m data.task", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Regenerate data/tokenizer.json and every JSONL file of the task, deterministically.")
    p.add_argument("--seed", type=int, default=0,
                   help="one seed for all files; each file draws from its own stream, so changing one file's "
                        "flags leaves the others as they were")
    p.add_argument("--out-dir", default=DATA_DIR, help="folder to write the files to")
    p.add_argument("--error-rate", type=float, default=PRETRAIN_ERROR_RATE,
                   help="fraction of pretrain solutions with a mistake (what keeps the base model imperfect)")
    p.add_argument("--max-value", type=int, default=Difficulty.max_value,
                   help="every intermediate result of every problem lies in 0..MAX_VALUE")
    p.add_argument("--max-operand", type=int, default=Difficulty.max_operand,
                   help="every operand lies in 0..MAX_OPERAND")
    g = p.add_argument_group("files (lines, and operands per problem drawn uniformly from MIN_OPS..MAX_OPS)")
    for name, spec in FILES.items():
        flag = name.replace("_", "-")
        g.add_argument(f"--{flag}-count", type=int, default=spec.count, help=f"lines of {name}.jsonl")
        g.add_argument(f"--{flag}-min-ops", type=int, default=spec.difficulty.min_ops, help="fewest operands")
        g.add_argument(f"--{flag}-max-ops", type=int, default=spec.difficulty.max_ops, help="most operands")
    args = p.parse_args(argv)
    if not 0 <= args.error_rate <= 1:
        p.error(f"--error-rate must lie in 0..1, got {args.error_rate}")
    args.files = {}  # the FILES table with the flags applied
    for name, spec in FILES.items():
        try:
            d = Difficulty(getattr(args, f"{name}_min_ops"), getattr(args, f"{name}_max_ops"),
                           args.max_value, args.max_operand)
        except ValueError as e:
            p.error(f"{name}: {e}")
        args.files[name] = dataclasses.replace(spec, count=getattr(args, f"{name}_count"), difficulty=d)
    longest_train = max(s.difficulty.max_ops for s in args.files.values() if s.split == "train")
    if args.files["test_ood"].difficulty.min_ops <= longest_train:
        p.error(f"test_ood must have more operands than any training file (up to {longest_train})")
    return args


def main(argv=None):
    args = get_args(argv)
    tok = build_tokenizer()

    # --- generate every file in memory first, so a failed check leaves the old files in place
    out, longest, n_mistaken = {}, {}, 0
    for name, spec in args.files.items():
        rng = random.Random(f"{args.seed}:{name}")  # str seeds are hashed with SHA-512: stable across runs
        try:
            problems = sample_distinct(rng, spec.difficulty, spec.count, spec.split)
        except ValueError as e:
            sys.exit(f"data.task: error: {name}: {e}")
        out[name] = [make_row(name, p, rng, args.error_rate) for p in problems]
        # the longest sequence the model sees for this file: [bos] prompt completion [eos]
        texts = [t for r, p in zip(out[name], problems) for t in model_texts(r, p)]
        lengths = [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]
        longest[name] = 2 + max(lengths, default=0)
        if name == "pretrain":
            n_mistaken = sum(not verify(p.prompt, r["text"][len(p.prompt):]).correct
                             for r, p in zip(out[name], problems))
    if max(longest.values()) > MAX_SEQ_LEN:
        sys.exit(f"data.task: error: a sequence of {max(longest.values())} tokens exceeds {MAX_SEQ_LEN}")

    # --- write and summarise
    os.makedirs(args.out_dir, exist_ok=True)
    _atomic_write(os.path.join(args.out_dir, "tokenizer.json"), tok.to_str(pretty=True))
    print(f"{'file':16s} {'lines':>6s} {'bytes':>9s}  split  operands  longest (tokens, BOS/EOS incl.)")
    for name, rows in out.items():
        path = os.path.join(args.out_dir, name + ".jsonl")
        write_jsonl(path, rows)
        spec = args.files[name]
        print(f"{name + '.jsonl':16s} {len(rows):6d} {os.path.getsize(path):9d}  {spec.split:5s}  "
              f"{spec.difficulty.min_ops}..{spec.difficulty.max_ops}{'':6s}{longest[name]}")
    print(f"pretrain solutions with a mistake: {n_mistaken / max(1, len(out['pretrain'])):.1%} "
          f"(--error-rate {args.error_rate}); values 0..{args.max_value}, operands 0..{args.max_operand}; "
          f"longest sequence {max(longest.values())} of {MAX_SEQ_LEN} tokens")


if __name__ == "__main__":
    main()
