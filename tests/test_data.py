"""Tests for ogpsa_jax.data: chat masks, truncation, batching, sources, errors, shipped assets."""

import importlib.util
import json
import logging
import pathlib

import numpy as np
import pytest
from transformers import AutoTokenizer

from ogpsa_jax import data
from ogpsa_jax.data import Encoded, EncodedPair, PreferencePair, SFTExample

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 7 + 6?"},
    {"role": "assistant", "content": " 7 + 6 = 13.\nAnything else? "},
    {"role": "user", "content": "Capital of Peru, café?"},
    {"role": "assistant", "content": "Lima. ☕"},
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):
    base = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
    base.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"],
        }
    )
    base.chat_template = LLAMA3_TEMPLATE
    path = tmp_path_factory.mktemp("llama3_tok")
    base.save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def _runs(mask):
    """Contiguous True runs of a 1-D mask as (start, stop) pairs."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def _decode(tokenizer, ids):
    return tokenizer.decode(
        list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
    )


# ----------------------------------------------------------------------------- chat rendering


@pytest.mark.parametrize(
    "which,end,strip", [("chatml", "<|im_end|>", False), ("llama3", "<|eot_id|>", True)]
)
def test_assistant_mask_is_exact_multiturn(tok, llama_tok, which, end, strip):
    tokenizer = tok if which == "chatml" else llama_tok
    ids, mask = data.render_chat(tokenizer, CONVERSATION)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
    # The ids are exactly the template's own tokenisation.
    expected = tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    np.testing.assert_array_equal(ids, expected)
    runs = _runs(mask)
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert len(runs) == len(replies)
    for (start, stop), reply in zip(runs, replies, strict=True):
        # Masked tokens decode to the reply (trimmed by the Llama-3 template) plus end of turn,
        # nothing of the role header before it nor the newline after it.
        assert _decode(tokenizer, ids[start:stop]) == (reply.strip() if strip else reply) + end
    # Nothing outside the runs decodes to reply text (the user turn stays unmasked).
    assert "Capital of Peru" in _decode(tokenizer, ids[~mask])


def test_train_turns_last_and_generation_prompt(tok):
    ids_all, mask_all = data.render_chat(tok, CONVERSATION)
    ids_last, mask_last = data.render_chat(tok, CONVERSATION, train_turns="last")
    np.testing.assert_array_equal(ids_all, ids_last)
    ((start, stop),) = _runs(mask_last)
    assert _decode(tok, ids_last[start:stop]) == "Lima. ☕<|im_end|>"
    assert mask_all.sum() > mask_last.sum()

    ids, mask = data.render_chat(tok, CONVERSATION[:4], add_generation_prompt=True)
    assert _decode(tok, ids[mask]) == CONVERSATION[2]["content"] + "<|im_end|>"  # earlier turn
    assert _decode(tok, ids).endswith("Capital of Peru, café?<|im_end|>\n<|im_start|>assistant\n")
    p = data.prompt_ids(tok, "Capital of Peru, café?", system_prompt="Be brief.")
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of Peru, café?"
    assert _decode(tok, p) == text + "<|im_end|>\n<|im_start|>assistant\n"


def test_system_prompt_and_chat_errors(tok):
    msgs = CONVERSATION[1:3]
    ids, mask = data.render_chat(tok, msgs, system_prompt="Be kind.")
    assert _decode(tok, ids).startswith("<|im_start|>system\nBe kind.<|im_end|>")
    assert _decode(tok, ids[mask]) == msgs[1]["content"] + "<|im_end|>"
    with pytest.raises(ValueError, match="already start with a system"):
        data.render_chat(tok, CONVERSATION, system_prompt="x")
    with pytest.raises(ValueError, match="message 0 is an assistant turn"):
        data.render_chat(tok, [{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="message 1 has role 'bot'"):
        data.render_chat(tok, [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])
    with pytest.raises(ValueError, match="train_turns"):
        data.render_chat(tok, msgs, train_turns="first")


def test_default_system_template_and_prefix_inconsistent_template():
    tokenizer = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
    # SmolLM2/Qwen2.5 style: a default system message when the conversation has none.
    tokenizer.chat_template = (
        "{%- for m in messages %}{%- if loop.first and m['role'] != 'system' %}"
        "{{- '<|im_start|>system\\nDefault helper.<|im_end|>\\n' }}{%- endif %}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    ids, mask = data.render_chat(tokenizer, CONVERSATION[1:])
    assert _decode(tokenizer, ids).startswith("<|im_start|>system\nDefault helper.")
    replies = [_decode(tokenizer, ids[a:b]) for a, b in _runs(mask)]
    assert replies == [CONVERSATION[2]["content"] + "<|im_end|>", "Lima. ☕<|im_end|>"]
    # A template that renders the last message differently (like thinking-stripping ones).
    tokenizer.chat_template = (
        "{%- for m in messages %}{{- m['role'] + ': ' + m['content'] }}"
        "{%- if not loop.last %}{{- '<|im_end|>' }}{%- endif %}{%- endfor %}"
    )
    with pytest.raises(ValueError, match="between the generation prompt and assistant message 2"):
        data.render_chat(tokenizer, CONVERSATION)
    # A template that drops earlier assistant turns' text (like thinking-stripping ones).
    tokenizer.chat_template = (
        "{%- for m in messages %}{%- if m['role'] == 'assistant' and not loop.last %}"
        "{{- 'assistant: (earlier)<|im_end|>' }}{%- else %}"
        "{{- m['role'] + ': ' + m['content'] + '<|im_end|>' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"
    )
    with pytest.raises(ValueError, match="not prefix-consistent at assistant message 2"):
        data.render_chat(tokenizer, CONVERSATION)
    ids, mask = data.render_chat(tokenizer, CONVERSATION[:3])  # one turn: fine
    assert _decode(tokenizer, ids[mask]) == CONVERSATION[2]["content"] + "<|im_end|>"


def test_left_pad():
    ids, mask = data.left_pad([[5, 6, 7], [8], [1, 2, 3, 4, 9]], 0, multiple_of=3)
    np.testing.assert_array_equal(ids, [[0, 0, 0, 5, 6, 7], [0, 0, 0, 0, 0, 8], [0, 1, 2, 3, 4, 9]])
    np.testing.assert_array_equal(mask, ids != 0)
    assert ids.dtype == np.int32 and mask.dtype == np.int32
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        data.left_pad([[1], []], 0)


# ----------------------------------------------------------------------------- truncation


def test_truncation_policies(tok, caplog):
    long_reply = "The capital of Norway is Oslo. " * 5
    examples = [SFTExample("Hi?", "Hello."), SFTExample("Which city is the capital?", long_reply)]
    (full0, full1) = data.tokenize_sft(tok, examples, max_length=512)
    n1 = len(full1.ids)
    max_length = n1 - 7
    assert len(full0.ids) < max_length  # the short example stays whole

    with pytest.raises(ValueError, match=f"example 1 has {n1} tokens > max_length={max_length}"):
        data.tokenize_sft(tok, examples, max_length=max_length)

    _, right = data.tokenize_sft(tok, examples, max_length=max_length, truncation="right")
    np.testing.assert_array_equal(right.ids, full1.ids[:max_length])
    np.testing.assert_array_equal(right.loss_mask, full1.loss_mask[:max_length])
    assert _decode(tok, right.ids[-1:]) != "<|im_end|>"  # the end of the response was cut

    _, left = data.tokenize_sft(tok, examples, max_length=max_length, truncation="left")
    np.testing.assert_array_equal(left.ids, full1.ids[-max_length:])
    # The whole response (and its end token) is kept; only the prompt start was cut.
    assert _decode(tok, left.ids[left.loss_mask]) == long_reply + "<|im_end|>"
    assert left.loss_mask.sum() == full1.loss_mask.sum()

    # "right" with a prompt that fills max_length leaves no target: dropped and counted.
    prompt_len = int(np.argmax(full1.loss_mask))
    with caplog.at_level(logging.INFO, logger="ogpsa_jax.data.encode"):
        kept = data.tokenize_sft(tok, examples, max_length=prompt_len, truncation="right")
    assert len(kept) == 1 and "dropped_no_target_left: 1" in caplog.text
    with pytest.raises(ValueError, match="truncation must be one of"):
        data.tokenize_sft(tok, examples, max_length=64, truncation="middle")


# ----------------------------------------------------------------------------- batching


def _synthetic(n, rng, lo=3, hi=40):
    out = []
    for _ in range(n):
        t = int(rng.integers(lo, hi))
        ids = rng.integers(5, 700, size=t).astype(np.int32)
        mask = np.zeros(t, dtype=bool)
        mask[int(rng.integers(1, t)) :] = True
        out.append(Encoded(ids, mask))
    return out


def test_bucket_padding():
    assert data.bucket_lengths(300) == (64, 128, 256, 300)
    assert data.bucket_lengths(256, min_length=32) == (32, 64, 128, 256)
    rng = np.random.default_rng(0)
    examples = _synthetic(23, rng)
    buckets = (7, 13, 29, 41)
    it = data.Batches(examples, batch_size=5, pad_id=3, buckets=buckets, seed=11)
    order = np.random.default_rng([11, 0]).permutation(23)
    for j in range(it.batches_per_epoch):
        batch = it.next_batch()
        rows = [examples[i] for i in order[j * 5 : (j + 1) * 5]]
        longest = max(len(r.ids) for r in rows)
        expect_len = min(b for b in buckets if b >= longest)
        assert batch["input_ids"].shape == (5, expect_len)
        for b, r in enumerate(rows):
            t = len(r.ids)
            np.testing.assert_array_equal(batch["input_ids"][b, :t], r.ids)
            assert (batch["input_ids"][b, t:] == 3).all()
            np.testing.assert_array_equal(batch["attention_mask"][b], np.arange(expect_len) < t)
            np.testing.assert_array_equal(batch["loss_mask"][b, :t], r.loss_mask)
            assert not batch["loss_mask"][b, t:].any()
        assert all(v.dtype == np.int32 for v in batch.values())
    with pytest.raises(ValueError, match="tokens > largest bucket 29"):
        data.Batches(examples + _synthetic(1, rng, 35, 36), batch_size=2, pad_id=0, buckets=(29,))


def test_shuffle_is_deterministic_and_resume_is_exact():
    rng = np.random.default_rng(1)
    examples = _synthetic(29, rng)
    make = lambda seed: data.Batches(examples, batch_size=4, pad_id=0, buckets=(17, 41), seed=seed)
    a, b, c = make(5), make(5), make(6)
    seq_a = [a.next_batch() for _ in range(17)]  # 7 per epoch: crosses two epoch boundaries
    seq_b = [b.next_batch() for _ in range(17)]
    seq_c = [c.next_batch() for _ in range(17)]
    for x, y in zip(seq_a, seq_b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(
        x["input_ids"].shape != y["input_ids"].shape or (x["input_ids"] != y["input_ids"]).any()
        for x, y in zip(seq_a, seq_c, strict=True)
    )
    # Each epoch is a permutation: 7 batches of 4 distinct examples, the 29th example skipped.
    first_tokens = {tuple(e.ids[:3]) for e in examples}
    seen = [tuple(row[:3]) for batch in seq_a[:7] for row in batch["input_ids"]]
    assert len(set(seen)) == 28 and set(seen) <= first_tokens
    # Epochs differ in order.
    assert [tuple(r[:3]) for r in seq_a[7]["input_ids"]] != [
        tuple(r[:3]) for r in seq_a[0]["input_ids"]
    ]

    # Resume: stop after 9 micro-batches, save, continue in a fresh iterator.
    run = make(5)
    for _ in range(9):
        run.next_batch()
    saved = {k: np.int64(v) for k, v in run.state().items()}  # as a checkpoint gives it back
    assert run.state()["epoch"] == 1 and run.state()["index"] == 2
    resumed = make(5)
    resumed.restore(saved)
    for x in seq_a[9:]:
        y = resumed.next_batch()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    with pytest.raises(ValueError, match="saved seed=5 but this has 6"):
        make(6).restore(saved)


def test_next_step_stacks_microbatches_on_one_bucket():
    rng = np.random.default_rng(2)
    examples = _synthetic(19, rng)
    it = data.Batches(examples, batch_size=3, pad_id=1, buckets=(11, 23, 41), seed=3)
    ref = data.Batches(examples, batch_size=3, pad_id=1, buckets=(11, 23, 41), seed=3)
    for _ in range(4):  # 6 micro-batches per epoch: steps cross the epoch boundary
        step = it.next_step(accum_steps=3)
        micro = [ref.next_batch() for _ in range(3)]
        length = max(m["input_ids"].shape[1] for m in micro)
        assert step["input_ids"].shape == (3, 3, length)
        for a, m in enumerate(micro):
            width = m["input_ids"].shape[1]
            for k in m:
                np.testing.assert_array_equal(step[k][a, :, :width], m[k])
            assert (step["input_ids"][a, :, width:] == 1).all()
            assert not step["attention_mask"][a, :, width:].any()
    assert it.state() == ref.state()
    assert it.steps_per_epoch(accum_steps=4) == 1


def test_preference_batches_stack_chosen_then_rejected():
    rng = np.random.default_rng(3)
    pairs = [EncodedPair(*_synthetic(2, rng)) for _ in range(11)]
    it = data.Batches(pairs, batch_size=3, pad_id=0, buckets=(41,), seed=7)
    order = np.random.default_rng([7, 0]).permutation(11)
    batch = it.next_batch()
    assert batch["input_ids"].shape == (6, 41)
    for b, i in enumerate(order[:3]):
        for row, enc in ((b, pairs[i].chosen), (3 + b, pairs[i].rejected)):
            t = len(enc.ids)
            np.testing.assert_array_equal(batch["input_ids"][row, :t], enc.ids)
            np.testing.assert_array_equal(batch["loss_mask"][row, :t], enc.loss_mask)
    with pytest.raises(ValueError, match="example 2 is a Encoded"):
        data.Batches([pairs[0], pairs[1], pairs[2].chosen], batch_size=1, pad_id=0)


# ----------------------------------------------------------------------------- sources


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _pku_row(i, safe0, safe1, safer):
    return {
        "prompt": f"question {i}?",
        "response_0": f"answer {i} zero",
        "response_1": f"answer {i} one",
        "is_response_0_safe": safe0,
        "is_response_1_safe": safe1,
        "safer_response_id": safer,
        "better_response_id": 1 - safer,
    }


def test_pku_saferlhf_schema_and_safe_pair_filter(tmp_path, caplog):
    labels = [(True, False, 0), (False, True, 1), (True, True, 1), (False, False, 0),
              (False, True, 0), (True, False, 0), (False, False, 1)]  # fmt: skip
    path = _write_jsonl(tmp_path / "pku.jsonl", [_pku_row(i, *lab) for i, lab in enumerate(labels)])
    sft = data.load_sft(path)
    assert [e.response for e in sft] == [
        f"answer {i} {'one' if s else 'zero'}" for i, (_, _, s) in enumerate(labels)
    ]
    assert sft[3] == SFTExample("question 3?", "answer 3 zero")
    with caplog.at_level(logging.INFO, logger="ogpsa_jax.data.sources"):
        safe_sft = data.load_sft(path, safe_only=True)
    assert [e.prompt for e in safe_sft] == [
        "question 0?",
        "question 1?",
        "question 2?",
        "question 5?",
    ]
    assert "dropped 3 (safer response is not labelled safe: 3)" in caplog.text

    pairs = data.load_preferences(path)
    assert pairs[1] == PreferencePair("question 1?", "answer 1 one", "answer 1 zero")
    assert len(pairs) == 7
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ogpsa_jax.data.sources"):
        safe_pairs = data.load_preferences(path, safe_pairs_only=True, limit=2)
    assert [p.prompt for p in safe_pairs] == ["question 0?", "question 1?"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ogpsa_jax.data.sources"):
        safe_pairs = data.load_preferences(path, safe_pairs_only=True)
    assert [p.chosen for p in safe_pairs] == ["answer 0 zero", "answer 1 one", "answer 5 zero"]
    assert "kept 3 rows, dropped 4" in caplog.text
    assert "not exactly one safe response: 3" in caplog.text
    assert "safer_response_id points to the unsafe response: 1" in caplog.text


def test_ultrafeedback_halueval_messages_and_parquet(tmp_path):
    def chat(*turns):
        return [{"role": r, "content": c} for r, c in turns]

    uf = [
        {"prompt": "Name a prime.", "prompt_id": "a", "score_chosen": 8.0, "score_rejected": 2.0,
         "chosen": chat(("user", "Name a prime."), ("assistant", "7 is prime.")),
         "rejected": chat(("user", "Name a prime."), ("assistant", "9 is prime."))},
        {"prompt": "And another?", "prompt_id": "b", "score_chosen": 7.0, "score_rejected": 1.0,
         "chosen": chat(("user", "Name a prime."), ("assistant", "7."), ("user", "And another?"),
                        ("assistant", "11.")),
         "rejected": chat(("user", "Name a prime."), ("assistant", "7."), ("user", "And another?"),
                          ("assistant", "15."))},
    ]  # fmt: skip
    path = _write_jsonl(tmp_path / "uf.jsonl", uf)
    pairs = data.load_preferences(path)
    assert pairs[0] == PreferencePair("Name a prime.", "7 is prime.", "9 is prime.")
    assert pairs[1] == PreferencePair(
        "And another?", "11.", "15.", (("user", "Name a prime."), ("assistant", "7."))
    )
    sft = data.load_sft(path)
    assert [e.response for e in sft] == ["7 is prime.", "11."]
    assert sft[1].messages() == uf[1]["chosen"]
    bad = dict(uf[1], rejected=chat(("user", "Other."), ("assistant", "15.")))
    with pytest.raises(ValueError, match=r"row 1: field 'rejected' has a different conversation"):
        data.load_preferences(_write_jsonl(tmp_path / "uf_bad.jsonl", [uf[0], bad]))

    halu = [{"knowledge": "Lima is the capital of Peru.", "question": "What is Peru's capital?",
             "right_answer": "Lima", "hallucinated_answer": "Cusco"},
            {"knowledge": "", "question": "What is 2 + 3?", "right_answer": "5",
             "hallucinated_answer": "6"}]  # fmt: skip
    hpath = _write_jsonl(tmp_path / "halu.jsonl", halu)
    sft = data.load_sft(hpath)
    assert sft[0] == SFTExample("Lima is the capital of Peru.\n\nWhat is Peru's capital?", "Lima")
    assert sft[1] == SFTExample("What is 2 + 3?", "5")
    assert data.load_preferences(hpath)[0].rejected == "Cusco"

    msgs = [{"messages": chat(("system", "Be terse."), ("user", "Hi"), ("assistant", "Hello."))}]
    ex = data.load_sft(_write_jsonl(tmp_path / "msgs.jsonl", msgs))
    assert ex == [SFTExample("Hi", "Hello.", (("system", "Be terse."),))]
    with pytest.raises(ValueError, match="schema 'messages' has no preference fields"):
        data.load_preferences(tmp_path / "msgs.jsonl")

    import datasets

    pq = tmp_path / "prefs.parquet"
    datasets.Dataset.from_list(
        [
            {"prompt": "p1", "chosen": "c1", "rejected": "r1"},
            {"prompt": "p2", "chosen": "c2", "rejected": "r2"},
        ]
    ).to_parquet(str(pq))
    assert data.load_preferences(pq) == [
        PreferencePair("p1", "c1", "r1"),
        PreferencePair("p2", "c2", "r2"),
    ]
    js = tmp_path / "sft.json"
    js.write_text(json.dumps([{"prompt": "a", "response": "b"}]), encoding="utf-8")
    assert data.load_sft(js) == [SFTExample("a", "b")]


def test_bad_rows_name_file_row_and_field(tmp_path, caplog):
    good = {"prompt": "p", "response": "r"}
    missing = _write_jsonl(tmp_path / "missing.jsonl", [good, good, {"prompt": "p"}])
    with pytest.raises(ValueError, match=rf"{missing}: row 2: field 'response' is missing"):
        data.load_sft(missing)
    empty = _write_jsonl(tmp_path / "empty.jsonl", [good, {"prompt": "p", "response": "  "}])
    with pytest.raises(ValueError, match=rf"{empty}: row 1: field 'response' is empty"):
        data.load_sft(empty)
    with caplog.at_level(logging.INFO, logger="ogpsa_jax.data.sources"):
        assert len(data.load_sft(empty, skip_invalid=True)) == 1
    assert "dropped 1 (invalid response: 1)" in caplog.text

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(good) + "\n" + json.dumps(good) + '\n{"prompt": "p", \n')
    with pytest.raises(ValueError, match=rf"{broken}: row 2 \(line 3\): unreadable JSON"):
        data.load_sft(broken)
    typed = _write_jsonl(tmp_path / "typed.jsonl", [good, {"prompt": "p", "response": 5}])
    with pytest.raises(ValueError, match=rf"{typed}: row 1: field 'response' must be a string"):
        data.load_sft(typed)
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]
    uf = _write_jsonl(tmp_path / "uf.jsonl", [{"prompt": "q", "chosen": chat, "rejected": chat}])
    with pytest.raises(ValueError, match=r"row 0: field 'chosen\[1\].content' is empty"):
        data.load_preferences(uf)
    chat = [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]
    uf = _write_jsonl(tmp_path / "uf2.jsonl", [{"messages": chat}])
    with pytest.raises(ValueError, match=r"row 0: field 'messages\[0\].content' is empty"):
        data.load_sft(uf)
    other = _write_jsonl(tmp_path / "other.jsonl", [{"text": "x"}])
    with pytest.raises(ValueError, match="match no known schema"):
        data.load_sft(other)
    with pytest.raises(ValueError, match="no such file"):
        data.load_sft(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- reference sets


def test_reference_batches_groups(tok):
    general = data.load_sft(data.assets_path("general.jsonl"))
    prefs = data.load_preferences(data.assets_path("safety_prefs.jsonl"))
    groups = data.reference_batches(
        [data.assets_path("general.jsonl"), prefs], tokenizer=tok, batch_size=4, max_length=128, n=7
    )
    assert [len(g) for g in groups] == [2, 4]  # 7 rows -> 2 batches; 7 pairs -> 14 rows -> 4
    last = groups[0][-1]
    assert last["input_ids"].shape[0] == 4
    assert last["attention_mask"][3].sum() == 0 and last["loss_mask"][3].sum() == 0  # filler row
    enc = data.tokenize_sft(tok, general[:7], max_length=128)
    first = groups[0][0]
    for b in range(4):
        t = len(enc[b].ids)
        np.testing.assert_array_equal(first["input_ids"][b, :t], enc[b].ids)
        np.testing.assert_array_equal(first["loss_mask"][b, :t], enc[b].loss_mask)
    # DPO-stage reference rows: the 7 chosen replies, then the 7 rejected ones.
    rows = [
        (ids, m.astype(bool))
        for b in groups[1]
        for ids, m in zip(b["input_ids"], b["loss_mask"], strict=True)
    ]
    assert _decode(tok, rows[0][0][rows[0][1]]) == prefs[0].chosen + "<|im_end|>"
    assert _decode(tok, rows[7][0][rows[7][1]]) == prefs[0].rejected + "<|im_end|>"
    assert _decode(tok, rows[13][0][rows[13][1]]) == prefs[6].rejected + "<|im_end|>"
    with pytest.raises(ValueError, match="reference source 0 must be"):
        data.reference_batches([[1, 2]], tokenizer=tok, batch_size=2, max_length=64)


# ----------------------------------------------------------------------------- shipped assets


def test_shipped_assets_load_and_match_the_generator(tok):
    assert 512 <= len(tok) <= 1000
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert data.pad_token_id(tok) == tok.convert_tokens_to_ids("<|endoftext|>")
    root = data.assets_path()
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 1_000_000
    spec = importlib.util.spec_from_file_location(
        "make_tiny_assets", pathlib.Path(__file__).parents[1] / "tools" / "make_tiny_assets.py"
    )
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    for name, rows in [
        ("safety_sft.jsonl", maker.safety_sft_rows()),
        ("safety_prefs.jsonl", maker.safety_pref_rows()),
        ("general.jsonl", maker.general_rows()),
    ]:
        lines = data.assets_path(name).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == rows  # shipped files are up to date
        assert len(rows) == 64 and len({r["prompt"] for r in rows}) >= 60  # varied prompts
    assert len(data.load_sft(data.assets_path("safety_sft.jsonl"))) == 64
    assert len(data.load_preferences(data.assets_path("safety_prefs.jsonl"))) == 64
    with pytest.raises(ValueError, match="no shipped asset 'nope.txt'"):
        data.assets_path("nope.txt")
