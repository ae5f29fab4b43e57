"""
data/tokenizer.py: text <-> token ids for one model, and how a prompt is shown to it.

A Tokenizer is read from a model folder, the way transformers reads it, with `tokenizers` (and jinja2 only
when a chat template is rendered):

    tokenizer.json                      the vocabulary, merges, normaliser, pre-tokeniser, post-processor
    tokenizer_config.json               bos/eos/pad tokens, add_bos_token, chat_template (older layout)
    chat_template.jinja                 chat_template (newer layout; wins over tokenizer_config.json's)
    generation_config.json, config.json eos_token_id: one id or a list, every one of which ends a completion

The three sequences every stage builds:

    prompt      chat template: render([{"role": "user", "content": prompt}], add_generation_prompt=True),
                encoded WITHOUT the post-processor (the template writes any BOS itself, as in
                transformers' apply_chat_template); no template: --prompt-template filled with the prompt,
                encoded WITH the post-processor (Llama's adds BOS), plus BOS if add_bos_token asks for it
    completion  encode(text) + [eos_id]; eos_id is tokenizer_config's eos_token (the end of a chat turn for
                an instruct model), else the first id of generation_config's eos_token_id
    decoding    every id in stop_ids ends a completion; the text is decoded with special tokens removed

The built-in character-level tokenizer of the arithmetic task (data/tokenizer.json: <pad> <bos> <eos> and
the task's 15 characters) is read the same way: its checkpoints carry a tokenizer_config.json that names
the three special tokens and sets add_bos_token, so prompt = [<bos>] + characters, as it always was.
"""

import json
import os

from tokenizers import Tokenizer as HFTokenizer

FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
         "generation_config.json")  # copied into every checkpoint a model started from this folder writes


def _token_text(value):
    # tokenizer_config.json writes a special token either as a string or as {"content": "...", ...}
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path):
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return out


class Tokenizer:
    """One model's tokenizer: encode/decode, its special ids, and prompt rendering (chat or plain)."""

    def __init__(self, folder, chat=True, prompt_template="{prompt}"):
        self.folder = folder
        self.path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(self.path):
            raise ValueError(f"{folder}: no tokenizer.json (a model folder needs its tokenizer)")
        try:
            self.tok = HFTokenizer.from_file(self.path)
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{self.path}: not a tokenizer file ({str(e).splitlines()[0]})") from None
        cfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
        gen = _read_json(os.path.join(folder, "generation_config.json"))
        model_cfg = _read_json(os.path.join(folder, "config.json"))
        vocab = self.tok.get_vocab(with_added_tokens=True)

        def token_id(key, fallback):
            # the token that tokenizer_config.json names, else a token literally called `fallback` (<eos>, ...)
            text = _token_text(cfg.get(key)) or fallback
            return vocab.get(text) if text else None

        self.bos_id = token_id("bos_token", "<bos>")
        # several EOS ids are common (an instruct model's end of turn and the base model's end of text):
        # sampling stops at any of them
        eos = []
        for source in (gen.get("eos_token_id"), model_cfg.get("eos_token_id")):
            eos += source if isinstance(source, list) else [source] if isinstance(source, int) else []
        turn_end = token_id("eos_token", "<eos>")
        self.eos_id = turn_end if turn_end is not None else (eos[0] if eos else None)
        if self.eos_id is None:
            raise ValueError(f"{folder}: no EOS token: tokenizer_config.json names no eos_token and neither "
                             "generation_config.json nor config.json has an eos_token_id")
        self.stop_ids = sorted({self.eos_id, *eos})
        pad = token_id("pad_token", "<pad>")
        self.pad_id = pad if pad is not None else self.eos_id  # padding is always masked; any id will do
        # a checkpoint of ours written before it carried a tokenizer_config.json always started with <bos>
        legacy = not cfg and self.bos_id is not None and self.bos_id == vocab.get("<bos>")
        self.add_bos = bool(cfg.get("add_bos_token", legacy)) and self.bos_id is not None
        self.unk_id = self.tok.token_to_id(_token_text(cfg.get("unk_token")) or "<unk>")
        with open(self.path, encoding="utf-8") as f:
            spec = json.load(f)
        self.byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or \
            bool((spec.get("model") or {}).get("byte_fallback"))
        self.special_tokens = {key: _token_text(cfg[key]) for key in
                               ("bos_token", "eos_token", "pad_token", "unk_token") if cfg.get(key)}
        template_file = os.path.join(folder, "chat_template.jinja")
        if os.path.exists(template_file):
            with open(template_file, encoding="utf-8") as f:
                self.chat_template = f.read()
        else:
            self.chat_template = cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # several named templates: the "default" one
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default")
        self.use_chat = bool(chat and self.chat_template)
        self.prompt_template = prompt_template
        self._render = None

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def identity(self):
        """What two tokenizers must share for their models' log-probs to be comparable (distill, eval KL)."""
        return (self.tok.get_vocab(with_added_tokens=True), self.stop_ids, self.render("{P}"))

    # --- text -> ids

    def encode(self, text, special=False):
        """Token ids of `text` (special=True: through the post-processor, e.g. Llama's BOS). Raises
        ValueError naming the first character the vocabulary cannot represent."""
        try:
            ids = self.tok.encode(text, add_special_tokens=special).ids
        except Exception:  # a vocabulary without <unk> fails on an unknown character
            ids = None
        if ids is None or (self.unk_id is not None and self.unk_id in ids):
            self.check(text)
            raise ValueError(f"{text[:40]!r} cannot be encoded with {self.path}")
        return ids

    def check(self, text):
        """Raise ValueError if `text` has a character the vocabulary cannot represent (it would fail, or
        become <unk>); a byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) represents every string."""
        if self.byte_level:
            return
        try:
            if self.unk_id not in self.tok.encode(text, add_special_tokens=False).ids:
                return
        except Exception:
            pass
        for c in text:
            try:
                ok = self.unk_id not in self.tok.encode(c, add_special_tokens=False).ids
            except Exception:
                ok = False
            if not ok:
                raise ValueError(f"has character {c!r}, which the vocabulary of {self.path} lacks")

    def render(self, prompt):
        """The text the model is shown for a prompt: the chat template with the assistant's turn opened, or
        --prompt-template with the prompt filled in."""
        if not self.use_chat:
            return self.prompt_template.replace("{prompt}", prompt)
        if self._render is None:
            self._render = compile_chat_template(self.chat_template)
        return self._render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
                            **self.special_tokens)

    def encode_batch(self, texts, special=False):
        """encode() of many texts in one tokenizer call. With special=True the post-processor runs, and BOS is
        added where add_bos_token asks for it and the post-processor did not: the rule for a prompt without a
        chat template and for a pretraining document."""
        try:
            encs = self.tok.encode_batch(list(texts), add_special_tokens=special)
        except Exception:  # a vocabulary without <unk> fails on an unknown character: name it
            encs = None
        out = []
        for i, text in enumerate(texts):
            ids = encs[i].ids if encs is not None else None
            if ids is None or (self.unk_id is not None and self.unk_id in ids):
                ids = self.encode(text, special)  # raises ValueError naming the character
            if special and self.add_bos and ids[:1] != [self.bos_id]:
                ids = [self.bos_id] + ids
            out.append(ids)
        return out

    def prompts_ids(self, prompts):
        """The token ids a model is shown for each prompt: the chat template, which writes any BOS itself,
        or --prompt-template through the post-processor (Llama's adds BOS) and the add_bos_token rule."""
        return self.encode_batch([self.render(p) for p in prompts], special=not self.use_chat)

    def prompt_ids(self, prompt):
        return self.prompts_ids([prompt])[0]

    def documents(self, texts):
        """Token ids of whole texts to train on every token of (pretraining): like a prompt without a chat
        template, then EOS."""
        return [ids + [self.eos_id] for ids in self.encode_batch(texts, special=True)]

    def completion_ids(self, text):
        return self.encode(text) + [self.eos_id]

    def lengths(self, prompts, completions=None):
        """len(prompt_ids(p)) (+ len(completion_ids(c))) for many rows at once: for checking that a data file
        fits the model's context."""
        out = [len(ids) for ids in self.prompts_ids(prompts)]
        if completions is not None:
            out = [n + len(ids) + 1 for n, ids in zip(out, self.encode_batch(completions))]
        return out

    # --- ids -> text

    def decode(self, ids):
        """Text of a completion: the ids before the first stop id, with special tokens removed."""
        ids = list(ids)
        cut = next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))
        return self.tok.decode(ids[:cut], skip_special_tokens=True)

    def save(self, folder):
        """Copy the tokenizer files of our folder into `folder`, so the checkpoint loads with them."""
        for name in FILES:
            src = os.path.join(self.folder, name)
            if os.path.exists(src):
                with open(src, "rb") as f, open(os.path.join(folder, name), "wb") as g:
                    g.write(f.read())


def compile_chat_template(source):
    """A chat template compiled the way transformers compiles it, so the rendered text is the same.

    transformers renders in a sandboxed jinja2 environment with trim_blocks and lstrip_blocks on, the
    loopcontrols extension, a tojson filter that keeps non-ASCII text, and raise_exception / strftime_now
    as globals; the special tokens are passed by name (bos_token, eos_token, ...).
    """
    import datetime

    import jinja2.ext  # installed with torch; imported only where a template is rendered
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source).render
