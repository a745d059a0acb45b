"""The random OLMoE-shaped checkpoint that bench_models.py and bench_train.py share.

OLMoE-1B-7B's shape divided in width by `div` (default 4: hidden 512, 4 heads of 128,
expert hidden 256), `layers` layers, 64 experts top-8, vocab 50304, untied head; weights
drawn normal(0, 0.02) (norms 1) with torch seed 0 and saved in bf16 under
OUT/olmoe_div{div}_L{layers} (made once, reused). One sample of `tokens` random ids
(seed 1) goes to bench.jsonl beside it. Needs torch + transformers.
"""
import json, os


def olmoe_config(div, layers):
    from transformers import OlmoeConfig
    return OlmoeConfig(vocab_size=50304, hidden_size=2048 // div, intermediate_size=1024 // div,
                       num_hidden_layers=layers, num_attention_heads=16 // div, num_key_value_heads=16 // div,
                       num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
                       tie_word_embeddings=False)


def checkpoint(out, div, layers):
    """The checkpoint directory (written on first use) and its config."""
    import torch
    from transformers import OlmoeForCausalLM
    cfg = olmoe_config(div, layers)
    d = os.path.join(out, "olmoe_div%d_L%d" % (div, layers))
    if not os.path.exists(os.path.join(d, "config.json")):
        torch.manual_seed(0)
        m = OlmoeForCausalLM(cfg).to(torch.bfloat16)
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
        m.save_pretrained(d)
    return d, cfg


def sample(d, cfg, tokens, name="bench.jsonl"):
    """One sample of `tokens` random ids (labels = ids, so tokens - 1 scored) as a
    (1, tokens) tensor, also written to d/name as {"input_ids": [...]}; returns (ids, path)."""
    import torch
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.write(json.dumps({"input_ids": ids[0].tolist()}) + "\n")
    return ids, path


def checkpoint_bytes(d):
    return sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d) if x.endswith(".safetensors"))


def shape_line(cfg, div, tokens, threads):
    return ("shape: OLMoE-1B-7B / %d width: hidden %d, %d layers, 64 experts top-8, F %d, vocab %d; %d tokens; %d threads"
            % (div, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size, tokens, threads))


def _status(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss():
    """This process's peak resident memory in bytes (VmHWM; 0 if unknown)."""
    return _status("VmHWM")


def rss():
    """This process's resident memory now in bytes (VmRSS; 0 if unknown)."""
    return _status("VmRSS")
