"""Builds the PEFT LoRA parity fixtures in tests/fixtures/peft/, on the bases of tests/fixtures/hf.

Two steps in two environments, run from the repository root:

1. Our adapters (the project's Python 3.12 environment): `save_peft` writes adapters with
   random non-zero A and B (NumPy seeds, so the same files every run) to `ours_<case>/`:

       PYTHONPATH=. .venv/bin/python tools/make_peft_fixtures.py --ours

2. PEFT's side (the Python 3.11 torch environment: `make fixtures-env`):

       .venv311/bin/python tools/make_peft_fixtures.py

   (a) For each `peft_<case>`, PEFT attaches a LoRA to the transformers base model, fills A and
   B with random non-zero values, saves the adapter (`save_pretrained`) and records its logits.
   (b) For each `ours_<case>` folder of step 1, PEFT loads it (`PeftModel.from_pretrained`),
   records its logits, and saves the weights of `merge_and_unload()` as `merged.safetensors`.

Every folder gets `reference.npz`: the base fixture's input ids, left- and right-padding masks
and the adapter model's float32 logits for each. The cases cover Llama and Qwen2, tied and
untied embeddings, all seven targets and subsets, and rsLoRA on and off. Each adapter's
`base_model_name_or_path` is the base folder relative to the repository root (PEFT resolves it
against the current directory), so the fixtures hold no machine path.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HF_FIXTURES = os.path.join("tests", "fixtures", "hf")
# name -> (base fixture, r, lora_alpha, target_modules, use_rslora); "peft_": made by PEFT,
# "ours_": made by our save_peft and loaded by PEFT.
CASES = {
    "peft_llama_tied_all": ("llama_tied_gqa2", 4, 8, ALL, False),
    "peft_qwen2_untied_q_v_down_rs": (
        "qwen2_untied_mha",
        3,
        5,
        ["q_proj", "v_proj", "down_proj"],
        True,
    ),
    "ours_qwen2_tied_all_rs": ("qwen2_tied_gqa2", 4, 6, ALL, True),
    "ours_llama_untied_k_o_up": (
        "llama_untied_gqa4_rope3",
        2,
        16,
        ["k_proj", "o_proj", "up_proj"],
        False,
    ),
}
SCALE = 0.1  # std of the random A and B: the update is comparable to the base weights


def write_ours(out_dir: str) -> None:
    """Step 1: our deterministic adapters, written by `save_peft` (Python 3.12, JAX)."""
    import jax.numpy as jnp  # JAX needs Python >= 3.12: not importable in the torch env

    from ogpsa_jax.models import LoRAConfig, add_lora, load_hf, save_peft
    from ogpsa_jax.models.lora import lora_shapes

    for seed, (name, (base, r, alpha, modules, rslora)) in enumerate(CASES.items()):
        if not name.startswith("ours_"):
            continue
        base_dir = os.path.join(HF_FIXTURES, base)
        model = load_hf(base_dir, dtype=jnp.float32)
        lora = LoRAConfig(rank=r, alpha=alpha, targets=tuple(modules), use_rslora=rslora)
        rng = np.random.RandomState(100 + seed)
        weights = {
            t: tuple(SCALE * rng.standard_normal(s).astype(np.float32) for s in shapes)
            for t, shapes in lora_shapes(lora, model.config).items()
        }
        folder = os.path.join(out_dir, name)
        save_peft(add_lora(model, lora, weights=weights), folder, base_model_name_or_path=base_dir)
        cfg_file = os.path.join(folder, "adapter_config.json")
        with open(cfg_file) as f:
            cfg = json.load(f)
        cfg["base_model_name_or_path"] = base_dir  # repository-relative, not this machine's path
        with open(cfg_file, "w") as f:
            json.dump(cfg, f, indent=2)


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _reference(model, base: str) -> dict[str, np.ndarray]:
    """The base fixture's ids and masks, and the model's logits for them."""
    import torch  # only in the torch env

    ref = np.load(os.path.join(HF_FIXTURES, base, "reference.npz"))
    out = {k: ref[k] for k in ("input_ids", "mask_left", "mask_right")}
    with torch.no_grad():
        for kind in ("left", "right"):
            m = torch.from_numpy(ref[f"mask_{kind}"])
            logits = model(
                input_ids=torch.from_numpy(ref["input_ids"]),
                attention_mask=m,
                position_ids=_positions(m),
            ).logits
            out[f"logits_{kind}"] = logits.float().numpy()
    return out


def write_peft(out_dir: str) -> None:
    """Step 2: PEFT's adapters (a) and PEFT's view of ours (b) (Python 3.11, torch)."""
    import peft
    import torch
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.numpy import save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    for seed, (name, (base, r, alpha, modules, rslora)) in enumerate(CASES.items()):
        base_dir = os.path.join(HF_FIXTURES, base)
        folder = os.path.join(out_dir, name)
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        if name.startswith("peft_"):
            config = LoraConfig(
                r=r,
                lora_alpha=alpha,
                target_modules=modules,
                use_rslora=rslora,
                lora_dropout=0.0,
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, config).eval()
            torch.manual_seed(seed)
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if ".lora_A." in pname or ".lora_B." in pname:
                        p.copy_(SCALE * torch.randn_like(p))
            model.save_pretrained(folder)
            os.remove(os.path.join(folder, "README.md"))  # PEFT's blank model card
            np.savez_compressed(os.path.join(folder, "reference.npz"), **_reference(model, base))
        else:
            model = PeftModel.from_pretrained(model, folder).eval()
            np.savez_compressed(os.path.join(folder, "reference.npz"), **_reference(model, base))
            merged = model.merge_and_unload()
            tensors = {
                k: v.detach().numpy().copy()
                for k, v in merged.state_dict().items()
                if not (k == "lm_head.weight" and merged.config.tie_word_embeddings)
            }
            save_file(tensors, os.path.join(folder, "merged.safetensors"))
        with open(os.path.join(folder, "versions.json"), "w") as f:
            json.dump(versions, f)


def main() -> None:
    """Writes the fixtures of one step."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("tests", "fixtures", "peft"))
    parser.add_argument("--ours", action="store_true", help="step 1: our adapters (Python 3.12)")
    args = parser.parse_args()
    if args.ours:
        write_ours(args.out)
    else:
        write_peft(args.out)


if __name__ == "__main__":
    main()
