"""
Writes the HF-parity fixtures under tests/fixtures/. IMPORTS TRANSFORMERS: run once by hand,
    python tests/make_hf_fixtures.py
and commit the output. The tests themselves only read these files and never need transformers.

What it writes (about 0.5 MB in all):
    llama/   a tiny random LlamaForCausalLM (grouped-query attention, untied), saved SHARDED so the
             model.safetensors.index.json path of GPT.from_pretrained is exercised
    qwen2/   a tiny random Qwen2ForCausalLM (q/k/v biases, tied embeddings), one model.safetensors
    ours_llama/, ours_qwen2/   folders written by OUR GPT.save_pretrained from a fixed seed
    logits.safetensors   input_ids, the logits transformers computes for them with each of the four models,
                         and transformers' greedy continuation of input_ids under llama/
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for model.py
from model import GPT, GPTConfig  # noqa: E402

OUT = Path(__file__).resolve().parent / "fixtures"
VOCAB, GREEDY_TOKENS = 64, 8
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, rms_norm_eps=1e-5,
            rope_parameters=dict(rope_type="default", rope_theta=500.0))  # not the default theta, on purpose


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
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=gen)  # (B, T)
    record = {"input_ids": input_ids}

    llama = hf_model(LlamaConfig(**TINY, tie_word_embeddings=False), seed=1)
    llama.save_pretrained(OUT / "llama", max_shard_size="50KB")  # several shards + index
    qwen2 = hf_model(Qwen2Config(**TINY, tie_word_embeddings=True), seed=2)
    qwen2.save_pretrained(OUT / "qwen2")
    with torch.no_grad():
        record["llama_logits"] = llama(input_ids).logits
        record["qwen2_logits"] = qwen2(input_ids).logits
        # greedy continuation, no EOS so it always runs GREEDY_TOKENS steps; an explicit all-ones mask, or
        # generate would take every token equal to pad_token_id for padding
        record["llama_greedy"] = llama.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                                max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                                eos_token_id=None, pad_token_id=0)

    # the other direction: our save_pretrained, read back by transformers
    for name, qkv_bias, tied, seed in (("ours_llama", False, False, 3), ("ours_qwen2", True, True, 4)):
        torch.manual_seed(seed)
        ours = GPT(GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                             intermediate_size=64, max_seq_len=64, rope_theta=500.0, qkv_bias=qkv_bias,
                             tie_embeddings=tied))
        randomize(ours, seed)
        ours.save_pretrained(OUT / name)
        theirs = AutoModelForCausalLM.from_pretrained(OUT / name, attn_implementation="eager",
                                                      dtype=torch.float32).eval()
        with torch.no_grad():
            record[f"{name}_logits"] = theirs(input_ids).logits

    save_file({k: v.contiguous() for k, v in record.items()}, str(OUT / "logits.safetensors"))
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
