"""
data/answer.py: the verifier of `--task answer`: is the final number of a completion the row's answer?

    completion  "... so she has 18 - 3 = 15 dollars left. #### 15"      -> 15
                "The answer is $1,200."                                 -> 1200
    answer      15, "15", "1,200", 1200.0                               (a JSONL number or string)

The number read is the one after the last "####" when the completion has one (GSM8K's form), else the last
number anywhere in it. Both sides are parsed to exact decimals, never evaluated: thousands commas, a leading
"$" and trailing zeros after the point are tolerated, so "1,200", "$1200" and "1200.00" are equal. A
completion with no number is wrong. Fractions ("3/4") and units are not parsed: the number before the
slash or unit is the one read.
"""

import re
from decimal import Decimal, InvalidOperation

# an optional sign and "$", then digits with optional thousands commas, then an optional decimal part
_NUMBER_RE = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_MARK = "####"


def parse_number(text):
    """Decimal value of one number written as above, or None if `text` is not exactly one number."""
    text = text.strip()
    if not _NUMBER_RE.fullmatch(text):
        return None
    try:
        return Decimal(text.replace("$", "").replace(",", ""))
    except InvalidOperation:
        return None


def final_number(completion):
    """The completion's answer as a Decimal (after the last "####" if any, else its last number), or None."""
    if _MARK in completion:
        m = _NUMBER_RE.search(completion.rsplit(_MARK, 1)[1])
        return parse_number(m.group()) if m else None
    found = _NUMBER_RE.findall(completion)
    return parse_number(found[-1]) if found else None


def answer_value(value):
    """A JSONL answer (int, float or numeric string) as a Decimal; ValueError if it is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a number or a numeric string, got {value!r}")
    out = parse_number(str(value)) if not isinstance(value, float) else Decimal(repr(value))
    if out is None:
        raise ValueError(f"{value!r} is not a number")
    return out


def is_correct(completion, answer):
    """Whether the completion's final number equals the answer (a Decimal from answer_value)."""
    got = final_number(completion)
    return got is not None and got == answer
