"""Builds tiny random transformers Llama / Qwen2 models and their reference outputs.

Run in the Python 3.11 fixture environment (torch CPU wheel + transformers):

    make fixtures-env && .venv311/bin/python tools/make_hf_fixtures.py

For each config it writes tests/fixtures/hf/<name>/ with the `save_pretrained` checkpoint
(float32 safetensors + config.json) and `reference.npz`: input ids, left- and right-padding
attention masks with the logits transformers computes for them, and greedy generations from
left-padded prompts. All weights (biases and norms included) are redrawn so none is trivial.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

VOCAB = 97
EOS, PAD = 3, 0
CONFIGS = {
    # tied embeddings, GQA ratio 2, head_dim != hidden / heads
    "llama_tied_gqa2": LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=83,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=14,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=128,
    ),
    # untied, GQA ratio 4, Llama-3 rope scaling
    "llama_untied_gqa4_rope3": LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=101,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=10,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        max_position_embeddings=128,
    ),
    # Qwen2 biases, untied, no GQA (ratio 1)
    "qwen2_untied_mha": Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=40,
        intermediate_size=71,
        num_hidden_layers=2,
        num_attention_heads=5,
        num_key_value_heads=5,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        max_position_embeddings=128,
    ),
    # Qwen2 biases, tied, GQA ratio 2, head_dim != hidden / heads
    "qwen2_tied_gqa2": Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=67,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=12,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        max_position_embeddings=128,
    ),
}


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def build(name: str, config, out_dir: str, seed: int) -> None:
    """Creates, saves and runs one tiny model."""
    torch.manual_seed(seed)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, EOS, PAD
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.to(torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    folder = os.path.join(out_dir, name)
    model.save_pretrained(folder, safe_serialization=True)

    rng = np.random.RandomState(seed)
    b, n = 3, 11
    lengths = [11, 7, 4]
    ids = rng.randint(4, VOCAB, size=(b, n)).astype(np.int64)
    right = np.zeros((b, n), np.int64)
    left = np.zeros((b, n), np.int64)
    for i, k in enumerate(lengths):
        right[i, :k] = 1
        left[i, n - k :] = 1
    out = {"input_ids": ids, "mask_right": right, "mask_left": left}
    with torch.no_grad():
        for kind, mask in (("right", right), ("left", left)):
            m = torch.from_numpy(mask)
            logits = model(
                input_ids=torch.from_numpy(ids), attention_mask=m, position_ids=_positions(m)
            ).logits
            out[f"logits_{kind}"] = logits.float().numpy()
        prompt_ids = torch.from_numpy(np.where(left == 1, ids, PAD))
        gen = model.generate(
            input_ids=prompt_ids,
            attention_mask=torch.from_numpy(left),
            max_new_tokens=7,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )[:, n:]
    new = np.full((b, 7), PAD, np.int64)
    new[:, : gen.shape[1]] = gen.numpy()
    out.update(gen_input_ids=prompt_ids.numpy(), gen_tokens=new)
    out["gen_meta"] = np.array([EOS, PAD, 7], np.int64)
    np.savez_compressed(os.path.join(folder, "reference.npz"), **out)
    with open(os.path.join(folder, "versions.json"), "w") as f:
        import transformers

        json.dump({"torch": torch.__version__, "transformers": transformers.__version__}, f)


def main() -> None:
    """Writes all fixtures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("tests", "fixtures", "hf"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for seed, (name, config) in enumerate(CONFIGS.items()):
        build(name, config, args.out, seed)


if __name__ == "__main__":
    main()
