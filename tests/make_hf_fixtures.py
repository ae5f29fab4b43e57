"""
Writes the HF-parity fixtures under tests/fixtures/. IMPORTS TRANSFORMERS: run once by hand,
    python tests/make_hf_fixtures.py
and commit the output. The tests themselves only read these files and never need transformers. Everything is
seeded, so a rerun with the same library versions writes the same files.

What it writes (about 1 MB in all):
    gsm/     a tiny GSM8K-style task made up from templates (no transformers needed for this part):
             rl.jsonl, test.jsonl {"prompt", "answer"} (answer an int or a string such as "1,200"),
             sft.jsonl {"prompt", "completion"} (a short worked solution ending "#### N"),
             pairs.jsonl {"prompt", "chosen", "rejected"}, pretrain.jsonl {"text"}
    llama/   a tiny random LlamaForCausalLM (grouped-query attention, untied), saved SHARDED so the
             model.safetensors.index.json path of GPT.from_pretrained is exercised, with a Llama-3-style
             byte-level BPE tokenizer (BOS prepended by the post-processor, header tokens, two EOS ids) and
             its chat template in tokenizer_config.json
    qwen2/   a tiny random Qwen2ForCausalLM (q/k/v biases, tied embeddings, an embedding matrix padded past
             the tokenizer's vocabulary as Qwen's are), one model.safetensors, with a ChatML tokenizer (no
             BOS, a default system message) and its chat template in tokenizer_config.json
    qwen3/   a tiny random Qwen3ForCausalLM (q/k RMSNorm, head_dim 16 != hidden 32 / 4 heads, tied), with
             the ChatML tokens plus <think> </think> and a template honouring enable_thinking, saved as
             chat_template.jinja (the newer layout), not in tokenizer_config.json
    ours_llama/, ours_qwen2/, ours_qwen3/   folders written by OUR GPT.save_pretrained from a fixed seed
    logits.safetensors   input_ids, the logits transformers computes for them with each of the six models,
                         and transformers' greedy continuation of input_ids under llama/
    chat.json   per family, what transformers' apply_chat_template renders and tokenizes for 3 prompts of
                gsm/test.jsonl (qwen3 also once with enable_thinking=False), the plain tokenization of the
                prompt and the generation_config's EOS ids
"""

import json
import random
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for model.py
from model import GPT, GPTConfig  # noqa: E402

OUT = Path(__file__).resolve().parent / "fixtures"
VOCAB, GREEDY_TOKENS = 64, 8  # input_ids are drawn below VOCAB, the smallest vocabulary of the six models
TOK_VOCAB = 400  # every tokenizer's size, special tokens included
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=256, rms_norm_eps=1e-5,
            rope_parameters=dict(rope_type="default", rope_theta=500.0))  # not the default theta, on purpose

# --- gsm/: a made-up grade-school maths task ---------------------------------------------------------------

NAMES = ["Tom", "Sara", "Ali", "Mia", "Ben", "Ana", "Leo", "Zoe"]
ITEMS = ["apples", "pens", "books", "eggs", "cards", "shells"]


def problem(rng):
    """One word problem: (prompt, worked solution without the final line, answer as an int)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        return (f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have?",
                f"{a} + {b} = {a + b}", a + b)
    if kind == 1:
        a, b = rng.randint(20, 90), rng.randint(2, 19)
        return (f"{name} had {a} {item} and gave away {b}. How many {item} are left?",
                f"{a} - {b} = {a - b}", a - b)
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return (f"A box holds {a} {item}. How many {item} are in {b} boxes?", f"{a} * {b} = {a * b}", a * b)
    if kind == 3:
        a, b = rng.randint(3, 30), rng.randint(2, 9)
        return (f"{name} earns ${a} a day. How many dollars does {name} earn in {b} days?",
                f"{a} * {b} = {a * b}", a * b)
    # thousands, so some answers come out as "1,200" strings
    a, b = rng.randint(11, 60) * 10, rng.randint(3, 9)
    return (f"A farm packs {a} {item} a week. How many {item} in {b} weeks?", f"{a} * {b} = {a * b}", a * b)


def answer_field(n, rng):
    # the mix a loader meets: plain ints, digit strings, and thousands with a comma
    return f"{n:,}" if n >= 1000 else rng.choice([n, str(n)])


def write_gsm(folder, seed=0):
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"rl": [], "test": [], "sft": [], "pairs": [], "pretrain": []}
    for split, n in (("rl", 40), ("test", 20)):
        for _ in range(n):
            prompt, _, ans = problem(rng)
            rows[split].append({"prompt": prompt, "answer": answer_field(ans, rng)})
    for _ in range(40):
        prompt, work, ans = problem(rng)
        rows["sft"].append({"prompt": prompt, "completion": f"{work}\n#### {ans}"})
    for _ in range(40):
        prompt, work, ans = problem(rng)
        wrong = ans + rng.choice([-10, -2, -1, 1, 2, 10])
        rows["pairs"].append({"prompt": prompt, "chosen": f"{work}\n#### {ans}",
                              "rejected": f"{work.rsplit('=', 1)[0]}= {wrong}\n#### {wrong}"})
    for _ in range(40):
        prompt, work, ans = problem(rng)
        rows["pretrain"].append({"text": f"{prompt} {work}, so {ans}."})
    for split, items in rows.items():
        for row in items:
            for key, value in row.items():
                assert str(value).isascii() and len(str(value)) < (110 if split == "pretrain" else 80), row
        with open(folder / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in items)
    return rows


def corpus(rows):
    """Every string in the task, for training the tokenizers, plus the chat scaffolding words."""
    text = [str(v) for items in rows.values() for row in items for v in row.values()]
    return text + ["system", "user", "assistant", "You are a helpful assistant."] * 20


# --- tokenizers and chat templates -------------------------------------------------------------------------

# the families' pre-tokenizer regexes: Llama 3 groups up to 3 digits into one piece, Qwen2 splits every digit
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

LLAMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

QWEN2_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'system' and loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen3's shape: no default system message, the reasoning of assistant turns before the last user turn is
# dropped, and enable_thinking=False pre-fills an empty think block
QWEN3_TEMPLATE = """\
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}
        {%- set ns.last_user = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content %}
    {%- if message.role == 'assistant' and '</think>' in content and loop.index0 < ns.last_user %}
        {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

FAMILIES = {
    "llama": dict(split=LLAMA3_SPLIT, nfc=False, bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
                  special=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                           "<|end_header_id|>"],
                  plain=[], gen_eos=["<|end_of_text|>", "<|eot_id|>"], template=LLAMA_TEMPLATE, jinja=False),
    "qwen2": dict(split=QWEN2_SPLIT, nfc=True, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                  special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                  plain=[], gen_eos=["<|im_end|>", "<|endoftext|>"], template=QWEN2_TEMPLATE, jinja=False),
    # Qwen3's <think> and </think> are added tokens but not special ones: skip_special_tokens keeps them
    "qwen3": dict(split=QWEN2_SPLIT, nfc=True, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                  special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                  plain=["<think>", "</think>"], gen_eos=["<|im_end|>", "<|endoftext|>"],
                  template=QWEN3_TEMPLATE, jinja=True),
}


def train_tokenizer(fam, text):
    """A byte-level BPE on the task's text, laid out as the family's: special tokens after the merges."""
    tok = Tokenizer(models.BPE())
    if fam["nfc"]:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(fam["split"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    n_added = len(fam["special"]) + len(fam["plain"])
    trainer = trainers.BpeTrainer(vocab_size=TOK_VOCAB - n_added, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    assert tok.get_vocab_size() == TOK_VOCAB - n_added, tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in fam["special"]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in fam["plain"]])
    if fam["bos"]:
        # as Llama 3's tokenizer.json: the post-processor, not the template, puts BOS before plain text
        bos = (fam["bos"], tok.token_to_id(fam["bos"]))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]}:0 $A:0", pair=f"{bos[0]}:0 $A:0 {bos[0]}:1 $B:1", special_tokens=[bos])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def save_tokenizer(fam, tok, folder):
    """Through transformers' own save_pretrained, so tokenizer.json / tokenizer_config.json are its files."""
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=fam["bos"], eos_token=fam["eos"],
                                     pad_token=fam["pad"], chat_template=fam["template"])
    # save_jinja_files=False is the older layout, the template as "chat_template" in tokenizer_config.json
    hf_tok.save_pretrained(folder, save_jinja_files=fam["jinja"])
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert ("chat_template" in config) != fam["jinja"]
    assert (folder / "chat_template.jinja").exists() == fam["jinja"]


def chat_records(name, fam, folder, prompts):
    """What a tokenizer loaded from folder renders: the chat.json entries of one family."""
    tok = AutoTokenizer.from_pretrained(folder)
    eos_ids = [tok.convert_tokens_to_ids(t) for t in fam["gen_eos"]]
    assert GenerationConfig.from_pretrained(folder).eos_token_id == eos_ids
    cases = [(p, {}) for p in prompts]
    if name == "qwen3":
        cases.append((prompts[0], {"enable_thinking": False}))
    records = []
    for prompt, extra in cases:
        chat = [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **extra)
        ids = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, **extra)["input_ids"]
        assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
        assert ids == tok(text, add_special_tokens=False)["input_ids"]  # the template carries its own BOS
        plain = tok(prompt)["input_ids"]
        assert (plain[0] == tok.bos_token_id) == (fam["bos"] is not None)
        records.append({"prompt": prompt, "text": text, "ids": ids, "plain_ids": plain, "eos_ids": eos_ids,
                        **extra})
    return records


# --- models ------------------------------------------------------------------------------------------------


def randomize(model, seed):
    """HF initialises norms to 1 and biases to 0, which would hide a mis-mapped norm or bias: jitter all."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1.0 + noise if "norm" in name else noise * 2)


def hf_model(config, seed):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomize(model, seed)
    return model.eval()


def main():
    OUT.mkdir(exist_ok=True)
    # everything under OUT is this script's: start clean, so no stale shard survives a rerun
    for old in OUT.iterdir():
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    rows = write_gsm(OUT / "gsm")
    text = corpus(rows)
    test_prompts = [row["prompt"] for row in rows["test"][:3]]

    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=gen)  # (B, T)
    record, chat = {"input_ids": input_ids}, {}
    specs = {  # family: (config class, extra config, seed, save kwargs)
        "llama": (LlamaConfig, dict(vocab_size=TOK_VOCAB, tie_word_embeddings=False), 1,
                  dict(max_shard_size="100KB")),  # several shards + index
        "qwen2": (Qwen2Config, dict(vocab_size=TOK_VOCAB + 48, tie_word_embeddings=True), 2, {}),
        "qwen3": (Qwen3Config, dict(vocab_size=TOK_VOCAB, tie_word_embeddings=True, head_dim=16), 5, {}),
    }
    for name, (config_cls, extra, seed, save_kwargs) in specs.items():
        fam, folder = FAMILIES[name], OUT / name
        tok = train_tokenizer(fam, text)
        ids = {t: tok.token_to_id(t) for t in fam["special"]}
        eos_ids = [ids[t] for t in fam["gen_eos"]]
        bos_id = ids.get(fam["bos"])
        model = hf_model(config_cls(**TINY, **extra, bos_token_id=bos_id, eos_token_id=eos_ids,
                                    pad_token_id=ids.get(fam["pad"])), seed)
        model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_ids,
                                                   pad_token_id=ids.get(fam["pad"]))
        model.save_pretrained(folder, **save_kwargs)
        save_tokenizer(fam, tok, folder)
        chat[name] = chat_records(name, fam, folder, test_prompts)
        with torch.no_grad():
            record[f"{name}_logits"] = model(input_ids).logits
        if name == "llama":
            # greedy continuation, no EOS so it always runs GREEDY_TOKENS steps; an explicit all-ones mask, or
            # generate would take every token equal to pad_token_id for padding
            with torch.no_grad():
                record["llama_greedy"] = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                                        max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                                        eos_token_id=None, pad_token_id=0)
        # what we wrote is what transformers reads back
        again = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
        with torch.no_grad():
            assert torch.equal(again.eval()(input_ids).logits, record[f"{name}_logits"])

    # the other direction: our save_pretrained, read back by transformers
    ours = {"ours_llama": (dict(), 3), "ours_qwen2": (dict(qkv_bias=True, tie_embeddings=True), 4),
            "ours_qwen3": (dict(qk_norm=True, head_dim=16, tie_embeddings=True), 6)}
    for name, (overrides, seed) in ours.items():
        torch.manual_seed(seed)
        model = GPT(GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                              intermediate_size=64, max_seq_len=64, rope_theta=500.0, **overrides))
        randomize(model, seed)
        model.save_pretrained(OUT / name)
        theirs = AutoModelForCausalLM.from_pretrained(OUT / name, attn_implementation="eager",
                                                      dtype=torch.float32).eval()
        config = json.loads((OUT / name / "config.json").read_text())
        assert [type(theirs).__name__] == config["architectures"]
        with torch.no_grad():
            record[f"{name}_logits"] = theirs(input_ids).logits

    save_file({k: v.contiguous() for k, v in record.items()}, str(OUT / "logits.safetensors"))
    (OUT / "chat.json").write_text(json.dumps(chat, indent=1) + "\n")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
