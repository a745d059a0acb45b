#!/usr/bin/env python3
"""Training goldens for tests/test_train.c, computed by transformers + torch.

For each tiny checkpoint of tests/models (written by tests/gen_models.py) it
writes <variant>/train_golden.safetensors:

  train_layers, train_experts (n) int64  the ESFT expert config: per MoE layer the
                                          expert the 3 samples route most slots to
                                          (ties: lower id)
  loss (1) float64                        mean cross-entropy over every scored token
                                          of the 3 samples of data.jsonl (pooled;
                                          each sample run alone, batch 1)
  n_scored (1) int64
  grad (n, 3 F D) float32                 d loss / d expert weights, per trained expert
                                          gate (F, D), up (F, D), down (D, F) flattened:
                                          esft_model_trainable's block layout
  shared_grad (M, 3 FS D) float32         variants in SHARED only: the config also sets
                                          shared_experts (ESFT's flag): the gradient of
                                          every MoE layer's shared experts, gate, up, down
  adamw_losses (6) float64                the loss before each of 5 AdamW steps and
                                          after the last (torch.optim.AdamW lr 1e-3,
                                          betas 0.9/0.95, eps 1e-8, wd 0.1, the whole
                                          batch each step, only the trained experts move)

And, for every variant of METHODS (the MoE ones and the dense llama, mistral,
qwen2), two files of the other methods of ESFT's comparison:

  fft_golden.safetensors    every parameter trains (torch.optim.AdamW over
                            model.parameters()): loss (1), adamw_losses (6), and
                            per non-expert tensor (checkpoint name N) a sample of
                            its gradient, grad.N = flat[::stride] with stride =
                            max(1, numel // 256), and gmax.N = max |gradient|
                            (experts: the ESFT golden checks their gradients)
  lora/                     PEFT (LoraConfig r 4, alpha 8, dropout 0) on the
                            attention projections (and, dense families, the
                            MLPs), A and B drawn
                            non-zero (so both have gradients) and saved by
                            PEFT's save_pretrained: adapter_model.safetensors +
                            adapter_config.json, the start of the C run
  lora_golden.safetensors   loss (1), adamw_losses (6) (AdamW over the adapters
                            only), grad.N / gmax.N sampled as fft's, N = the
                            PEFT file's tensor name

Everything in fp32 (bf16 checkpoints loaded as fp32 on their bf16 values, FP8
dequantised), eager attention and experts, eval mode (no dropout), one thread.
Only ESFT's experts train: the other experts' slices of the fused tensors are
restored after every step (torch's AdamW would decay them), so the run is
ESFT's. Rerun with:

    python3 tests/gen_train_goldens.py [--only NAME[,NAME...]] [--methods esft,fft,lora]

Needs torch, transformers v5, numpy, safetensors (what gen_models.py needs),
and peft for the LoRA goldens.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as np_save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_models import dequantised_dir, load_model, moe_layers  # noqa: E402

MODELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
# qwen2_moe_fused and deepseek_v3_fp8 are the same math as qwen2_moe and
# deepseek_v3 (their layouts are the forward's test); left out to keep the files small.
VARIANTS = ["olmoe", "qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v2_lite", "deepseek_v2_qlora_yarn",
            "deepseek_v3_bf16_tied"]
# variants whose config also trains the shared experts (Qwen2's gated one, DeepSeek's)
SHARED = {"qwen2_moe", "deepseek_v2_qlora_yarn"}
# the other methods: every MoE variant above plus the dense families
METHODS = VARIANTS + ["llama", "mistral", "qwen2"]
STEPS = 5
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
LORA_R, LORA_ALPHA = 4, 8.0
# esft's LoRA targets: the attention projections (attn), plus the dense MLP
# layers' gate/up/down (mlp) on the dense families only: on a MoE model PEFT
# 0.22 also puts adapters on transformers' fused experts when a target is
# named down_proj (its target_parameters), which esft does not do
LORA_ATTN = r".*\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj)"
LORA_ATTN_MLP = r".*\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"


def read_samples(d):
    out = []
    for line in open(os.path.join(d, "data.jsonl")):
        if line.strip():
            s = json.loads(line)
            out.append((s["input_ids"], s.get("labels", s["input_ids"])))
    return out


def pooled_loss(model, samples):
    """Sum of the token cross-entropies of every sample (each alone) / scored tokens."""
    total, n = 0.0, 0
    for ids, labels in samples:
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        tgt = torch.tensor(labels[1:])
        total = total + torch.nn.functional.cross_entropy(logits[:-1], tgt, ignore_index=-100, reduction="sum")
        n += int((tgt != -100).sum())
    return total / n, n


@torch.no_grad()
def most_used(model, samples):
    """Per MoE layer, the expert with the most routing slots over the samples."""
    layers = moe_layers(model)
    counts = {}
    handles = []
    for l in layers:
        def hook(mod, args, kwargs, l=l):
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            E = mod.gate_up_proj.shape[0]
            counts[l] = counts.get(l, 0) + torch.bincount(idx.reshape(-1), minlength=E)
        handles.append(model.model.layers[l].mlp.experts.register_forward_pre_hook(hook, with_kwargs=True))
    for ids, _ in samples:
        model(input_ids=torch.tensor([ids]))
    for h in handles:
        h.remove()
    # argmax returns the first maximum: ties go to the lower id
    return [(l, int(torch.argmax(counts[l]))) for l in layers]


def expert_grad(model, l, e):
    ex = model.model.layers[l].mlp.experts
    F = ex.down_proj.shape[2]
    gu, dn = ex.gate_up_proj.grad[e], ex.down_proj.grad[e]
    return torch.cat([gu[:F].reshape(-1), gu[F:].reshape(-1), dn.reshape(-1)]).numpy().astype(np.float32)


def shared_modules(model):
    out = []
    for l in moe_layers(model):
        mlp = model.model.layers[l].mlp
        out.append(getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts"))
    return out


def shared_grad(mod):
    return torch.cat([mod.gate_proj.weight.grad.reshape(-1), mod.up_proj.weight.grad.reshape(-1),
                      mod.down_proj.weight.grad.reshape(-1)]).numpy().astype(np.float32)


def build(name, tmp):
    d = os.path.join(MODELS, name)
    cfg = json.load(open(os.path.join(d, "config.json")))
    src = d
    if "quantization_config" in cfg:
        src = os.path.join(tmp, name + "_deq")
        dequantised_dir(d, src)
    model = load_model(src)
    samples = read_samples(d)
    train = most_used(model, samples)
    for p in model.parameters():
        p.requires_grad_(False)
    tensors = []
    for l in sorted({l for l, _ in train}):
        ex = model.model.layers[l].mlp.experts
        tensors += [ex.gate_up_proj, ex.down_proj]
    shared = []
    if name in SHARED:
        for mod in shared_modules(model):
            shared += [mod.gate_proj.weight, mod.up_proj.weight, mod.down_proj.weight]
    for t in tensors + shared:
        t.requires_grad_(True)
    frozen = [t.detach().clone() for t in tensors]

    loss, n = pooled_loss(model, samples)
    loss.backward()
    grads = np.stack([expert_grad(model, l, e) for l, e in train])
    sgrads = np.stack([shared_grad(mod) for mod in shared_modules(model)]) if shared else None
    first_loss = float(loss.detach())

    for t in tensors + shared:
        t.grad = None
    opt = torch.optim.AdamW(tensors + shared, **ADAMW)
    keep = {}  # per tensor, a mask of the trained experts' slices
    for i, t in enumerate(tensors):
        l = sorted({l for l, _ in train})[i // 2]
        m = torch.zeros(t.shape[0], dtype=torch.bool)
        for ll, e in train:
            if ll == l:
                m[e] = True
        keep[i] = m
    losses = []
    for step in range(STEPS + 1):
        opt.zero_grad()
        loss, _ = pooled_loss(model, samples)
        losses.append(float(loss.detach()))
        if step == STEPS:
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            for i, t in enumerate(tensors):
                t[~keep[i]] = frozen[i][~keep[i]]
    assert losses[0] == first_loss
    out = {
        "train_layers": np.array([l for l, _ in train], dtype=np.int64),
        "train_experts": np.array([e for _, e in train], dtype=np.int64),
        "loss": np.array([first_loss], dtype=np.float64),
        "n_scored": np.array([n], dtype=np.int64),
        "grad": grads,
        "adamw_losses": np.array(losses, dtype=np.float64),
    }
    if sgrads is not None:
        out["shared_grad"] = sgrads
    path = os.path.join(d, "train_golden.safetensors")
    np_save_file(out, path, metadata={"format": "np", "torch": torch.__version__})
    return path, out


def grad_sample(g):
    flat = g.detach().reshape(-1).numpy().astype(np.float32)
    stride = max(1, flat.size // 256)
    return flat[::stride].copy(), np.array([np.abs(flat).max()], dtype=np.float32)


def adamw_losses(model, samples, params):
    opt = torch.optim.AdamW(params, **ADAMW)
    losses = []
    for step in range(STEPS + 1):
        opt.zero_grad()
        loss, _ = pooled_loss(model, samples)
        losses.append(float(loss.detach()))
        if step == STEPS:
            break
        loss.backward()
        opt.step()
    return np.array(losses, dtype=np.float64)


def source_dir(name, tmp):
    d = os.path.join(MODELS, name)
    cfg = json.load(open(os.path.join(d, "config.json")))
    if "quantization_config" not in cfg:
        return d
    src = os.path.join(tmp, name + "_deq")
    dequantised_dir(d, src)
    return src


def checkpoint_names(d):
    names = set()
    for f in os.listdir(d):
        if f.endswith(".safetensors") and "golden" not in f:
            with safe_open(os.path.join(d, f), "np") as st:
                names |= set(st.keys())
    return names


def build_fft(name, tmp):
    d = os.path.join(MODELS, name)
    model = load_model(source_dir(name, tmp))
    samples = read_samples(d)
    loss, n = pooled_loss(model, samples)
    loss.backward()
    out = {"loss": np.array([float(loss.detach())], dtype=np.float64), "n_scored": np.array([n], dtype=np.int64)}
    stored = checkpoint_names(d)
    for pname, p in model.named_parameters():
        if ".experts." in pname or "shared_expert" in pname and "shared_expert_gate" not in pname:
            continue  # experts (routed and shared): the ESFT golden's
        # the checkpoint's name (Mixtral's released files say block_sparse_moe)
        key = pname if pname in stored else pname.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        assert key in stored, pname
        out["grad." + key], out["gmax." + key] = grad_sample(p.grad)
    model.zero_grad()
    out["adamw_losses"] = adamw_losses(model, samples, list(model.parameters()))
    path = os.path.join(d, "fft_golden.safetensors")
    np_save_file(out, path, metadata={"format": "np", "torch": torch.__version__})
    return path, out


def build_lora(name, tmp):
    import peft
    d = os.path.join(MODELS, name)
    model = load_model(source_dir(name, tmp))
    samples = read_samples(d)
    dense = not moe_layers(model)
    cfg = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                          target_modules=LORA_ATTN_MLP if dense else LORA_ATTN, bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    g = np.random.default_rng(11)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_A" in pname:
                bound = 1.0 / np.sqrt(p.shape[1])
                p.copy_(torch.from_numpy(g.uniform(-bound, bound, size=tuple(p.shape)).astype(np.float32)))
            elif "lora_B" in pname:
                p.copy_(torch.from_numpy((0.05 * g.standard_normal(size=tuple(p.shape))).astype(np.float32)))
    shutil.rmtree(os.path.join(d, "lora"), ignore_errors=True)
    model.save_pretrained(os.path.join(d, "lora"))
    os.remove(os.path.join(d, "lora", "README.md"))  # PEFT's model card template: not data
    model.eval()
    loss, n = pooled_loss(model, samples)
    loss.backward()
    out = {"loss": np.array([float(loss.detach())], dtype=np.float64), "n_scored": np.array([n], dtype=np.int64)}
    lora = [(pname, p) for pname, p in model.named_parameters() if "lora_" in pname]
    for pname, p in lora:
        # PEFT's file name: without the adapter name ("default")
        key = pname.replace(".default", "")
        out["grad." + key], out["gmax." + key] = grad_sample(p.grad)
    model.zero_grad()
    out["adamw_losses"] = adamw_losses(model, samples, [p for _, p in lora])
    path = os.path.join(d, "lora_golden.safetensors")
    np_save_file(out, path, metadata={"format": "np", "torch": torch.__version__})
    return path, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="")
    ap.add_argument("--methods", default="esft,fft,lora")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    want = [n for n in args.only.split(",") if n]
    methods = set(args.methods.split(","))
    total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in METHODS:
            if want and name not in want:
                continue
            if "esft" in methods and name in VARIANTS:
                path, out = build(name, tmp)
                total += os.path.getsize(path)
                print(f"{name:<24} esft experts {list(zip(out['train_layers'].tolist(), out['train_experts'].tolist()))} "
                      f"loss {out['loss'][0]:.6f} -> {out['adamw_losses'][-1]:.6f}")
            for meth, fn in (("fft", build_fft), ("lora", build_lora)):
                if meth not in methods:
                    continue
                path, out = fn(name, tmp)
                total += os.path.getsize(path)
                print(f"{name:<24} {meth} loss {out['loss'][0]:.6f} -> {out['adamw_losses'][-1]:.6f}  "
                      f"{os.path.getsize(path)} bytes")
    print(f"total {total} bytes")


if __name__ == "__main__":
    sys.exit(main())
