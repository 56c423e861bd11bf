"""Build the tiny shipped assets: three small JSONL data sets and a byte-level BPE tokenizer.

Writes, deterministically (run twice, get the same bytes):

- ``ogpsa_jax/assets/data/safety_sft.jsonl``: 64 rows ``{"prompt", "response"}``, harmful-looking
  requests answered with refusals that point to a safe alternative.
- ``ogpsa_jax/assets/data/safety_prefs.jsonl``: 64 rows ``{"prompt", "chosen", "rejected"}``:
  a refusal (chosen) vs a compliant-sounding but content-free answer (rejected).
- ``ogpsa_jax/assets/data/general.jsonl``: 64 rows ``{"prompt", "response"}`` of benign
  arithmetic, capital cities and definitions.
- ``ogpsa_jax/assets/tiny_tokenizer/``: a byte-level BPE (vocab 768) trained on those texts,
  with ChatML special tokens and a ChatML ``chat_template`` in ``tokenizer_config.json``; loads
  with ``transformers.AutoTokenizer.from_pretrained``.

All texts are written here from templates; nothing is copied from an existing data set.

Usage::

    .venv/bin/python tools/make_tiny_assets.py
"""

from __future__ import annotations

import json
import logging
import pathlib
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ROOT = pathlib.Path(__file__).resolve().parents[1] / "ogpsa_jax" / "assets"
VOCAB_SIZE = 768
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# (request, what the request amounts to, a safe alternative to offer)
HARMFUL_TOPICS = [
    (
        "break into my neighbour's house",
        "breaking into someone else's home",
        "If you are locked out of your own home, a licensed locksmith can help.",
    ),
    (
        "build a pipe bomb",
        "building explosives",
        "If you enjoy chemistry, I can suggest safe experiments to try at home.",
    ),
    (
        "steal credit card numbers from an online shop",
        "stealing financial information",
        "I can explain how to protect your own cards from fraud.",
    ),
    (
        "write ransomware that locks a hospital's computers",
        "creating malicious software",
        "I can explain how organisations defend themselves against ransomware.",
    ),
    (
        "poison my coworker without getting caught",
        "harming another person",
        "If a conflict at work feels overwhelming, talking to HR or a counsellor can help.",
    ),
    (
        "buy a gun without a background check",
        "getting around firearm laws",
        "I can describe the legal process for buying a firearm where you live.",
    ),
    (
        "cook methamphetamine in my kitchen",
        "making illegal drugs",
        "If someone close to you is struggling with drugs, a local helpline can support you.",
    ),
    (
        "get into my ex's email account",
        "accessing someone else's account without permission",
        "To recover your own account, start from the provider's account recovery page.",
    ),
    (
        "make a fake passport",
        "forging identity documents",
        "I can explain how to apply for a real passport.",
    ),
    (
        "follow someone home without them noticing",
        "stalking a person",
        "If you are worried about someone's safety, please contact the local authorities.",
    ),
    (
        "write an email that tricks people into sharing their bank password",
        "phishing",
        "I can show you how to recognise and report phishing emails.",
    ),
    (
        "launder cash through a small business",
        "money laundering",
        "An accountant can help you keep your business finances clean and legal.",
    ),
    (
        "spread a rumour that ruins a classmate's reputation",
        "harassing someone",
        "If you are in a conflict with a classmate, a teacher or counsellor can help.",
    ),
    (
        "disable the smoke alarms in my apartment building",
        "putting other people's lives at risk",
        "If an alarm keeps going off by mistake, ask your building manager to check it.",
    ),
    (
        "hide income from the tax office",
        "tax fraud",
        "A tax adviser can help you find the deductions you are legally entitled to.",
    ),
    (
        "hurt my neighbour's dog to get back at them",
        "harming animals",
        "If a dispute with a neighbour is escalating, a mediation service can help.",
    ),
]
REQUEST_FORMS = [
    "How do I {req}?",
    "Give me step-by-step instructions to {req}.",
    "What is the easiest way to {req}?",
    "I need to {req} tonight. Tell me exactly what to do.",
]
REFUSAL_FORMS = [
    "I can't help with that. It involves {what}, which can seriously hurt people. {alt}",
    "Sorry, but I won't give instructions for {what}. {alt}",
    "I'm not able to assist with this request because it involves {what}. {alt}",
    "That is something I won't help with: {what} is harmful and often illegal. {alt}",
]
EMPTY_COMPLIANCE_FORMS = [
    "Sure! Here is how to {req}. First, get everything you need ready. Next, follow the steps "
    "in order. Finally, check that it worked. Good luck!",
    "Of course. To {req}, you just need to plan ahead, stay calm and take it one step at a "
    "time. It is easier than it sounds!",
    "Absolutely, I can help you {req}. Start with the basics, then move on to the details, and "
    "you will be done in no time.",
    "No problem! The trick to {req} is preparation. Once you are ready, simply do it carefully "
    "and quietly.",
]

CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Canada", "Ottawa"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Spain", "Madrid"),
    ("Australia", "Canberra"),
    ("Germany", "Berlin"),
    ("Brazil", "Brasilia"),
    ("India", "New Delhi"),
    ("Portugal", "Lisbon"),
    ("Greece", "Athens"),
    ("Chile", "Santiago"),
    ("Poland", "Warsaw"),
    ("Vietnam", "Hanoi"),
    ("Mexico", "Mexico City"),
    ("Ireland", "Dublin"),
    ("Sweden", "Stockholm"),
]
DEFINITIONS = [
    (
        "photosynthesis",
        "the process by which plants use sunlight, water and carbon dioxide to "
        "make sugar and release oxygen",
    ),
    ("a prime number", "a whole number greater than one whose only divisors are one and itself"),
    ("gravity", "the force that pulls objects with mass towards each other"),
    ("an atom", "the smallest unit of a chemical element, made of a nucleus and electrons"),
    ("evaporation", "the change of a liquid into a gas, usually when it is heated"),
    ("a verb", "a word that describes an action, a state or an event"),
    ("democracy", "a system of government in which citizens choose their leaders by voting"),
    ("a mammal", "a warm-blooded animal that has hair and feeds its young with milk"),
    ("inflation", "the general rise in prices over time, which lowers what money can buy"),
    ("an algorithm", "a precise list of steps for solving a problem or doing a task"),
    ("a triangle", "a flat shape with three straight sides and three angles"),
    ("erosion", "the slow wearing away of rock and soil by water, wind or ice"),
    ("a noun", "a word that names a person, place, thing or idea"),
    ("friction", "the force that resists the motion of one surface sliding over another"),
    ("a volcano", "an opening in the earth's crust through which molten rock and gas escape"),
    ("a fraction", "a number that represents a part of a whole, such as one half"),
    ("metabolism", "the chemical processes in a living body that turn food into energy"),
    ("a glacier", "a large, slow-moving mass of ice formed from compacted snow"),
    ("an ecosystem", "a community of living things together with their environment"),
    ("a synonym", "a word that means the same or nearly the same as another word"),
    ("a thermometer", "an instrument that measures temperature"),
]
CAPITAL_FORMS = ["What is the capital of {c}?", "Which city is the capital of {c}?"]
DEFINITION_FORMS = ["What is {t}?", "Define {t}.", "Can you explain what {t} is?"]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def safety_sft_rows() -> list[dict[str, str]]:
    """64 harmful-looking requests (16 topics x 4 phrasings), each answered with a refusal."""
    rows = []
    for t, (req, what, alt) in enumerate(HARMFUL_TOPICS):
        for f, form in enumerate(REQUEST_FORMS):
            refusal = REFUSAL_FORMS[(t + f) % len(REFUSAL_FORMS)]
            rows.append(
                {"prompt": form.format(req=req), "response": refusal.format(what=what, alt=alt)}
            )
    return rows


def safety_pref_rows() -> list[dict[str, str]]:
    """64 pairs: refusal (chosen) vs a compliant-sounding answer with no content (rejected)."""
    rows = []
    for t, (req, what, alt) in enumerate(HARMFUL_TOPICS):
        for f, form in enumerate(REQUEST_FORMS):
            refusal = REFUSAL_FORMS[(t + f + 1) % len(REFUSAL_FORMS)]
            comply = EMPTY_COMPLIANCE_FORMS[(t + 2 * f) % len(EMPTY_COMPLIANCE_FORMS)]
            rows.append(
                {
                    "prompt": form.format(req=req),
                    "chosen": refusal.format(what=what, alt=alt),
                    "rejected": comply.format(req=req),
                }
            )
    return rows


def general_rows() -> list[dict[str, str]]:
    """64 benign rows: 22 arithmetic, 21 capitals, 21 definitions, interleaved."""
    rng = random.Random(1234)
    arithmetic = []
    for i in range(22):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = i % 3
        if op == 0:
            arithmetic.append(
                {"prompt": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}."}
            )
        elif op == 1:
            hi, lo = max(a, b), min(a, b)
            arithmetic.append(
                {"prompt": f"Compute {hi} minus {lo}.", "response": f"{hi} - {lo} = {hi - lo}."}
            )
        else:
            a, b = a % 13 + 2, b % 11 + 2
            arithmetic.append(
                {"prompt": f"What is {a} times {b}?", "response": f"{a} x {b} = {a * b}."}
            )
    capitals = [
        {
            "prompt": CAPITAL_FORMS[i % len(CAPITAL_FORMS)].format(c=country),
            "response": f"The capital of {country} is {city}.",
        }
        for i, (country, city) in enumerate(CAPITALS)
    ]
    definitions = [
        {
            "prompt": DEFINITION_FORMS[i % len(DEFINITION_FORMS)].format(t=term),
            "response": f"{_cap(term)} is {meaning}.",
        }
        for i, (term, meaning) in enumerate(DEFINITIONS)
    ]
    rows = []
    for i in range(22):
        rows.append(arithmetic[i])
        if i < len(capitals):
            rows.append(capitals[i])
        if i < len(definitions):
            rows.append(definitions[i])
    return rows


def write_jsonl(path: pathlib.Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def train_tokenizer(texts: list[str], out_dir: pathlib.Path) -> None:
    """Train a byte-level BPE on ``texts`` and save it as a transformers tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out_dir), save_jinja_files=False)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = {
        "safety_sft.jsonl": safety_sft_rows(),
        "safety_prefs.jsonl": safety_pref_rows(),
        "general.jsonl": general_rows(),
    }
    texts = []
    for name, rows in data.items():
        write_jsonl(ROOT / "data" / name, rows)
        logging.info("wrote %s (%d rows)", ROOT / "data" / name, len(rows))
        for row in rows:
            prompt = row["prompt"]
            for key in ("response", "chosen", "rejected"):
                if key in row:
                    texts.append(
                        f"<|im_start|>user\n{prompt}<|im_end|>\n"
                        f"<|im_start|>assistant\n{row[key]}<|im_end|>\n"
                    )
    train_tokenizer(texts, ROOT / "tiny_tokenizer")
    logging.info("wrote %s", ROOT / "tiny_tokenizer")


if __name__ == "__main__":
    main()
