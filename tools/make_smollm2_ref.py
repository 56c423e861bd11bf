"""Reference logits of SmolLM2-135M-Instruct from transformers' PyTorch LlamaForCausalLM.

Runs in the Python 3.11 fixture environment (torch CPU wheel + transformers), on the folder that
`ogpsa_jax.models.gguf.smollm2_path()` writes, and stores a small JSON fixture that
tests/test_gguf.py compares our JAX decoder against. It also checks that transformers, given our
converted folder, answers the France prompt with Paris (the independent proof of the conversion).

    .venv/bin/python -m ogpsa_jax.models.gguf --smollm2          # prints the folder
    .venv311/bin/python tools/make_smollm2_ref.py FOLDER tests/fixtures/smollm2_ref_logits.json
"""

import argparse
import json
import logging

import torch
import transformers

PROMPT = "What is the capital of France?"
NEW_TOKENS = 24


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out_json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    model = transformers.LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    messages = [{"role": "user", "content": PROMPT}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids).logits[0, -1].float()
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    new_ids = out[0, len(ids) :].tolist()
    answer = tok.decode(new_ids, skip_special_tokens=True)
    top = torch.topk(logits, 5)
    fixture = {
        "source": "transformers LlamaForCausalLM float32 on the smollm2_path() folder",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "prompt": PROMPT,
        "prompt_ids": ids,
        "last_logits_first16": [round(float(x), 6) for x in logits[:16]],
        "top5_ids": top.indices.tolist(),
        "top5_logits": [round(float(x), 6) for x in top.values],
        "greedy_new_ids": new_ids,
        "greedy_text": answer,
    }
    lines = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in fixture.items())
    with open(args.out_json, "w", encoding="utf-8") as f:
        f.write("{\n" + lines + "\n}\n")
    logging.info("greedy answer: %r", answer)
    if "Paris" not in answer:
        raise SystemExit(f"transformers did not answer Paris: {answer!r}")


if __name__ == "__main__":
    main()
