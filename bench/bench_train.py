#!/usr/bin/env python3
"""esft train against transformers + torch doing the same training step.

The checkpoint of bench_models.py (bench/olmoe_bench.py: OLMoE-1B-7B at 1/4 width,
random bf16 weights), one sample of --tokens ids (default 1024, so 1023 scored
tokens: every step trains on that one 1024-token batch), an ESFT expert config of
the --top-k experts per layer the sample routes most tokens to (esft stats MODEL
--data, then esft select --top-k: the config exactly as esft select writes it;
default 6 of 64, 9.4 %). Same run, same machine, same thread count:

  esft      esft train --method esft: steps/s from the times at which its --log
            lines appear (a line is written after each step), so opening the model
            and writing the experts are not timed; peak RSS of the process.
  torch     transformers (fp32, weights upcast from the bf16 file, sdpa attention,
   esft     grouped_mm experts) doing the same ESFT step: the selected experts are
            separate fp32 parameters; a custom autograd function computes the
            grouped expert GEMMs over the fused frozen tensors and, in backward, the
            input gradient for all experts but the weight gradient only for the
            selected ones (as esft does). torch.optim.AdamW over those parameters
            only (lr 1e-5, betas 0.9/0.95, wd 0.1, eps 1e-8), clip_grad_norm_ 1.0,
            constant lr; after each step the new values are copied into the fused
            tensors. This is the fastest form of ESFT in torch that we know; it
            favours torch against its stock fused 3-D parameters, which would
            compute and keep gradients (and AdamW state) for all 64 experts.
  torch     the same model, every parameter trainable, transformers' own
   fft      grouped_mm experts, the same AdamW and clip (the "ESFT memory against
            full fine-tuning" row).
  esft fft  esft train --method fft, if this build has it (else a line saying so).

Each torch variant runs in its own process (its peak RSS is its own VmHWM,
loading included). --warmup-steps steps (default 1) are run first on each side
and not timed. Prints steps/s, the ratio esft / torch, peak RSS, and the loss of
every step on both sides (same weights, same data: they agree to ~1e-7).
Needs torch + transformers.
  python3 bench/bench_train.py [--layers 16] [--width-div 4] [--tokens 1024]
                               [--steps 3] [--warmup-steps 1] [--threads N] [--top-k 6]
(`make bench-train`, BENCH_TRAIN_ARGS for these).
"""
import argparse, glob, json, os, shutil, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import olmoe_bench  # noqa: E402


def args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--width-div", type=int, default=4)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3, help="timed steps on each side")
    ap.add_argument("--warmup-steps", type=int, default=1, help="untimed steps before them (>= 1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--top-k", type=int, default=6, help="experts per layer trained")
    ap.add_argument("--esft", default="build/esft")
    ap.add_argument("--out", default="build/bench_models")
    ap.add_argument("--skip-fft", action="store_true", help="no full fine-tuning rows")
    ap.add_argument("--omp-wait-policy", choices=["passive", "active"],
                    help="OMP_WAIT_POLICY for both sides (default: the environment's); passive keeps "
                         "OpenMP threads from spinning at barriers: on a busy machine a spinning thread holds "
                         "the core its descheduled partner needs (docs/training.md)")
    ap.add_argument("--worker", choices=["esft", "fft"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    return ap.parse_args()


# ---- torch side (runs in a worker process) ----------------------------------

def grouped_mm():
    import torch
    return getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm


def sel_linear_class():
    import torch

    class SelGroupedLinear(torch.autograd.Function):
        """y = x W_e^T per group (rows offs[e-1]:offs[e] use expert e) over the frozen
        fused W (E, out, in); backward: dx for all rows, dW only for the experts in
        sel, returned as the gradient of w_sel (k, out, in) (w_sel's values are W[sel])."""

        @staticmethod
        def forward(ctx, x, w_full, w_sel, sel, offs):
            ctx.save_for_backward(x, offs)
            ctx.w_full, ctx.sel = w_full, sel
            return grouped_mm()(x, w_full.transpose(-2, -1), offs=offs)

        @staticmethod
        def backward(ctx, dy):
            x, offs = ctx.saved_tensors
            dy = dy.contiguous()
            dx = grouped_mm()(dy, ctx.w_full, offs=offs)
            o = [0] + offs.tolist()
            dw = torch.zeros((len(ctx.sel),) + tuple(ctx.w_full.shape[1:]), dtype=dy.dtype)
            for j, e in enumerate(ctx.sel):
                if o[e + 1] > o[e]:
                    torch.mm(dy[o[e]:o[e + 1]].t(), x[o[e]:o[e + 1]], out=dw[j])
            return dx, None, dw, None, None

    return SelGroupedLinear


def esft_experts(experts, sel):
    """Turns a transformers OlmoeExperts into one that trains only the experts in sel."""
    import torch
    lin = sel_linear_class()
    experts.sel = list(sel)
    experts.gate_up_proj.requires_grad_(False)
    experts.down_proj.requires_grad_(False)
    experts.gu_sel = torch.nn.Parameter(experts.gate_up_proj.data[experts.sel].clone())
    experts.down_sel = torch.nn.Parameter(experts.down_proj.data[experts.sel].clone())

    def forward(hidden, top_k_index, top_k_weights):
        K = top_k_index.size(-1)
        ids_g, perm = torch.sort(top_k_index.reshape(-1), stable=True)
        tok = perm // K
        x = hidden[tok]
        offs = torch.cumsum(torch.bincount(ids_g, minlength=experts.num_experts), 0, dtype=torch.int32)
        gate, up = lin.apply(x, experts.gate_up_proj, experts.gu_sel, experts.sel, offs).chunk(2, dim=-1)
        y = lin.apply(experts.act_fn(gate) * up, experts.down_proj, experts.down_sel, experts.sel, offs)
        y = y * top_k_weights.reshape(-1)[perm, None]
        return torch.zeros_like(hidden).index_add_(0, tok, y)

    experts.forward = forward

    def sync():  # the trained values into the fused tensors the forward reads
        experts.gate_up_proj.data[experts.sel] = experts.gu_sel.data
        experts.down_proj.data[experts.sel] = experts.down_sel.data
    return sync


def worker(a):
    import torch
    from transformers import OlmoeForCausalLM
    torch.set_num_threads(a.threads)
    d, cfg = olmoe_bench.checkpoint(a.out, a.width_div, a.layers)
    ids, _ = olmoe_bench.sample(d, cfg, a.tokens)
    m = OlmoeForCausalLM.from_pretrained(d, dtype=torch.float32)
    loaded = olmoe_bench.rss()
    impl = "attn %s, experts %s" % (m.config._attn_implementation,
                                    getattr(m.config, "_experts_implementation", None) or "default")
    syncs = []
    if a.worker == "esft":
        for p in m.parameters():
            p.requires_grad_(False)
        with open(a.config) as f:
            experts = json.load(f)["experts"]
        for l, layer in enumerate(m.model.layers):
            if experts.get(str(l)):
                syncs.append(esft_experts(layer.mlp.experts, sorted(experts[str(l)])))
        impl += " (ESFT: custom grouped expert GEMMs, dW of the selected experts only)"
    params = [p for p in m.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    times, losses = [], []
    for step in range(a.warmup_steps + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for s in syncs:
                s()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    print(json.dumps({"times": times, "losses": losses, "peak": olmoe_bench.peak_rss(), "params": n_params,
                      "impl": impl, "loaded": loaded}))


# ---- esft side ----------------------------------------------------------------

def run_esft(a, d, data, cfg_path, method, env):
    """esft train with a log; returns dict(times per step, losses, peak, summary) or
    dict(refused=message) when the build refuses the method (usage error)."""
    work = os.path.join(d, "bench_train_" + method)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    log = os.path.join(work, "log.jsonl")
    cmd = [a.esft, "train", d, "--data", data, "--method", method, "--steps", str(a.warmup_steps + a.steps),
           "--batch-tokens", str(a.tokens - 1), "--warmup", "0", "-o", os.path.join(work, "out.safetensors"),
           "--log", log]
    if method == "esft":
        cmd += ["--expert-config", cfg_path]
    timer = os.path.exists("/usr/bin/time")
    full = (["/usr/bin/time", "-f", "maxrss_kb %M"] if timer else []) + cmd
    p = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen, stamps, late = 0, [], []
    while p.poll() is None:
        # the log is written to LOG.tmp.<pid> and renamed at the end, after the
        # experts are written (with an fsync: tens of ms, against a 5 ms poll)
        tmp = glob.glob(log + ".tmp.*")
        renamed = not tmp and os.path.exists(log)
        if tmp or renamed:
            try:
                with open(tmp[0] if tmp else log) as f:
                    n = f.read().count("\n")
            except OSError:
                n = seen
            now = time.perf_counter()
            while seen < n:
                stamps.append(now)
                late.append(renamed)
                seen += 1
        time.sleep(0.005)
    out, err = p.communicate()
    if p.returncode and method != "esft":
        return {"refused": (err.strip().splitlines() or ["exit %d" % p.returncode])[0], "cmd": " ".join(cmd)}
    if p.returncode:
        sys.exit("esft train failed (exit %d): %s\n%s" % (p.returncode, " ".join(cmd), err))
    with open(log) as f:
        rows = [json.loads(line) for line in f]
    if len(stamps) != len(rows):
        sys.exit("esft train: saw %d of %d log lines appear" % (len(stamps), len(rows)))
    summary = [line for line in err.splitlines() if "steps (" in line]
    peak = 0
    for line in err.splitlines():
        if line.startswith("maxrss_kb "):
            peak = int(line.split()[1]) * 1024
    # a step's time is the gap between its log line and the previous one: the first
    # timed step starts when the last warm-up step's line appeared
    times = [stamps[i] - stamps[i - 1] for i in range(a.warmup_steps, len(stamps)) if i > 0]
    if any(late):
        print("note: esft's last log line was seen only after the run ended: the last timed step includes "
              "writing the experts")
    return {"times": times, "losses": [r["loss"] for r in rows], "peak": peak,
            "summary": summary[0] if summary else "", "cmd": " ".join(cmd)}


def expert_config(a, d, data, env):
    """esft stats + esft select --top-k: the experts the sample uses most."""
    summ, cfg = os.path.join(d, "bench_summary.json"), os.path.join(d, "bench_expert_config_top%d.json" % a.top_k)
    for cmd in ([a.esft, "stats", d, "--data", data, "-o", summ, "-q"],
                [a.esft, "select", summ, "--top-k", str(a.top_k), "-o", cfg, "-q"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode:
            sys.exit("%s failed: %s" % (" ".join(cmd), r.stderr))
    return cfg


def run_torch(a, which, cfg_path, env):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", which, "--layers", str(a.layers),
           "--width-div", str(a.width_div), "--tokens", str(a.tokens), "--steps", str(a.steps),
           "--warmup-steps", str(a.warmup_steps), "--threads", str(a.threads), "--out", a.out]
    if cfg_path:
        cmd += ["--config", cfg_path]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit("torch worker %s failed:\n%s" % (which, r.stderr[-3000:]))
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["times"] = res["times"][a.warmup_steps:]
    return res


def mean(x):
    return sum(x) / len(x)


def gb(n):
    return "%.2f GB" % (n / 1e9) if n else "?"


def main():
    a = args()
    if a.worker:
        return worker(a)
    if a.steps < 1 or a.warmup_steps < 1 or a.tokens < 2:
        sys.exit("need --steps >= 1, --warmup-steps >= 1 (a timed esft step starts at the log line of the one "
                 "before), --tokens >= 2")
    import torch, transformers
    d, cfg = olmoe_bench.checkpoint(a.out, a.width_div, a.layers)
    _, data = olmoe_bench.sample(d, cfg, a.tokens)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    if a.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = a.omp_wait_policy
    load0 = os.getloadavg()
    cfg_path = expert_config(a, d, data, env)
    with open(cfg_path) as f:
        n_sel = sum(len(v) for v in json.load(f)["experts"].values())
    print(olmoe_bench.shape_line(cfg, a.width_div, a.tokens, a.threads))
    print("checkpoint %s: %.1f MB bf16; transformers %s, torch %s" % (d, olmoe_bench.checkpoint_bytes(d) / 1e6,
                                                                     transformers.__version__, torch.__version__))
    print("expert config %s: %d experts (%d per layer of 64, esft select --top-k %d of this sample's routing)"
          % (cfg_path, n_sel, a.top_k, a.top_k))
    print("OMP_WAIT_POLICY %s; load average at the start %.1f %.1f %.1f (%d cores)"
          % (env.get("OMP_WAIT_POLICY", "unset (the runtimes' default)"), load0[0], load0[1], load0[2], os.cpu_count()))
    print("each side: %d warm-up step(s) untimed, then %d timed steps of one %d-token batch (%d scored)"
          % (a.warmup_steps, a.steps, a.tokens, a.tokens - 1), flush=True)

    rows = []  # (name, result)
    e = run_esft(a, d, data, cfg_path, "esft", env)
    print("esft train --method esft: %s" % e["summary"], flush=True)
    rows.append(("esft train --method esft", e))
    t = run_torch(a, "esft", cfg_path, env)
    print("torch ESFT: %s, %d trainable parameters, %s resident after loading" % (t["impl"], t["params"], gb(t["loaded"])),
          flush=True)
    rows.append(("transformers + torch, ESFT", t))
    if not a.skip_fft:
        ef = run_esft(a, d, data, cfg_path, "fft", env)
        if "refused" in ef:
            print("esft train --method fft: not supported by this build (%s)" % ef["refused"])
            print("  (tried: %s)" % ef["cmd"])
        else:
            rows.append(("esft train --method fft", ef))
        tf = run_torch(a, "fft", None, env)
        print("torch FFT: %s, %d trainable parameters, %s resident after loading" % (tf["impl"], tf["params"],
                                                                                    gb(tf["loaded"])), flush=True)
        rows.append(("transformers + torch, full fine-tuning", tf))

    load1 = os.getloadavg()
    print("load average at the end %.1f %.1f %.1f" % load1)
    print()
    print("| | s/step (timed steps) | steps/s | esft / torch ESFT | peak RSS |")
    print("|---|---|---|---|---|")
    base = 1.0 / mean(t["times"])
    for name, r in rows:
        sps = 1.0 / mean(r["times"])
        print("| %s | %.2f (%s) | %.3f | %.2fx | %s |" % (name, mean(r["times"]), " ".join("%.2f" % x for x in r["times"]),
                                                      sps, sps / base, gb(r["peak"])))
    print()
    print("loss of each step (the batch's mean before the update), esft against torch ESFT:")
    worst = 0.0
    for i, (le, lt) in enumerate(zip(e["losses"], t["losses"])):
        rel = abs(le - lt) / abs(lt)
        worst = max(worst, rel)
        print("  step %d: esft %.7f torch %.7f rel diff %.1e" % (i + 1, le, lt, rel))
    print("worst relative loss difference %.1e (%s 1e-4)" % (worst, "within" if worst <= 1e-4 else "ABOVE"))
    if not a.skip_fft and "losses" in tf:
        print("torch FFT first-step loss %.7f (same weights and batch: equals torch ESFT's %.7f)" % (tf["losses"][0], t["losses"][0]))
        if "losses" in ef:
            print("full fine-tuning, esft against torch: " + ", ".join(
                "step %d %.7f / %.7f (%.1e)" % (i + 1, le, lt, abs(le - lt) / abs(lt))
                for i, (le, lt) in enumerate(zip(ef["losses"], tf["losses"]))))


if __name__ == "__main__":
    main()
