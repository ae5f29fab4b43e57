"""model.py: parity with HF transformers both ways (through committed fixtures, so no transformers here),
checkpoint round trip, KV cache, left padding, tied embeddings, GQA and Qwen3 shapes, and clear errors."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from model import GPT, GPTConfig, KVCache, decode_attention

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # written by tests/make_hf_fixtures.py
TINY = dict(vocab_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, max_seq_len=64)
QWEN3 = dict(qk_norm=True, head_dim=16)  # head_dim 16 != n_embd / n_head = 8, as in every Qwen3


@pytest.fixture(scope="module")
def recorded():
    return load_file(FIXTURES / "logits.safetensors")


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


# --- parity with HF transformers --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_hf_checkpoint_gives_hf_logits(recorded, name):
    # llama/ is sharded (index.json path), GQA, untied; qwen2/ has q/k/v biases, tied embeddings and a
    # vocabulary padded past its tokenizer's; qwen3/ has q/k norms and head_dim != hidden / heads
    model = GPT.from_pretrained(FIXTURES / name)
    with torch.no_grad():
        logits = model(recorded["input_ids"])
    assert (logits - recorded[f"{name}_logits"]).abs().max() <= 1e-5


def test_hf_greedy_tokens(recorded):
    model = GPT.from_pretrained(FIXTURES / "llama")
    new = recorded["llama_greedy"].size(1) - recorded["input_ids"].size(1)
    assert torch.equal(model.generate(recorded["input_ids"], new, temperature=0), recorded["llama_greedy"])


@pytest.mark.parametrize("name", ["ours_llama", "ours_qwen2", "ours_qwen3"])
def test_our_checkpoint_gives_hf_logits(recorded, name, tmp_path):
    # transformers read this folder (written by our save_pretrained) and produced the recorded logits
    model = GPT.from_pretrained(FIXTURES / name)
    with torch.no_grad():
        logits = model(recorded["input_ids"])
    assert (logits - recorded[f"{name}_logits"]).abs().max() <= 1e-5
    # and today's save_pretrained still writes what transformers was shown: same config, same tensors
    model.save_pretrained(tmp_path)
    now, then = tmp_path, FIXTURES / name
    assert json.loads((now / "config.json").read_text()) == json.loads((then / "config.json").read_text())
    ours, committed = load_file(now / "model.safetensors"), load_file(then / "model.safetensors")
    assert ours.keys() == committed.keys()
    assert all(torch.equal(ours[k], committed[k]) for k in ours)


# --- checkpoints --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, dict(qkv_bias=True, tie_embeddings=True, score_head=True), QWEN3])
def test_save_load_round_trip(tmp_path, overrides):
    model = tiny(**overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # non-trivial norms, biases and score head
    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path)
    assert loaded.config == model.config
    idx = torch.randint(0, TINY["vocab_size"], (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
        if model.config.score_head:
            scores = [m.score(m(idx, return_hidden=True)) for m in (loaded, model)]
            assert torch.equal(*scores)


def test_fresh_score_head_is_zero():
    # a value model started from a policy checkpoint that has no score head
    model = GPT.from_pretrained(FIXTURES / "llama", score_head=True)
    idx = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        scores = model.score(model(idx, return_hidden=True)).squeeze(-1)  # (B, T)
    assert scores.shape == (2, 5) and torch.equal(scores, torch.zeros(2, 5))


def test_tokenizer_ids_in_config(tmp_path):
    tok = tmp_path / "tok.json"
    added = [{"id": 0, "content": "<pad>"}, {"id": 2, "content": "<eos>"}]
    tok.write_text(json.dumps({"added_tokens": added}))
    tiny().save_pretrained(tmp_path / "m", tokenizer_path=tok)
    hf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (hf["pad_token_id"], hf["eos_token_id"], "bos_token_id" in hf) == (0, 2, False)
    assert (tmp_path / "m" / "tokenizer.json").read_text() == tok.read_text()


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        GPT.from_pretrained(tmp_path)
    tiny().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel"):
        GPT.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(ValueError, match="mlp.gate_proj.weight has shape"):
        GPT.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.norm.weight missing"):
        GPT.from_pretrained(tmp_path)

    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="neither model.safetensors"):
        GPT.from_pretrained(tmp_path)


def test_sharded_folder_missing_shard(tmp_path):
    shutil.copytree(FIXTURES / "llama", tmp_path / "llama")
    next((tmp_path / "llama").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors is missing"):
        GPT.from_pretrained(tmp_path / "llama")


def test_unsupported_architectures_refused(tmp_path):
    tiny(**QWEN3).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["head_dim"] == 16
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match="unsupported architecture MistralForCausalLM, expected one of "
                                         "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        GPT.from_pretrained(tmp_path)
    # Qwen3's attention_bias biases o_proj as well as q, k, v: not a layout we have
    (tmp_path / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(ValueError, match="unsupported attention_bias"):
        GPT.from_pretrained(tmp_path)
    # transformers' Qwen3 takes a missing head_dim as 128, not hidden / heads: so do we, and shapes disagree
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "head_dim"}))
    with pytest.raises(ValueError, match=r"q_proj.weight has shape \(64, 32\), config.json implies \(512, "):
        GPT.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="qk_norm with qkv_bias"):
        tiny(**QWEN3, qkv_bias=True).save_pretrained(tmp_path / "both")


@pytest.mark.parametrize("absolute", [False, True])
def test_index_entry_outside_folder_refused(tmp_path, absolute):
    folder = tmp_path / "llama"
    shutil.copytree(FIXTURES / "llama", folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    # the entry leads to a real copy of the shard, so only the check stands between it and a load
    shutil.copy(folder / shard, tmp_path / "outside.safetensors")
    entry = str(tmp_path / "outside.safetensors") if absolute else "../outside.safetensors"
    index["weight_map"] = {k: entry if v == shard else v for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape(f"entry {name}: {entry} points outside the folder")):
        GPT.from_pretrained(folder)


def test_unused_tensors_refused(tmp_path):
    # config.json says one layer fewer than the checkpoint holds: loading would run a truncated model
    shutil.copytree(FIXTURES / "qwen3", tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    (tmp_path / "q" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1,
                                                            "layer_types": ["full_attention"]}))
    expected = r"tensor model\.layers\.1\.input_layernorm\.weight in the checkpoint is not part of the model "
    with pytest.raises(ValueError, match=expected + r"that config\.json describes \(11 such tensors\)"):
        GPT.from_pretrained(tmp_path / "q")
    # one stray tensor in a single-file checkpoint
    tiny().save_pretrained(tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    save_file({**tensors, "model.extra.weight": torch.zeros(3)}, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match="tensor model.extra.weight in the checkpoint is not part"):
        GPT.from_pretrained(tmp_path / "m")


def test_score_tensors_dropped_only_on_request(tmp_path):
    model = tiny(score_head=True)
    model.save_pretrained(tmp_path)
    assert not GPT.from_pretrained(tmp_path, score_head=False).config.score_head  # asked to drop: fine
    # a config.json that does not mention the head while the checkpoint holds one: not what it says it is
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "score_head"}))
    with pytest.raises(ValueError, match="tensor score.bias in the checkpoint is not part"):
        GPT.from_pretrained(tmp_path)
    assert GPT.from_pretrained(tmp_path, score_head=True).config.score_head


# --- architecture -------------------------------------------------------------------------------------------


def test_tied_embeddings_are_one_tensor():
    model = GPT.from_pretrained(FIXTURES / "qwen2")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    n_untied = tiny(tie_embeddings=False).num_params()
    assert tiny(tie_embeddings=True).num_params() == n_untied - TINY["vocab_size"] * TINY["n_embd"]


def test_qwen3_shapes():
    # head_dim is its own number: q is n_head * head_dim wide, o maps it back to n_embd, RoPE and cache use it
    model = GPT.from_pretrained(FIXTURES / "qwen3")
    c, attn = model.config, model.model.layers[0].self_attn
    assert (c.n_embd, c.n_head, c.head_dim, c.qk_norm, c.qkv_bias) == (32, 4, 16, True, False)
    assert attn.q_proj.weight.shape == (64, 32) and attn.o_proj.weight.shape == (32, 64)
    assert attn.k_proj.weight.shape == (32, 32) and attn.q_proj.bias is None
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (16,)
    assert not torch.equal(attn.q_norm.weight, torch.ones(16))  # loaded, not left at its init
    assert model.rope_cos.shape == (256, 16)
    assert KVCache(c, batch_size=1, max_len=8).k.shape == (2, 1, 2, 8, 16)


def test_gqa_shapes():
    model = tiny()
    hs = TINY["n_embd"] // TINY["n_head"]
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (TINY["n_head"] * hs, TINY["n_embd"])
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (TINY["n_kv_head"] * hs, TINY["n_embd"])
    cache = KVCache(model.config, batch_size=3, max_len=20)
    assert cache.k.shape == (TINY["n_layer"], 3, TINY["n_kv_head"], 20, hs)


@pytest.mark.parametrize("overrides", [{}, QWEN3])
@pytest.mark.parametrize("padded", [True, False])
def test_kv_cache_matches_full_forward(padded, overrides):
    model = tiny(**overrides)
    idx = torch.randint(0, TINY["vocab_size"], (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0  # one left-padded row
    mask[2, :1] = 0

    def m(t):  # the mask for the first t tokens; None (the no-padding fast path) when unpadded
        return mask[:, :t] if padded else None

    with torch.no_grad():
        full = model(idx, m(12))  # (B, T, V)
        cache = KVCache(model.config, batch_size=3, max_len=12)
        # a prefill of 5, a chunk of 3, then one token at a time, as a sampler and a multi-turn rollout would
        pieces = [model(idx[:, :5], m(5), cache), model(idx[:, 5:8], m(8), cache)]
        pieces += [model(idx[:, t:t + 1], m(t + 1), cache) for t in range(8, 12)]
    assert cache.pos == 12
    assert (torch.cat(pieces, dim=1) - full).abs().max() <= 1e-5


def test_left_padding_changes_nothing():
    model = tiny()
    seqs = [torch.randint(0, TINY["vocab_size"], (n,)) for n in (9, 4, 1)]
    idx = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, 9 - len(s):], mask[i, 9 - len(s):] = s, 1
    padded = model(idx, mask)  # (B, T, V), with gradients
    assert torch.isfinite(padded).all()  # pad query rows see their own key: no 0/0 softmax
    for i, s in enumerate(seqs):
        alone = model(s[None])  # (1, n, V)
        assert (padded[i, 9 - len(s):] - alone[0]).abs().max() <= 1e-5
    # masked-out rows must not poison gradients with NaN either
    (padded * mask[..., None]).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_packed_segments_are_separate_sequences():
    # one row holding three sequences (mask 1, 2, 3, then right padding 0) gives each sequence exactly the
    # logits it gets alone: positions restart at every segment and no token sees another segment
    model = tiny()
    seqs = [torch.randint(0, TINY["vocab_size"], (n,)) for n in (4, 1, 5)]
    idx = torch.cat(seqs + [torch.zeros(2, dtype=torch.long)])[None]  # (1, 12)
    mask = torch.tensor([[1] * 4 + [2] + [3] * 5 + [0] * 2])  # (1, 12)
    packed = model(idx, mask)  # (1, 12, V), with gradients
    start = 0
    for s in seqs:
        alone = model(s[None])  # (1, n, V)
        assert (packed[0, start:start + len(s)] - alone[0]).abs().max() <= 1e-5
        start += len(s)
    pos, _ = model._positions_and_mask(mask, 12, torch.float32)
    assert pos.tolist() == [[0, 1, 2, 3, 0, 0, 1, 2, 3, 4, 0, 1]]  # the pads after the last run count on
    (packed * (mask > 0)[..., None]).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_too_long_is_an_error():
    model = tiny()
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


# --- tokenizer fixtures -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_chat_fixture_ids_match_tokenizers(name):
    # chat.json holds transformers' apply_chat_template output; the tokenizers library alone gives the same
    # ids, and each model's embedding covers its tokenizer (qwen2's is padded past it, as Qwen's are)
    tok = Tokenizer.from_file(str(FIXTURES / name / "tokenizer.json"))
    entries = json.loads((FIXTURES / "chat.json").read_text())[name]
    assert len(entries) == (4 if name == "qwen3" else 3)
    for e in entries:
        assert tok.encode(e["text"], add_special_tokens=False).ids == e["ids"]
        assert tok.encode(e["prompt"]).ids == e["plain_ids"]
        assert tok.decode(e["ids"], skip_special_tokens=False) == e["text"]
    vocab = json.loads((FIXTURES / name / "config.json").read_text())["vocab_size"]
    assert vocab == tok.get_vocab_size() + (48 if name == "qwen2" else 0)


@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_equals_sdpa(masked):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 8), torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)  # 2 query heads per kv
    mask = None
    if masked:
        mask = torch.zeros(3, 1, 1, 7)
        mask[1, ..., :3] = float("-inf")  # a left-padded row: its first 3 keys are padding
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = decode_attention(q, k, v, mask)
    assert got.shape == (3, 4, 1, 8)
    assert (got - want).abs().max() <= 1e-6
    if masked:  # the padded keys get no weight: changing them changes nothing
        k2, v2 = k.clone(), v.clone()
        k2[1, :, :3], v2[1, :, :3] = 100.0, 100.0
        assert (decode_attention(q, k2, v2, mask)[1] - got[1]).abs().max() <= 1e-6
