"""An lm-evaluation-harness model adapter for our JAX decoders.

``LMEvalAdapter`` implements lm_eval's ``LM`` interface -- ``loglikelihood``,
``loglikelihood_rolling`` and ``generate_until`` over request objects whose ``.args`` are
``(context, continuation)``, ``(text,)`` and ``(context, gen_kwargs)`` as in lm_eval's
``Instance`` -- so IFEval, GSM8K, MMLU, ... run on our models wherever their data is available.
When ``lm_eval`` is importable the class subclasses ``lm_eval.api.model.LM``; otherwise it is
a plain class with the same interface (lm_eval pulls in torch, which this project does not
install).

Tokenisation follows lm_eval's HF model: trailing spaces of a context move to the
continuation; the continuation's tokens are those of ``encode(context + continuation)`` past
``encode(context)``; an empty context is replaced by the prefix token (BOS, else EOS). Inputs
longer than ``max_length`` lose context from the left.

Example:
    >>> import lm_eval  # doctest: +SKIP
    >>> lm = LMEvalAdapter(model, tokenizer, batch_size=16, max_length=2048)  # doctest: +SKIP
    >>> lm_eval.simple_evaluate(model=lm, tasks=["gsm8k"])  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from flax import nnx

from ogpsa_jax.eval.generation import eos_token_ids, generate_from_ids
from ogpsa_jax.eval.scoring import score_continuations

logger = logging.getLogger(__name__)

try:  # pragma: no cover - depends on the environment
    from lm_eval.api.model import LM as _LMBase

    _HAVE_LM_EVAL = True
except ImportError:
    _LMBase = object
    _HAVE_LM_EVAL = False


def _args(request: Any, n: int, kind: str) -> tuple:
    args = getattr(request, "args", request)
    if not isinstance(args, tuple) or len(args) < n:
        raise ValueError(f"{kind} request needs .args with {n} element(s), got {args!r}")
    return args


class LMEvalAdapter(_LMBase):
    """lm_eval ``LM`` over one of our decoders and its Hugging Face tokenizer.

    Args:
      model: a decoder (``load_hf`` / ``init_random``).
      tokenizer: its tokenizer.
      batch_size: rows per compiled call.
      max_length: the longest input fed to the model (tokens).
      add_bos_token: prepend BOS to encoded text (off by default, like lm_eval's HF model).
      length_bucket: padded lengths are multiples of this.
      progress: tqdm bars.

    Example:
      >>> from transformers import AutoTokenizer
      >>> from ogpsa_jax import data, models
      >>> tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
      >>> model = models.init_random(models.tiny_config(vocab_size=len(tok)), seed=0)
      >>> from types import SimpleNamespace  # stands in for lm_eval's Instance
      >>> lm = LMEvalAdapter(model, tok, batch_size=8, max_length=256)
      >>> [(logprob, greedy)] = lm.loglikelihood([SimpleNamespace(args=("2 + 2 =", " 4"))])
      >>> logprob < 0.0  # a trained model gives e.g. (-0.7, True)
      True
    """

    def __init__(
        self,
        model: nnx.Module,
        tokenizer: Any,
        *,
        batch_size: int = 16,
        max_length: int = 2048,
        add_bos_token: bool = False,
        length_bucket: int = 32,
        progress: bool = False,
    ) -> None:
        if batch_size < 1 or max_length < 2:
            raise ValueError(
                f"need batch_size >= 1 and max_length >= 2: {batch_size}, {max_length}"
            )
        if _HAVE_LM_EVAL:
            super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.add_bos_token = add_bos_token
        self.length_bucket = length_bucket
        self.progress = progress
        self._eos = eos_token_ids(model, tokenizer)

    # -- helpers -------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return int(eos) if eos is not None else self._eos[0]

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=self.add_bos_token))

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Renders a chat with the tokenizer's template (lm_eval's ``--apply_chat_template``)."""
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            return [self.prefix_token_id], self.tok_encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx) :]

    def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str) -> dict:
        return score_continuations(
            self.model,
            pairs,
            batch_size=self.batch_size,
            # score_continuations counts the last token too; lm_eval feeds max_length tokens
            max_length=self.max_length + 1,
            length_bucket=self.length_bucket,
            pad_id=self.eot_token_id,
            progress=desc if self.progress else False,
        )

    # -- lm_eval interface -----------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list:
        """``[(sum log p(continuation | context), is_greedy)]`` per ``(context, continuation)``."""
        pairs = []
        for i, req in enumerate(requests):
            context, continuation = _args(req, 2, "loglikelihood")[:2]
            ctx, cont = self._encode_pair(context, continuation)
            if not cont:
                raise ValueError(
                    f"loglikelihood request {i}: continuation {continuation!r} encodes to no tokens"
                )
            pairs.append((ctx, cont))
        if not pairs:
            return []
        res = self._score(pairs, "loglikelihood")
        return [(float(lp), bool(g)) for lp, g in zip(res["logprob"], res["greedy"], strict=True)]

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list:
        """Sum of log p of every token of each ``(text,)``, the first predicted from the prefix
        token, in disjoint windows of at most ``max_length`` predicted tokens."""
        pairs, owner = [], []
        for i, req in enumerate(requests):
            (text,) = _args(req, 1, "loglikelihood_rolling")[:1]
            tokens = self.tok_encode(text)
            if not tokens:
                raise ValueError(f"loglikelihood_rolling request {i}: empty text")
            full = [self.prefix_token_id, *tokens]
            for a in range(1, len(full), self.max_length):
                b = min(a + self.max_length, len(full))
                start = max(0, b - self.max_length - 1)
                pairs.append((full[start:a], full[a:b]))
                owner.append(i)
        if not pairs:
            return []
        res = self._score(pairs, "loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for i, lp in zip(owner, res["logprob"], strict=True):
            totals[i] += float(lp)
        return totals

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuation of each context, cut at the
        first ``until`` string; ``max_gen_toks`` new tokens at most (default 256)."""
        groups: dict[tuple, list[int]] = {}
        parsed = []
        for i, req in enumerate(requests):
            context, gen_kwargs = _args(req, 2, "generate_until")[:2]
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            max_gen = int(gen_kwargs.pop("max_gen_toks", 256))
            do_sample = bool(gen_kwargs.pop("do_sample", False))
            temperature = float(gen_kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            top_p = float(gen_kwargs.pop("top_p", 1.0)) if do_sample else 1.0
            if gen_kwargs:
                logger.info("generate_until: ignoring gen_kwargs %s", sorted(gen_kwargs))
            if max_gen < 1:
                raise ValueError(f"generate_until request {i}: max_gen_toks must be >= 1")
            ctx = self.tok_encode(context) or [self.prefix_token_id]
            keep = max(1, self.max_length - max_gen)
            parsed.append((ctx[-keep:], until))
            groups.setdefault((max_gen, temperature, top_p), []).append(i)
        outputs = [""] * len(requests)
        for (max_gen, temperature, top_p), idx in groups.items():
            new = generate_from_ids(
                self.model,
                [parsed[i][0] for i in idx],
                eos_token_ids=self._eos,
                pad_id=self.eot_token_id,
                max_new_tokens=max_gen,
                batch_size=self.batch_size,
                temperature=temperature,
                top_p=top_p,
                length_bucket=self.length_bucket,
                progress="generate_until" if self.progress else False,
            )
            for i, ids in zip(idx, new, strict=True):
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                for stop in parsed[i][1]:
                    if stop:
                        text = text.split(stop, 1)[0]
                outputs[i] = text
        return outputs
