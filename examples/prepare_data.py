#!/usr/bin/env python3
"""prepare_data.py - ESFT task files -> the esft JSONL of token ids and labels.

Reads ESFT's task files (datasets/{train,eval}/<task>.jsonl of deepseek-ai/ESFT, and
the slices in data/text/) and writes one sample per line:

    {"input_ids": [...], "labels": [...]}

labels follow the Hugging Face convention: labels[t] is input_ids[t] where the token is
scored and -100 where it is not; the model shifts internally (position t predicts
labels[t+1]), so labels[0] is never scored. The prompt is masked the way ESFT's
training masks it (utils.py get_formatted_input_and_target in deepseek-ai/ESFT):

    BOS                                   label = BOS (as ESFT; never scored)
    "User: {prompt.strip()}\\n\\nAssistant:"   -100
    " {answer.strip()}" EOS               scored

Three ways to get ids (docs/data.md says more):
  --tokenizer DIR        a local Hugging Face model directory (tokenizer.json,
                         tokenizer_config.json). --format auto (default) uses the
                         tokenizer's chat template when it has one and ESFT's own
                         formatting above when it has none (said on stderr);
                         --format esft forces ESFT's formatting (what ESFT itself ran,
                         with any tokenizer), --format chat requires the template.
  --byte-level           no tokenizer: ids are the UTF-8 bytes (0..255) of ESFT's
                         formatting, same masking, no BOS/EOS (no byte is free for
                         them). For byte-level demo models such as examples/demo.c.

Input records, detected per line: train format {"messages": [{"role", "content"}...]}
(user turns masked, assistant turns scored unless "mask": 1, as in ESFT), or eval format
{"prompt": "User: ...\\n\\nAssistant:", "answers": [...]} (the prompt is already ESFT's
formatted question; answers[0] is the response).

Exit status: 0 written, 1 bad input or runtime error, 2 usage. Nothing is written on
failure (the output goes to a temp file that is renamed at the end).
"""

import argparse
import json
import os
import random
import sys

PROG = "prepare_data.py"
IGNORE = -100

# ESFT's prompt format, utils.py of deepseek-ai/ESFT.
PROMPT_USER = "User: {input}\n\n"
PROMPT_ASSISTANT = "Assistant:"  # no space at the end; the response starts with one
ASSISTANT_RESPONSE = " {input}"


class InputError(Exception):
    """A problem with an input file, reported as FILE:LINE: message."""


def esft_question(content):
    return PROMPT_USER.format(input=str(content).strip()) + PROMPT_ASSISTANT


def esft_answer(content):
    return ASSISTANT_RESPONSE.format(input=str(content).strip())


def split_eval_prompt(prompt):
    """The user content of an eval prompt "User: X\\n\\nAssistant:" (None if not that shape)."""
    head, tail = "User: ", "\n\nAssistant:"
    if prompt.startswith(head) and prompt.endswith(tail) and len(prompt) >= len(head) + len(tail):
        return prompt[len(head):len(prompt) - len(tail)]
    return None


def record_to_messages(rec):
    """Returns (messages, preformatted_prompt or None). Raises ValueError on bad shape."""
    if not isinstance(rec, dict):
        raise ValueError("a record must be a JSON object")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError('"messages" must be a non-empty list')
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise ValueError(f'messages[{i}] needs "role" (string) and "content"')
            if not isinstance(m["content"], str):
                raise ValueError(f'messages[{i}].content must be a string')
        return msgs, None
    if "prompt" in rec:
        prompt, answers = rec["prompt"], rec.get("answers")
        if not isinstance(prompt, str):
            raise ValueError('"prompt" must be a string')
        if not isinstance(answers, list) or not answers or not isinstance(answers[0], str):
            raise ValueError('an eval record needs "answers": a non-empty list of strings')
        user = split_eval_prompt(prompt)
        msgs = [{"role": "user", "content": user if user is not None else prompt},
                {"role": "assistant", "content": answers[0]}]
        return msgs, prompt
    raise ValueError('unknown record: expected "messages" (train format) or "prompt"+"answers" (eval format)')


# ---- encoders: each turns one record into (input_ids, labels) ----

class ByteEncoder:
    name = "byte-level"

    def encode(self, msgs, preformatted):
        ids, labels = [], []
        for i, m in enumerate(msgs):
            if m["role"] == "user":
                text = preformatted if (preformatted is not None and i == 0) else esft_question(m["content"])
                b = list(text.encode("utf-8"))
                ids += b
                labels += [IGNORE] * len(b)
            elif m["role"] == "assistant":
                b = list(esft_answer(m["content"]).encode("utf-8"))
                ids += b
                labels += [IGNORE] * len(b) if m.get("mask", 0) == 1 else b
            else:
                raise ValueError(f'messages[{i}]: unknown role "{m["role"]}" (ESFT knows user and assistant)')
        return ids, labels


class EsftEncoder:
    """ESFT's get_formatted_input_and_target, token for token."""
    name = "esft"

    def __init__(self, tok):
        self.tok = tok
        if tok.bos_token_id is None or tok.eos_token_id is None:
            raise InputError("the tokenizer has no BOS or EOS token, which ESFT's format needs "
                             "(try --byte-level, or a tokenizer with a chat template)")

    def encode(self, msgs, preformatted):
        tok = self.tok
        ids, labels = [tok.bos_token_id], [tok.bos_token_id]  # ESFT labels the BOS with itself
        for i, m in enumerate(msgs):
            if m["role"] == "user":
                text = preformatted if (preformatted is not None and i == 0) else esft_question(m["content"])
                t = tok.encode(text, add_special_tokens=False)
                ids += t
                labels += [IGNORE] * len(t)
            elif m["role"] == "assistant":
                t = tok.encode(esft_answer(m["content"]), add_special_tokens=False) + [tok.eos_token_id]
                ids += t
                labels += [IGNORE] * len(t) if m.get("mask", 0) == 1 else t
            else:
                raise ValueError(f'messages[{i}]: unknown role "{m["role"]}" (ESFT knows user and assistant)')
        return ids, labels


class ChatEncoder:
    """The tokenizer's chat template, masked as ESFT masks: everything the template writes
    for non-assistant turns and the assistant header (its generation prompt) is -100; the
    assistant content and what the template appends after it (EOS, separators) is scored.
    Contents are stripped, and each piece is tokenized on its own, as ESFT does."""
    name = "chat-template"

    def __init__(self, tok):
        self.tok = tok

    def render(self, msgs, gen):
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def encode(self, msgs, preformatted):
        # ESFT strips every content (get_formatted_question/answer); so do we.
        msgs = [dict(m, content=m["content"].strip()) for m in msgs]
        pieces = []  # (text, scored)
        done = ""
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                head = self.render(msgs[:i], True) if i else ""
                if not head.startswith(done):
                    raise ValueError("the chat template's output is not prefix-stable (use --format esft)")
                pieces.append((head[len(done):], False))
                done = head
            full = self.render(msgs[:i + 1], False)
            if not full.startswith(done):
                raise ValueError("the chat template's output is not prefix-stable (use --format esft)")
            scored = m["role"] == "assistant" and m.get("mask", 0) != 1
            pieces.append((full[len(done):], scored))
            done = full
        ids, labels = [], []
        for text, scored in pieces:
            if not text:
                continue
            t = self.tok.encode(text, add_special_tokens=False)
            ids += t
            labels += t if scored else [IGNORE] * len(t)
        return ids, labels


def load_tokenizer(path):
    if not os.path.isdir(path):
        raise InputError(f"{path}: no such directory (--tokenizer wants a local model directory)")
    if not any(os.path.exists(os.path.join(path, f))
               for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise InputError(f"{path}: no tokenizer.json or tokenizer_config.json in it")
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise InputError(f"--tokenizer needs the transformers package ({e}); "
                         "pip install transformers tokenizers, or use --byte-level")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many kinds
        raise InputError(f"{path}: cannot load the tokenizer: {e}")


def truncate(ids, labels, n, how):
    """Cuts a sample to n tokens; None when it is to be dropped."""
    if n <= 0 or len(ids) <= n:
        return ids, labels
    if how == "drop":
        return None
    if how == "left":  # keep the end, as ESFT's packing does (utils.py get_examples_from_buffer_pad)
        ids, labels = ids[-n:], labels[-n:]
    else:
        ids, labels = ids[:n], labels[:n]
    return ids, labels


def read_records(path):
    """(path, line number, record) for every non-blank line."""
    try:
        f = open(path, "r", encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}")
    out = []
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{lineno}: not valid JSON: {e.msg} (column {e.colno})")
                out.append((path, lineno, rec))
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a line)")
    return out


def open_temp(out):
    """A fresh "<out>.tmp.<pid>.<n>", created exclusively (the esft command's convention)."""
    for k in range(1000):
        tmp = f"{out}.tmp.{os.getpid()}.{k}"
        try:
            return tmp, open(tmp, "x", encoding="utf-8")
        except FileExistsError:
            continue
    raise InputError(f"{out}: cannot create a temp file next to it")


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert ESFT task files (train {\"messages\"} or eval {\"prompt\",\"answers\"} "
                    "JSONL) into esft's JSONL {\"input_ids\", \"labels\"}, masking the prompt with "
                    "-100 as ESFT's training does. See docs/data.md.",
        epilog="examples:\n"
               "  %(prog)s --byte-level data/text/intent.train.jsonl -o intent.bytes.jsonl\n"
               "  %(prog)s --tokenizer ~/models/ESFT-vanilla-lite --format esft \\\n"
               "      --max-tokens 8192 --shuffle 5934875 datasets/train/law.jsonl -o law.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT.jsonl", help="ESFT task files, read in order")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokenizer", metavar="DIR", help="local Hugging Face model/tokenizer directory")
    src.add_argument("--byte-level", action="store_true",
                     help="no tokenizer: ids are UTF-8 bytes 0..255 of ESFT's formatting, no BOS/EOS")
    p.add_argument("--format", choices=("auto", "esft", "chat"), default="auto",
                   help="with --tokenizer: chat template if the tokenizer has one (auto, the default), "
                        "ESFT's own 'User: ...\\n\\nAssistant:' formatting (esft), or the template only (chat)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.jsonl", help="output file (written atomically)")
    p.add_argument("--max-length", type=int, default=4096, metavar="N",
                   help="longest sample in tokens, 0 = no limit (default 4096, ESFT's seq_length)")
    p.add_argument("--truncate", choices=("left", "right", "drop"), default="left",
                   help="what to do with a longer sample: keep its last N tokens (left, the default, as "
                        "ESFT's packing does), its first N (right), or drop it")
    p.add_argument("--max-samples", type=int, default=0, metavar="N", help="stop after N samples (0 = all)")
    p.add_argument("--max-tokens", type=int, default=0, metavar="N",
                   help="stop once N tokens are written, the sample that crosses N included "
                        "(ESFT's --n_sample_tokens; 0 = no limit)")
    p.add_argument("--shuffle", type=int, metavar="SEED",
                   help="shuffle the records first: random.seed(SEED); random.shuffle(records)")
    a = p.parse_args(argv)
    for name in ("max_length", "max_samples", "max_tokens"):
        if getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if a.byte_level and a.format != "auto":
        p.error("--format is for --tokenizer; --byte-level always uses ESFT's formatting")
    return a


def main(argv):
    a = parse_args(argv)
    out = a.output
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise InputError(f"{out}: directory {out_dir} does not exist")

    records = []
    for path in a.inputs:
        records += read_records(path)
    if not records:
        raise InputError("no records in " + ", ".join(a.inputs))
    if a.shuffle is not None:
        random.seed(a.shuffle)
        random.shuffle(records)

    if a.byte_level:
        enc = ByteEncoder()
        how = "byte-level (UTF-8 bytes, ESFT formatting, no BOS/EOS)"
    else:
        tok = load_tokenizer(a.tokenizer)
        has_template = bool(getattr(tok, "chat_template", None))
        if a.format == "chat" and not has_template:
            raise InputError(f"{a.tokenizer}: the tokenizer has no chat_template (--format chat)")
        if a.format == "chat" or (a.format == "auto" and has_template):
            enc = ChatEncoder(tok)
            how = f"chat template of {a.tokenizer}"
        else:
            enc = EsftEncoder(tok)
            how = f"ESFT formatting, tokenizer {a.tokenizer}"
            if a.format == "auto":
                print(f"{PROG}: {a.tokenizer} has no chat template: using ESFT's own formatting "
                      "(BOS 'User: ...\\n\\nAssistant:' ' answer' EOS)", file=sys.stderr)

    tmp, f = open_temp(out)
    n = tokens = scored = cut = dropped = unscored = 0
    try:
        with f:
            for path, lineno, rec in records:
                if a.max_samples and n >= a.max_samples:
                    break
                if a.max_tokens and tokens >= a.max_tokens:
                    break
                try:
                    msgs, pre = record_to_messages(rec)
                    ids, labels = enc.encode(msgs, pre)
                except ValueError as e:
                    raise InputError(f"{path}:{lineno}: {e}")
                if not ids:
                    raise InputError(f"{path}:{lineno}: the sample has no tokens")
                full = len(ids)
                r = truncate(ids, labels, a.max_length, a.truncate)
                if r is None:
                    dropped += 1
                    continue
                ids, labels = r
                cut += len(ids) < full
                s = sum(1 for x in labels[1:] if x != IGNORE)  # labels[0] is never scored
                unscored += s == 0
                f.write(json.dumps({"input_ids": ids, "labels": labels}, separators=(",", ":")))
                f.write("\n")
                n += 1
                tokens += len(ids)
                scored += s
            f.flush()
            os.fsync(f.fileno())
        if n == 0:
            raise InputError("no sample written (all dropped by --max-length?)")
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    extra = ""
    if cut:
        extra += f", {cut} truncated to {a.max_length} ({a.truncate})"
    if dropped:
        extra += f", {dropped} dropped (longer than {a.max_length})"
    if unscored:
        extra += f", {unscored} with no scored token"
    print(f"{PROG}: {n} samples, {tokens} tokens, {scored} scored tokens{extra}; "
          f"{how}; wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        print(f"{PROG}: error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
