"""PyTorch peers of benchmarks/train_step.py (run in .venv311): TRL steps and gradient hooks.

Modes (one per process; prints one JSON line with per-step times and tokens/s):

* ``trl_sft``: TRL ``SFTTrainer`` on pre-tokenized rows (loss on the completion part).
* ``trl_dpo``: TRL ``DPOTrainer`` (sigmoid loss, beta 0.2, reference log-probs precomputed
  before training, as our DPO stage does by default).
* ``hooks_sft``: a minimal training loop in the reference code's style: a tensor hook on every
  parameter removes the gradient's component along k per-parameter orthonormal directions on
  each micro-batch's raw gradient, before accumulation; then clip (1.0) and AdamW.

All use float32, random weights from the given HF config dict, AdamW (0.9, 0.999, 1e-8, wd 0),
lr 1e-6 cosine, and ``torch.set_num_threads(threads)``. Rows are full length: a quarter prompt,
the rest completion. Step time is the interval between the ends of consecutive optimiser steps
(data loading and framework overhead included); the first ``warmup`` steps are excluded.

Command (normally launched by benchmarks/train_step.py)::

    .venv311/bin/python benchmarks/peers/torch_steps.py --mode trl_sft --hf-config '{...}' \
        --rows 4 --length 256 --accum 4 --steps 8 --warmup 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

PROMPT_FRAC = 0.25


def build_model(hf_config: dict, seed: int) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(**hf_config)
    return AutoModelForCausalLM.from_config(config).float()


def word_tokenizer(n_words: int) -> Any:
    """A whitespace word-level tokenizer mapping "w<i>" to id i (so row lengths are exact)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n_words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="w0", pad_token="w0", bos_token="w1", eos_token="w2"
    )


def random_rows(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


class StepTimer:
    """A TrainerCallback recording the wall time between ends of optimiser steps."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                timer.last = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                now = time.perf_counter()
                timer.times.append(now - timer.last)
                timer.last = now

        self.times: list[float] = []
        self.last = 0.0
        self.callback = _CB()


def common_args(a: argparse.Namespace, out_dir: str) -> dict:
    return dict(
        output_dir=out_dir,
        per_device_train_batch_size=a.rows,
        gradient_accumulation_steps=a.accum,
        max_steps=a.steps,
        learning_rate=1e-6,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        bf16=False,
        fp16=False,
        max_length=a.length,
        disable_tqdm=True,
        # Off: our step does not rematerialise (TRL 1.x SFTConfig turns it on by default).
        gradient_checkpointing=False,
    )


def run_trl_sft(a: argparse.Namespace, hf_config: dict) -> tuple[list[float], int]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    vocab = hf_config["vocab_size"]
    p = int(a.length * PROMPT_FRAC)
    n = a.rows * a.accum * a.steps
    rows = random_rows(n, a.length, vocab, seed=0)
    data = Dataset.from_dict(
        {"input_ids": rows, "completion_mask": [[0] * p + [1] * (a.length - p)] * n}
    )
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out_dir:
        args = SFTConfig(
            **common_args(a, out_dir),
            completion_only_loss=True,
            packing=False,
            shuffle_dataset=False,
        )
        trainer = SFTTrainer(
            model=build_model(hf_config, 0),
            args=args,
            train_dataset=data,
            processing_class=word_tokenizer(min(vocab, 1000)),
            callbacks=[timer.callback],
        )
        trainer.train()
    return timer.times, a.rows * a.length * a.accum


def run_trl_dpo(a: argparse.Namespace, hf_config: dict) -> tuple[list[float], int]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    words = min(hf_config["vocab_size"], 1000)
    p = int(a.length * PROMPT_FRAC)
    c = a.length - p
    n = a.rows * a.accum * a.steps

    def text(ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)

    prompts = random_rows(n, p, words, seed=1)
    chosen = random_rows(n, c - 1, words, seed=2)
    rejected = random_rows(n, c - 1, words, seed=3)
    data = Dataset.from_dict(
        {
            "prompt": [text(x) for x in prompts],
            # Ends with the EOS word, so TRL appends nothing: every row is exactly `length` long.
            "chosen": [" " + text(x) + " w2" for x in chosen],
            "rejected": [" " + text(x) + " w2" for x in rejected],
        }
    )
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out_dir:
        args = DPOConfig(
            **common_args(a, out_dir),
            beta=0.2,
            precompute_ref_log_probs=True,
        )
        trainer = DPOTrainer(
            model=build_model(hf_config, 0),
            args=args,
            train_dataset=data,
            processing_class=word_tokenizer(words),
            callbacks=[timer.callback],
        )
        trainer.train()
    return timer.times, 2 * a.rows * a.length * a.accum


def run_hooks_sft(a: argparse.Namespace, hf_config: dict) -> tuple[list[float], int]:
    import torch

    model = build_model(hf_config, 0)
    gen = torch.Generator().manual_seed(1)
    n_hooks = 0
    for param in model.parameters():
        if a.k <= 0:
            break
        # k orthonormal random directions per parameter (the timing does not depend on them).
        us: list[torch.Tensor] = []
        for _ in range(a.k):
            v = torch.randn(param.numel(), generator=gen)
            for u in us:
                v -= torch.dot(v, u) * u
            us.append(v / v.norm())

        def hook(g: torch.Tensor, us: list[torch.Tensor] = us) -> torch.Tensor:
            flat = g.reshape(-1)
            out = flat.clone()
            for u in us:
                out -= torch.dot(flat, u) * u
            return out.view_as(g)

        param.register_hook(hook)
        n_hooks += 1
    vocab = hf_config["vocab_size"]
    p = int(a.length * PROMPT_FRAC)
    ids = torch.tensor(random_rows(a.rows * a.accum, a.length, vocab, seed=0)).view(
        a.accum, a.rows, a.length
    )
    labels = ids.clone()
    labels[..., :p] = -100
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps))
    )
    times = []
    model.train()
    last = time.perf_counter()
    for _ in range(a.steps):
        for i in range(a.accum):
            loss = model(input_ids=ids[i], labels=labels[i]).loss
            (loss / a.accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times, a.rows * a.length * a.accum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", required=True, choices=("trl_sft", "trl_dpo", "hooks_sft"))
    parser.add_argument("--hf-config", required=True, help="HF config.json dict as JSON")
    parser.add_argument("--rows", type=int, default=4, help="rows (pairs for DPO) per micro")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--k", type=int, default=2, help="hooks: directions per parameter")
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args()
    if a.steps <= a.warmup:
        raise ValueError(f"--steps {a.steps} must exceed --warmup {a.warmup}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(a.threads)
    hf_config = json.loads(a.hf_config)
    run = {"trl_sft": run_trl_sft, "trl_dpo": run_trl_dpo, "hooks_sft": run_hooks_sft}[a.mode]
    times, tokens = run(a, hf_config)
    timed = times[a.warmup :]
    if not timed:
        raise RuntimeError(f"only {len(times)} step times recorded")
    timed_sorted = sorted(timed)
    median = (
        timed_sorted[len(timed) // 2]
        if len(timed) % 2
        else (0.5 * (timed_sorted[len(timed) // 2 - 1] + timed_sorted[len(timed) // 2]))
    )
    import transformers

    out = {
        "mode": a.mode,
        "step_s": times,
        "median_step_s": median,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / median,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if a.mode.startswith("trl"):
        import trl

        out["trl"] = trl.__version__
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
