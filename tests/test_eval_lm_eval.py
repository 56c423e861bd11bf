"""LMEvalAdapter against the real lm-evaluation-harness (``lm_eval``, installed by ``make
setup`` without its torch extras) on tasks defined here: a YAML file and a local JSONL each, no
hub. The tiny random decoder's answers are read first through the adapter, and the documents'
gold answers are set from them, so lm_eval's scores are known exactly: 0.5 on each task."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import jax.numpy as jnp
import pytest
from transformers import AutoTokenizer

from ogpsa_jax import data
from ogpsa_jax.eval import LMEvalAdapter
from ogpsa_jax.models import init_random, tiny_config

MC_YAML = """task: ogpsa_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
"""

GEN_YAML = """task: ogpsa_toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.mark.slow
def test_adapter_runs_real_lm_eval_local_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    import lm_eval  # installed by `make setup` (pip install --no-deps lm_eval + sacrebleu ...)
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
    model = init_random(tiny_config(vocab_size=len(tok)), seed=5, dtype=jnp.float32)
    lm = LMEvalAdapter(model, tok, batch_size=4, max_length=128)
    assert isinstance(lm, LM)  # the real base class, not the stand-in

    # multiple choice: gold = the adapter's own best choice on doc 0, its worst on doc 1
    questions = ["What colour is the sky?", "How many legs has a cat?"]
    choices = [["blue", "green", "red"], ["four", "two", "six"]]
    docs = []
    for q, cs, pick in zip(questions, choices, (max, min), strict=True):
        reqs = [SimpleNamespace(args=(f"Question: {q}\nAnswer:", f" {c}")) for c in cs]
        scores = [lp for lp, _ in lm.loglikelihood(reqs)]
        docs.append({"question": q, "choices": cs, "gold": scores.index(pick(scores))})
    # generation: target = the adapter's own answer on doc 0, something else on doc 1
    prompts = ["Say hi.", "Count to three."]
    outs = lm.generate_until(
        [SimpleNamespace(args=(p, {"until": ["\n\n"], "max_gen_toks": 5})) for p in prompts]
    )
    gen_docs = [
        {"question": prompts[0], "answer": outs[0]},
        {"question": prompts[1], "answer": outs[1] + " (not what it says)"},
    ]
    for name, rows, yaml in (("mc", docs, MC_YAML), ("gen", gen_docs, GEN_YAML)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / f"{name}.yaml").write_text(yaml.format(path=path))

    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=["ogpsa_toy_mc", "ogpsa_toy_gen"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        bootstrap_iters=0,
    )
    assert res["results"]["ogpsa_toy_mc"]["acc,none"] == pytest.approx(0.5)
    assert res["results"]["ogpsa_toy_gen"]["exact_match,none"] == pytest.approx(0.5)
    assert "torch" not in sys.modules  # lm_eval ran without torch
