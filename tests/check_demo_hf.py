"""Loads a checkpoint directory the demo wrote with transformers and prints the
pooled mean loss (nats) over the samples of a JSONL file ({"input_ids": [...]},
labels = the ids), the number `esft eval DIR --data FILE` prints. Used by
tests/check_demo.sh; exits 3 when torch or transformers is missing."""
import json
import sys

try:
    import torch
    import transformers
except ImportError as e:  # the caller reports SKIP with this reason
    print(f"no torch/transformers: {e}")
    sys.exit(3)


def main():
    model_dir, data = sys.argv[1], sys.argv[2]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    total, count = 0.0, 0
    with open(data) as f, torch.no_grad():
        for line in f:
            if not line.strip():
                continue
            ids = torch.tensor([json.loads(line)["input_ids"]])
            n = ids.shape[1] - 1  # position t predicts t+1: the first byte is not scored
            out = model(input_ids=ids, labels=ids)
            total += float(out.loss) * n
            count += n
    print(f"loss {total / count:.8f} tokens {count}")


if __name__ == "__main__":
    main()
