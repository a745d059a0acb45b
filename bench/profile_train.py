#!/usr/bin/env python3
"""Where the time of `esft train` goes: a copy of esft.h with CPU-time timers.

Writes BUILD/prof/esft.h (esft.h with a timer around each phase of
esft_model_forward_backward, found by exact source lines: if one has moved,
this script says which and stops), builds BUILD/prof/esft from
examples/esft_cli.c against it, runs one `esft train` (the bench_train.py
checkpoint and expert config, made first by `make bench-train` or bench_train.py
with the same --layers / --width-div / --top-k) and prints the seconds per phase.
The timers read the process's CPU time (CLOCK_PROCESS_CPUTIME_ID): run it with
1 thread (the default), where that is the work itself, unaffected by other
processes on a shared machine and with no OpenMP barrier waits mixed in (with
more threads it sums every thread's time, spinning included).
  python3 bench/profile_train.py [--layers 16] [--width-div 4] [--top-k 6] [--steps 1] [--threads 1]
"""
import argparse, os, re, subprocess, sys

# (name, exact source text, what the timer covers). Nested timers are fine: the
# report lists each as a part of the step.
PHASES = [
    ("fwd1", "    for (l = 0; s == ESFT_OK && l < c->n_layers; l++) s = esft__trn_layer_forward(&b, v, l, T, err);\n",
     "first forward pass: every layer, keeping only the residual stream"),
    ("head", "    if (s == ESFT_OK) s = esft__trn_head(&b, v, labels, T, grad_scale, &loss, &count, err);\n",
     "head: final norm, logits (64 rows at a time), loss, dlogits, dh = dlogits W_lm"),
    ("recompute", "    esft_status s = esft__trn_layer_forward(b, m, l, T, err);\n",
     "recompute forward of the layer inside the backward"),
    ("moe_bwd", "    if (c->is_moe[l]) esft__trn_moe_backward(b, c, w, tr, l, T, b->dx);\n",
     "MoE backward (routed experts dx + dW of trained ones, routing weights, router)"),
    ("attn_bwd", "    else esft__trn_gqa_backward(b, c, w, T, b->dx);\n",
     "attention backward (o/q/k/v projections' dx, scores recomputed, RoPE, q/k norms)"),
    ("attn_fwd", "    else esft__trn_gqa_forward(b, c, w, T);\n",
     "  attention forward (both passes)"),
    ("route", "        if ((s = esft__moe_route(f, c, w, l, T, err)) != ESFT_OK) return s;\n        esft__trn_moe_forward",
     "  router + grouping (both passes)"),
    ("moe_fwd", "        esft__trn_moe_forward(b, c, w, l, T);\n",
     "  MoE experts forward + combine (both passes)"),
    ("dW", "    esft__linear_grads(tr, down, dy, D, act, F, n, panel);\n",
     "  dW_down of the trained experts (SwiGLU backward)"),
    ("dW2", "    esft__linear_grads(tr, gate, dg, F, in, D, n, panel);\n    esft__linear_grads(tr, up, du, F, in, D, n, panel);\n",
     "  dW_gate, dW_up of the trained experts (SwiGLU backward)"),
]

PRELUDE = r'''
#include <stdio.h>
#include <time.h>
static double esft__prof_t[%(n)d];
static double esft__prof_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
static void esft__prof_dump(void) __attribute__((destructor));
static void esft__prof_dump(void)
{
    static const char *names[] = {%(names)s};
    int i;
    for (i = 0; i < %(n)d; i++) fprintf(stderr, "esft_prof %%s %%.6f\n", names[i], esft__prof_t[i]);
}
'''


def patch(src):
    head = "#ifdef ESFT_IMPLEMENTATION\n"
    if src.count(head) != 1:
        sys.exit("profile_train: esft.h has %d '#ifdef ESFT_IMPLEMENTATION' lines, expected 1" % src.count(head))
    for i, (name, text, _) in enumerate(PHASES):
        if src.count(text) != 1:
            sys.exit("profile_train: the source of phase '%s' is found %d times in esft.h (expected once):\n%s"
                     % (name, src.count(text), text))
        body = text
        tail = ""
        if name == "route":  # time only the first statement of the two
            body, tail = text.split("\n", 1)[0] + "\n", text.split("\n", 1)[1]
        ind = re.match(r"( *)", body).group(1)
        if name in ("fwd1", "head", "moe_bwd", "attn_bwd", "attn_fwd", "moe_fwd", "dW", "dW2", "route"):
            if body.lstrip().startswith("else "):
                stmt = body.lstrip()[5:]
                new = "%selse { double t0_ = esft__prof_now(); %s %sesft__prof_t[%d] += esft__prof_now() - t0_; }\n" % (
                    ind, stmt.rstrip("\n"), "", i)
            elif body.lstrip().startswith("if (c->is_moe"):
                cond, stmt = body.lstrip().split(") ", 1)
                new = "%s%s) { double t0_ = esft__prof_now(); %s esft__prof_t[%d] += esft__prof_now() - t0_; }\n" % (
                    ind, cond, stmt.rstrip("\n"), i)
            elif body.lstrip().startswith("if ((s = esft__moe_route"):
                new = "%s{ double t0_ = esft__prof_now(); esft_status rs_ = esft__moe_route(f, c, w, l, T, err); " \
                      "esft__prof_t[%d] += esft__prof_now() - t0_; if ((s = rs_) != ESFT_OK) return s; }\n" % (ind, i)
            else:
                new = "%s{ double t0_ = esft__prof_now();\n%s%s esft__prof_t[%d] += esft__prof_now() - t0_; }\n" % (
                    ind, body.rstrip("\n"), "", i)
        else:  # recompute: a declaration with an initializer
            new = "%sdouble t0_ = esft__prof_now();\n%sesft_status s = esft__trn_layer_forward(b, m, l, T, err);\n" \
                  "%sesft__prof_t[%d] += esft__prof_now() - t0_;\n" % (ind, ind, ind, i)
        src = src.replace(text, new + tail)
    names = ", ".join('"%s"' % p[0] for p in PHASES)
    return src.replace(head, head + PRELUDE % {"n": len(PHASES), "names": names}, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width-div", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--build", default="build")
    ap.add_argument("--cc", default=os.environ.get("CC", "cc"))
    ap.add_argument("--header", default="esft.h", help="the esft.h to time (e.g. an older one, for before/after)")
    a = ap.parse_args()
    d = os.path.join(a.build, "bench_models", "olmoe_div%d_L%d" % (a.width_div, a.layers))
    cfg = os.path.join(d, "bench_expert_config_top%d.json" % a.top_k)
    data = os.path.join(d, "bench.jsonl")
    if not (os.path.exists(cfg) and os.path.exists(data)):
        sys.exit("profile_train: no %s or %s: run bench/bench_train.py with the same shape first" % (cfg, data))
    prof = os.path.join(a.build, "prof")
    os.makedirs(prof, exist_ok=True)
    with open(a.header) as f:
        src = patch(f.read())
    with open(os.path.join(prof, "esft.h"), "w") as f:
        f.write(src)
    exe = os.path.join(prof, "esft")
    subprocess.run([a.cc, "-O2", "-march=native", "-fopenmp", "-std=c99", "-I" + prof, "-I.", "examples/esft_cli.c",
                    "-o", exe, "-lm"], check=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    r = subprocess.run([exe, "train", d, "--data", data, "--method", "esft", "--expert-config", cfg, "--steps",
                        str(a.steps), "--batch-tokens", str(a.tokens - 1), "--warmup", "0", "-o",
                        os.path.join(prof, "out.safetensors"), "--log", os.path.join(prof, "log.jsonl")],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit("esft train failed: " + r.stderr)
    t = {}
    for line in r.stderr.splitlines():
        if line.startswith("esft_prof "):
            _, k, v = line.split()
            t[k] = float(v)
        elif "steps (" in line:
            print(line)
    total = t["fwd1"] + t["head"] + t["recompute"] + t["moe_bwd"] + t["attn_bwd"]
    print("%d step(s) of %d tokens, %d thread(s), %s; seconds per step:" % (a.steps, a.tokens, a.threads, d))
    print("| phase | s | share of the training pass |")
    print("|---|---|---|")
    for name, _, what in PHASES:
        print("| %s | %.2f | %.0f %% |" % (what, t[name] / a.steps, 100 * t[name] / total))
    print("| rest (norm backwards, residual adds, embedding) | not timed | |")
    print("| timed total | %.2f | 100 %% |" % (total / a.steps))


if __name__ == "__main__":
    main()
