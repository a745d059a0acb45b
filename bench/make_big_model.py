#!/usr/bin/env python3
"""A random bf16 checkpoint at a released MoE shape, written without torch (issue 9).

Default: OLMoE-1B-7B's config (allenai/OLMoE-1B-7B-0924: hidden 2048, 16 layers,
16 heads, 64 experts top-8, expert hidden 1024, vocab 50304; 6.92 B parameters,
13.8 GB in bf16), sharded at ~5 GB with model.safetensors.index.json, plus a
JSONL of random token ids. Memory stays at one chunk (64 MB) whatever the size:
each tensor streams from a seeded generator straight into its shard.

Values: random sign and mantissa with a fixed exponent, |w| in [2^-7, 2^-6)
(about 0.01, the scale of trained weights); norm weights 1. Only numpy.

    python3 bench/make_big_model.py [--out DIR] [--layers N] [--tokens T]
then  build/esft eval DIR --data DIR/data.jsonl ; build/esft stats DIR --data ...
"""
import argparse, json, os, struct, sys
import numpy as np

CHUNK = 32 << 20  # bf16 values per chunk (64 MB)


def olmoe_1b_7b(layers):
    return {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
        "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024,
        "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16,
        "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "clip_qkv": None, "tie_word_embeddings": False, "output_router_logits": False,
        "router_aux_loss_coef": 0.01, "initializer_range": 0.02, "pad_token_id": 1, "eos_token_id": 50279,
        "bos_token_id": None, "torch_dtype": "bfloat16", "use_cache": True,
    }


def tensors(c):
    """(name, shape, kind) in the order of a Hugging Face save; kind 'ones' or 'rand'."""
    D, F, V, E = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_experts"]
    out = [("model.embed_tokens.weight", (V, D), "rand")]
    for l in range(c["num_hidden_layers"]):
        p = "model.layers.%d." % l
        out += [(p + "input_layernorm.weight", (D,), "ones"), (p + "post_attention_layernorm.weight", (D,), "ones")]
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((p + "self_attn.%s.weight" % n, (D, D), "rand"))
        out += [(p + "self_attn.q_norm.weight", (D,), "ones"), (p + "self_attn.k_norm.weight", (D,), "ones")]
        out.append((p + "mlp.gate.weight", (E, D), "rand"))
        for e in range(E):
            out += [(p + "mlp.experts.%d.gate_proj.weight" % e, (F, D), "rand"),
                    (p + "mlp.experts.%d.up_proj.weight" % e, (F, D), "rand"),
                    (p + "mlp.experts.%d.down_proj.weight" % e, (D, F), "rand")]
    out += [("model.norm.weight", (D,), "ones"), ("lm_head.weight", (V, D), "rand")]
    return out


def shards(ts, max_bytes):
    groups, cur, size = [], [], 0
    for t in ts:
        n = int(np.prod(t[1])) * 2
        if cur and size + n > max_bytes:
            groups.append(cur); cur, size = [], 0
        cur.append(t); size += n
    groups.append(cur)
    return groups


def write_shard(path, group, rng):
    hdr, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in group:
        n = int(np.prod(shape)) * 2
        hdr[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h))); f.write(h)
        for name, shape, kind in group:
            left = int(np.prod(shape))
            while left:
                m = min(left, CHUNK)
                if kind == "ones":
                    f.write(np.full(m, 0x3F80, dtype="<u2").tobytes())
                else:  # sign and 7 mantissa bits random, exponent 2^-7
                    r = rng.integers(0, 1 << 16, size=m, dtype=np.uint16)
                    f.write(((r & 0x807F) | 0x3C00).astype("<u2").tobytes())
                left -= m
    os.replace(tmp, path)
    return off


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build/olmoe-1b-7b-random")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=256, help="tokens in data.jsonl (2 samples)")
    ap.add_argument("--shard-gb", type=float, default=5.0)
    a = ap.parse_args()
    c = olmoe_1b_7b(a.layers)
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(7)
    groups = shards(tensors(c), int(a.shard_gb * 1e9))
    weight_map, total = {}, 0
    for i, g in enumerate(groups):
        fn = "model-%05d-of-%05d.safetensors" % (i + 1, len(groups))
        total += write_shard(os.path.join(a.out, fn), g, rng)
        for name, _, _ in g:
            weight_map[name] = fn
        print("wrote %s (%d tensors)" % (fn, len(g)), file=sys.stderr)
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    ids = np.random.default_rng(1).integers(0, c["vocab_size"], size=a.tokens)
    half = a.tokens // 2
    with open(os.path.join(a.out, "data.jsonl"), "w") as f:
        for s in (ids[:half], ids[half:]):
            f.write(json.dumps({"input_ids": [int(x) for x in s]}) + "\n")
    print("%s: %d parameters, %.2f GB in %d shards" % (a.out, total // 2, total / 1e9, len(groups)))


if __name__ == "__main__":
    main()
