#!/usr/bin/env python3
"""esft eval against transformers on one random OLMoE-shaped checkpoint (issue 9).

Default shape: OLMoE-1B-7B at 1/4 width (hidden 512, 16 layers, 64 experts, top-8,
expert hidden 256, 4 heads of 128, vocab 50304), bf16 weights, one 1024-token sample.
Writes the checkpoint under build/bench_models/ (bench/olmoe_bench.py, shared with
bench_train.py), then times (same machine, same run):
  transformers forward (torch fp32 compute on the bf16 weights upcast, its default kernels, no grad)
  esft eval (fp32 compute, bf16 weights in memory)
and reports the ratio, esft's peak memory (its own getrusage, on stderr) against the
checkpoint's bytes, and the loss difference. Needs torch + transformers.
  python3 bench/bench_models.py [--width-div 4] [--tokens 1024] [--layers 16]
"""
import argparse, os, subprocess, sys, time

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width-div", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--esft", default="build/esft")
    ap.add_argument("--out", default="build/bench_models")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--experts-impl", default=None, help="transformers experts_implementation (default: its own)")
    a = ap.parse_args()
    import torch
    from transformers import OlmoeForCausalLM
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import olmoe_bench
    torch.set_num_threads(a.threads)
    div = a.width_div
    d, cfg = olmoe_bench.checkpoint(a.out, div, a.layers)
    ids, data = olmoe_bench.sample(d, cfg, a.tokens)
    ckpt_bytes = olmoe_bench.checkpoint_bytes(d)

    # transformers' own defaults (sdpa attention, its default experts kernel): the strongest baseline
    kw = {"experts_implementation": a.experts_impl} if a.experts_impl else {}
    m = OlmoeForCausalLM.from_pretrained(d, dtype=torch.float32, **kw).eval()
    impl = "attn %s, experts %s" % (m.config._attn_implementation,
                                    getattr(m.config, "_experts_implementation", None) or "default")
    with torch.no_grad():
        out = m(input_ids=ids, labels=ids)  # warm-up
        t_hf = []
        for _ in range(a.reps):
            t0 = time.perf_counter(); out = m(input_ids=ids, labels=ids); t_hf.append(time.perf_counter() - t0)
    hf_loss = float(out.loss)
    del m, out

    t_esft, loss = [], None
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    for _ in range(a.reps):
        t0 = time.perf_counter()
        r = subprocess.run([a.esft, "eval", d, "--data", data, "-q"], capture_output=True, text=True, env=env)
        t_esft.append(time.perf_counter() - t0)
        if r.returncode:
            sys.exit("esft eval failed: " + r.stderr)
        loss = float(r.stdout.split()[1])
    # esft's time includes opening the checkpoint; time the open alone too
    r = subprocess.run([a.esft, "eval", d, "--data", data, "--max-samples", "1"], capture_output=True, text=True, env=env)
    print(olmoe_bench.shape_line(cfg, div, a.tokens, a.threads))
    print("checkpoint: %.1f MB bf16" % (ckpt_bytes / 1e6))
    print("transformers %s, torch %s (%s)" % (__import__("transformers").__version__, torch.__version__, impl))
    print("transformers forward (fp32, no grad): best %.3f s  (runs %s)" % (min(t_hf), " ".join("%.3f" % t for t in t_hf)))
    print("esft eval (open + forward + loss):  best %.3f s  (runs %s)" % (min(t_esft), " ".join("%.3f" % t for t in t_esft)))
    print("speed-up esft / transformers: %.2fx" % (min(t_hf) / min(t_esft)))
    print("loss: esft %.6f transformers %.6f |diff| %.2e" % (loss, hf_loss, abs(loss - hf_loss)))
    print(r.stderr.strip())

if __name__ == "__main__":
    main()
