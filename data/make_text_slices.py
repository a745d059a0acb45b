#!/usr/bin/env python3
"""make_text_slices.py SRC OUT - cuts the small text slices under data/text/ that
examples/demo.c (`make run`) trains and evaluates on, from the datasets the ESFT
authors ship (deepseek-ai/ESFT, datasets/{train,eval}/<task>.jsonl).

Run once by hand when the slices are (re)made; nothing in the build runs it.
Every output line is an input line, byte for byte (whole JSON records, never cut).

  intent, law:            train = the first records of train/<task>.jsonl up to
                          TRAIN_BYTES; eval = records of eval/<task>.jsonl
  summary, translation:   the authors ship no train file for these, so their
                          eval/<task>.jsonl is split: train = its first records up
                          to TRAIN_BYTES, eval = records taken from the end
The eval records are taken from the end of eval/<task>.jsonl, up to EVAL_BYTES,
skipping any record that shares text with the train slice (a few-shot example
"\\n\\n"-part of the prompt, or a train message), so no eval byte was trained on.
"""
import json
import os
import sys

TASKS = ["intent", "law", "summary", "translation"]
TRAIN_BYTES = 64 * 1024
EVAL_BYTES = 16 * 1024


def text_of(rec):
    """The text the demo reads from a record (examples/demo.c does the same)."""
    if "messages" in rec:
        return "".join(m["content"] for m in rec["messages"])
    return rec["prompt"] + " " + rec["answers"][0]


def parts_of(rec):
    """Pieces whose reuse between train and eval would leak eval text."""
    if "messages" in rec:
        return {m["content"].strip() for m in rec["messages"] if len(m["content"].strip()) > 20}
    return {p.strip() for p in rec["prompt"].split("\n\n") if len(p.strip()) > 20}


def take(lines, budget):
    out, size = [], 0
    for line in lines:
        n = len(text_of(json.loads(line)).encode("utf-8"))
        if out and size + n > budget:
            break
        out.append(line)
        size += n
    return out


def main():
    src, dst = sys.argv[1], sys.argv[2]
    os.makedirs(dst, exist_ok=True)
    for task in TASKS:
        with open(os.path.join(src, "eval", task + ".jsonl"), encoding="utf-8") as f:
            ev = f.read().splitlines()
        train_path = os.path.join(src, "train", task + ".jsonl")
        if os.path.exists(train_path):
            with open(train_path, encoding="utf-8") as f:
                tr_lines = take(f.read().splitlines(), TRAIN_BYTES)
            pool = ev
        else:
            tr_lines = take(ev, TRAIN_BYTES)
            pool = ev[len(tr_lines):]
        seen = set()
        for line in tr_lines:
            seen |= parts_of(json.loads(line))
        ev_lines, size = [], 0
        for line in reversed(pool):
            rec = json.loads(line)
            txt = text_of(rec)
            if parts_of(rec) & seen or any(s in txt for s in seen if len(s) > 40):
                continue
            n = len(txt.encode("utf-8"))
            if ev_lines and size + n > EVAL_BYTES:
                break
            ev_lines.append(line)
            size += n
        ev_lines.reverse()
        for kind, lines in (("train", tr_lines), ("eval", ev_lines)):
            with open(os.path.join(dst, "%s.%s.jsonl" % (task, kind)), "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            nbytes = sum(len(text_of(json.loads(l)).encode("utf-8")) for l in lines)
            print("%-12s %-5s %4d records %7d text bytes" % (task, kind, len(lines), nbytes))


if __name__ == "__main__":
    main()
