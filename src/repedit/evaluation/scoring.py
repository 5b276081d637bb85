"""The one place probes are scored: teacher-forced accuracy, log-probs, locality agreement.

A :class:`Probe` is a complete prompt (the subject already inside) and the text that should
follow it. Scoring feeds ``prompt + " " + target`` and reads, at every target position, the
model's log-prob of the target token and its argmax (teacher forcing, as in the paper's code):

* ``exact``    – the argmax equals the target token at *every* target position (success);
* ``token_acc`` – the share of target positions where it does;
* ``logprob``  – the sum of target-token log-probs (``exp(logprob)`` = P(full target));
* ``beats_alt`` – ROME/CounterFact's comparison: mean per-token NLL of ``target`` below that
  of ``alt``;
* ``agree``    – with ``reference`` (the unedited model's ``pred_tokens``), the share of
  positions where the argmax is unchanged (locality, as in the paper's code).

Tokenisation (see :func:`tokenize_probe`): the sequence fed to the model is always
``prompt_ids + target_ids``, so the target positions are exactly known for every tokenizer.
``prompt_ids`` is the prompt's own tokenisation (with the tokenizer's leading special tokens,
e.g. Llama's BOS, and never trailing ones such as an appended EOS). ``target_ids`` is the
suffix of the joint tokenisation of ``prompt + " " + target`` beyond ``prompt_ids`` whenever
the joint tokenisation starts with ``prompt_ids`` -- this is the natural tokenisation of the
answer (``"▁Paris"`` for SentencePiece, ``"ĠParis"`` for byte-level BPE), identical to what the
paper's code scores. If the boundary merges (the joint tokenisation does not start with the
prompt's ids), ``" " + target`` is tokenised on its own without special tokens instead, and a
lone whitespace piece that a SentencePiece dummy prefix may add in front is dropped.

Batches are right-padded with an attention mask, so every row keeps positions ``0..n-1`` for
every family. Logits are only computed at the positions needed: a pre-hook on the LM head
gathers the hidden states at the target positions, so no ``[batch, seq, vocab]`` tensor is
built (a model whose head cannot be hooked falls back to gathering from full logits).

Every forward declares which tokens are the prompt (:func:`repedit.models.spans.declare_prompt`:
each row's prompt length when scoring, the prefill when generating), so a prompt-only rewrite
such as REP's leaves the answer's tokens alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from repedit.errors import InvalidRequestError
from repedit.evaluation import packing
from repedit.models.hooks import Hooks
from repedit.models.loading import LoadedModel
from repedit.models.precision import Precision
from repedit.models.precision import precision_context as _precision_context
from repedit.models.spans import declare_prompt


@dataclass(frozen=True)
class Probe:
    """``prompt`` (complete text) should be followed by ``target``; ``alt`` is the competitor."""

    prompt: str
    target: str
    alt: str | None = None
    test: str = ""
    meta: dict = field(default_factory=dict)


@dataclass
class ProbeScore:
    """Teacher-forced scores of one probe (see the module docstring for each field)."""

    exact: bool
    token_acc: float
    logprob: float
    mean_logprob: float
    alt_logprob: float | None
    beats_alt: bool | None
    pred_tokens: list[int]
    target_tokens: list[int]
    alt_mean_logprob: float | None = None
    agree: float | None = None

    @property
    def prob(self) -> float:
        """Probability of the whole target, ``exp(logprob)``."""
        return float(torch.tensor(self.logprob).exp())


# --------------------------------------------------------------------------- tokenisation


def _ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def _leading_specials(with_special: list[int], plain: list[int], bos: int | None) -> list[int]:
    """The ids in front of ``plain`` inside ``with_special`` (BOS); trailing ones are dropped."""
    n = len(plain)
    if n == 0:
        return with_special[:1] if with_special and with_special[0] == bos else []
    for k in range(len(with_special) - n + 1):
        if with_special[k : k + n] == plain:
            return with_special[:k]
    return []


def _is_blank_piece(tokenizer: Any, token_id: int) -> bool:
    return tokenizer.decode([token_id]).strip() == ""


def _describe(probe: Probe) -> str:
    test = f" [{probe.test}]" if probe.test else ""
    return f"probe{test} prompt={probe.prompt!r} target={probe.target!r}"


def _tokenize_batch(
    tokenizer: Any, prompts: list[str], targets: list[str], names: list[str]
) -> list[tuple[list[int], list[int]]]:
    """``(prompt_ids, target_ids)`` for each pair; see the module docstring for the rule."""
    for target, name in zip(targets, names, strict=True):
        if not isinstance(target, str) or not target.strip():
            raise InvalidRequestError(f"empty target in {name}")
    answers = [" " + t.lstrip() for t in targets]
    prompt_plain = _ids(tokenizer, list(prompts), False)
    prompt_special = _ids(tokenizer, list(prompts), True)
    bos = getattr(tokenizer, "bos_token_id", None)
    prefixes = [
        _leading_specials(w, p, bos) for w, p in zip(prompt_special, prompt_plain, strict=True)
    ]
    joint = _ids(tokenizer, [p + a for p, a in zip(prompts, answers, strict=True)], False)
    out = []
    fallback: list[int] = []
    for i, (p_ids, j_ids) in enumerate(zip(prompt_plain, joint, strict=True)):
        if j_ids[: len(p_ids)] == p_ids and len(j_ids) > len(p_ids):
            out.append((prefixes[i] + p_ids, j_ids[len(p_ids) :]))
        else:
            out.append((prefixes[i] + p_ids, []))
            fallback.append(i)
    if fallback:
        alone = _ids(tokenizer, [answers[i] for i in fallback], False)
        for i, t_ids in zip(fallback, alone, strict=True):
            if len(t_ids) > 1 and _is_blank_piece(tokenizer, t_ids[0]):
                t_ids = t_ids[1:]
            out[i] = (out[i][0], t_ids)
    for (p_ids, t_ids), name in zip(out, names, strict=True):
        if not t_ids:
            raise InvalidRequestError(f"target tokenises to nothing in {name}")
        if not p_ids:
            raise InvalidRequestError(f"prompt tokenises to nothing in {name}")
    return out


def tokenize_probe(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, target_ids)``; the model is fed ``prompt_ids + target_ids``."""
    name = f"prompt={prompt!r} target={target!r}"
    return _tokenize_batch(tokenizer, [prompt], [target], [name])[0]


# --------------------------------------------------------------------------- core forward


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _lm_head(lm: LoadedModel) -> torch.nn.Module | None:
    arch = getattr(lm, "arch", None)
    if arch is not None:
        try:
            return arch.lm_head()
        except AttributeError:
            return None
    get = getattr(lm.model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _score_sequences(
    lm: LoadedModel, seqs: list[tuple[list[int], list[int]]], batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence ``(target log-probs [K], argmax ids [K])`` on CPU, teacher-forced.

    Sequences are sorted by length so batches carry little padding; one forward per batch.
    """
    if batch_size < 1:
        raise InvalidRequestError(f"batch_size must be >= 1, got {batch_size}")
    device = lm.device
    pad = _pad_id(lm.tokenizer)
    head = _lm_head(lm)
    results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rows = [seqs[i][0] + seqs[i][1] for i in idx]
            n_prompt = torch.tensor([len(seqs[i][0]) for i in idx])
            n_target = torch.tensor([len(seqs[i][1]) for i in idx])
            b, length, width = len(idx), max(map(len, rows)), int(n_target.max())
            ids = torch.full((b, length), pad, dtype=torch.long)
            mask = torch.zeros((b, length), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, : len(row)] = torch.tensor(row)
                mask[r, : len(row)] = 1
            # Logits at position p predict token p + 1: target token j sits at n_prompt + j.
            offs = torch.arange(width)
            valid = offs[None, :] < n_target[:, None]  # [b, width]
            pos = torch.where(valid, n_prompt[:, None] - 1 + offs[None, :], 0)
            tgt = ids.gather(1, torch.where(valid, pos + 1, 0))
            pos_dev = pos.to(device)
            gathered = {"done": False}

            def pick(x: torch.Tensor, pos_dev=pos_dev, gathered=gathered, b=b, length=length):
                if x.dim() != 3 or tuple(x.shape[:2]) != (b, length):
                    return x
                gathered["done"] = True
                return x[torch.arange(b, device=x.device)[:, None], pos_dev]

            with Hooks() as hooks, declare_prompt(lm, n_prompt):
                if head is not None:
                    hooks.rewrite(head, pick)
                out = lm.model(
                    input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
                )
            logits = out.logits if hasattr(out, "logits") else out[0]
            if not gathered["done"]:
                logits = logits[torch.arange(b, device=logits.device)[:, None], pos_dev]
            del out
            logp = torch.log_softmax(logits.float(), dim=-1)  # [b, width, vocab]
            del logits
            tgt_logp = logp.gather(-1, tgt.to(logp.device)[..., None])[..., 0].cpu()
            argmax = logp.argmax(-1).cpu()
            del logp
            for r, i in enumerate(idx):
                k = int(n_target[r])
                results[i] = (tgt_logp[r, :k], argmax[r, :k])
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------- public API

#: ``fast``: packed rows, each prompt once for all its answers (:mod:`.packing`);
#: ``reference``: right-padded batches, one row per answer (the original path, kept to check
#: the fast one against)
Impl = Literal["fast", "reference"]


def precision_context(
    lm: LoadedModel, precision: Precision
) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for ``precision`` on ``lm``'s device (a no-op for ``model``)."""
    return _precision_context(lm.device, precision)


def _forward_scores(
    lm: LoadedModel,
    seqs: list[tuple[list[int], list[int]]],
    batch_size: int,
    impl: Impl,
    precision: Precision = "model",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence ``(target log-probs, argmax ids)`` by the chosen implementation."""
    if impl not in ("fast", "reference"):
        raise InvalidRequestError(f"impl must be 'fast' or 'reference', got {impl!r}")
    if batch_size < 1:
        raise InvalidRequestError(f"batch_size must be >= 1, got {batch_size}")
    with precision_context(lm, precision):
        if impl == "fast" and seqs and packing.packable(lm, seqs):
            return packing.score_rows(lm, seqs, _lm_head(lm))
        return _score_sequences(lm, seqs, batch_size)


def _expand(probes: list[Probe]) -> tuple[list[str], list[str], list[str], list[tuple[int, str]]]:
    """The sequences to score: each probe's target, then its ``alt`` if any; ``owner`` says
    which probe and which answer each one is."""
    prompts, targets, names, owner = [], [], [], []
    for n, probe in enumerate(probes):
        answers = [("target", probe.target)]
        if probe.alt is not None:
            answers.append(("alt", probe.alt))
        for kind, answer in answers:
            prompts.append(probe.prompt)
            targets.append(answer)
            alt = f" alt={probe.alt!r}" if kind == "alt" else ""
            names.append(_describe(probe) + alt)
            owner.append((n, kind))
    return prompts, targets, names, owner


def _agreement(probe: Probe, pred: torch.Tensor, n_target: int, ref: list[int]) -> float:
    """Share of target positions whose argmax equals the unedited model's."""
    if len(ref) != n_target:
        raise InvalidRequestError(
            f"reference has {len(ref)} tokens, target {n_target} in {_describe(probe)}"
        )
    return float((pred == torch.tensor(ref)).float().mean())


def _probe_score(
    probe: Probe,
    t_ids: list[int],
    logp: torch.Tensor,
    pred: torch.Tensor,
    alt: torch.Tensor | None,
    ref: list[int] | None,
) -> ProbeScore:
    """One probe's :class:`ProbeScore` from its target's and alt's per-token scores."""
    hits = pred == torch.tensor(t_ids)
    mean_lp = float(logp.mean())
    alt_lp = alt_mean = beats = None
    if alt is not None:
        alt_lp, alt_mean = float(alt.sum()), float(alt.mean())
        beats = mean_lp > alt_mean  # mean NLL(target) < mean NLL(alt), as in ROME
    return ProbeScore(
        exact=bool(hits.all()),
        token_acc=float(hits.float().mean()),
        logprob=float(logp.sum()),
        mean_logprob=mean_lp,
        alt_logprob=alt_lp,
        beats_alt=beats,
        pred_tokens=pred.tolist(),
        target_tokens=list(t_ids),
        alt_mean_logprob=alt_mean,
        agree=None if ref is None else _agreement(probe, pred, len(t_ids), list(ref)),
    )


def score_probes(
    lm: LoadedModel,
    probes: Sequence[Probe],
    *,
    batch_size: int = 32,
    reference: list[list[int]] | None = None,
    impl: Impl = "fast",
    precision: Precision = "model",
) -> list[ProbeScore]:
    """Teacher-forced scores of ``probes`` (and their ``alt`` answers, in the same forwards).

    ``lm`` is a :class:`~repedit.models.LoadedModel` (anything with ``.model``, ``.tokenizer``
    and ``.device``). ``reference``: the unedited model's ``pred_tokens`` per probe; when
    given, each score's ``agree`` is the share of positions whose argmax is unchanged.
    ``batch_size`` counts sequences per forward in the reference path (a probe with ``alt``
    contributes two); the fast path packs rows by tokens instead (:mod:`.packing`).
    ``precision``: see :data:`Precision`.
    """
    probes = list(probes)
    if reference is not None and len(reference) != len(probes):
        raise InvalidRequestError(
            f"reference has {len(reference)} entries for {len(probes)} probes"
        )
    prompts, targets, names, owner = _expand(probes)
    seqs = _tokenize_batch(lm.tokenizer, prompts, targets, names)
    scored = _forward_scores(lm, seqs, batch_size, impl, precision)
    main: dict[int, tuple[list[int], torch.Tensor, torch.Tensor]] = {}
    alt: dict[int, torch.Tensor] = {}
    for (n, kind), (_, t_ids), (logp, pred) in zip(owner, seqs, scored, strict=True):
        if kind == "target":
            main[n] = (t_ids, logp, pred)
        else:
            alt[n] = logp
    out = []
    for n, probe in enumerate(probes):
        t_ids, logp, pred = main[n]
        ref = None if reference is None else reference[n]
        out.append(_probe_score(probe, t_ids, logp, pred, alt.get(n), ref))
    return out


def predictions(
    lm: LoadedModel,
    probes: Sequence[Probe],
    *,
    batch_size: int = 32,
    impl: Impl = "fast",
    precision: Precision = "model",
) -> list[list[int]]:
    """The argmax ids at each probe's target positions (cache these once for locality)."""
    probes = [Probe(p.prompt, p.target, None, p.test, p.meta) for p in probes]
    scores = score_probes(lm, probes, batch_size=batch_size, impl=impl, precision=precision)
    return [s.pred_tokens for s in scores]


def next_token_probs(
    lm: LoadedModel,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 32,
    impl: Impl = "fast",
    precision: Precision = "model",
) -> list[float]:
    """Probability of each target's *first* token right after its prompt."""
    prompts, targets = list(prompts), list(targets)
    if len(prompts) != len(targets):
        raise InvalidRequestError(f"{len(prompts)} prompts but {len(targets)} targets")
    names = [f"prompt={p!r} target={t!r}" for p, t in zip(prompts, targets, strict=True)]
    seqs = [(p, t[:1]) for p, t in _tokenize_batch(lm.tokenizer, prompts, targets, names)]
    scored = _forward_scores(lm, seqs, batch_size, impl, precision)
    return [float(lp[0].exp()) for lp, _ in scored]


class _LeftPadding:
    """Temporarily set ``tokenizer.padding_side = "left"``; restored on exit."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __enter__(self) -> Any:
        self.saved = getattr(self.tokenizer, "padding_side", "right")
        self.tokenizer.padding_side = "left"
        return self.tokenizer

    def __exit__(self, *exc: object) -> None:
        self.tokenizer.padding_side = self.saved


def encode_left_padded(lm: LoadedModel, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids``/``attention_mask`` on the model's device (for generation)."""
    tok = lm.tokenizer
    with _LeftPadding(tok):
        enc = tok(list(prompts), padding=True, return_tensors="pt")
    return {
        "input_ids": enc["input_ids"].to(lm.device),
        "attention_mask": enc["attention_mask"].to(lm.device),
    }


def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    precision: Precision = "model",
    **kwargs: Any,
) -> list[str]:
    """Batched ``model.generate`` (its KV cache, left padding); returns only the new text per
    prompt. ``precision``: see :data:`Precision`."""
    prompts = list(prompts)
    texts: list[str] = []
    pad = _pad_id(lm.tokenizer)
    for start in range(0, len(prompts), batch_size):
        enc = encode_left_padded(lm, prompts[start : start + batch_size])
        with (
            torch.inference_mode(),
            precision_context(lm, precision),
            declare_prompt(lm),  # the prefill is the prompt
        ):
            out = lm.model.generate(
                **enc, max_new_tokens=max_new_tokens, pad_token_id=pad, **kwargs
            )
        new = out[:, enc["input_ids"].shape[1] :].cpu()
        texts.extend(lm.tokenizer.batch_decode(new, skip_special_tokens=True))
    return texts


def greedy_completion(
    lm: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int = 5,
    *,
    batch_size: int = 32,
    precision: Precision = "model",
) -> list[str]:
    """Greedy continuation of each prompt (new text only), batched with left padding."""
    return generate(
        lm,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        precision=precision,
        do_sample=False,
        num_beams=1,
        top_k=None,
        top_p=None,
        temperature=None,
    )


# --------------------------------------------------------------------------- generate-scored


@dataclass
class GenerateScore:
    """Generation-scored probe: the greedy ``continuation`` of the prompt; ``exact`` when it
    begins with the target (:func:`begins_with`); ``agree`` (with a reference)
    when it equals the unedited model's continuation, normalised the same way."""

    continuation: str
    exact: bool
    agree: bool | None = None


def normalise(text: str) -> str:
    """Whitespace runs to one space, ends stripped, case folded (generate-scoring's rule)."""
    return " ".join(text.split()).casefold()


def begins_with(text: str, target: str) -> bool:
    """Whether ``text`` begins with ``target`` once both are normalised, ending at a word
    boundary (``"Parisian"`` does not begin with ``"Paris"``)."""
    text, target = normalise(text), normalise(target)
    if not target or not text.startswith(target):
        return False
    rest = text[len(target) :]
    return not rest or not (rest[0].isalnum() and target[-1].isalnum())


def continuations(
    lm: LoadedModel,
    probes: Sequence[Probe],
    *,
    extra_tokens: int = 2,
    batch_size: int = 32,
    precision: Precision = "model",
) -> list[str]:
    """Each probe's greedy continuation, ``len(target tokens) + extra_tokens`` tokens long
    (probes needing the same length share batches)."""
    probes = list(probes)
    names = [_describe(p) for p in probes]
    seqs = _tokenize_batch(
        lm.tokenizer, [p.prompt for p in probes], [p.target for p in probes], names
    )
    by_length: dict[int, list[int]] = {}
    for i, (_, t_ids) in enumerate(seqs):
        by_length.setdefault(len(t_ids) + extra_tokens, []).append(i)
    out = [""] * len(probes)
    for n_new, idx in by_length.items():
        prompts = [probes[i].prompt for i in idx]
        texts = greedy_completion(lm, prompts, n_new, batch_size=batch_size, precision=precision)
        for i, text in zip(idx, texts, strict=True):
            out[i] = text
    return out


def generate_scores(
    lm: LoadedModel,
    probes: Sequence[Probe],
    *,
    reference: Sequence[str] | None = None,
    extra_tokens: int = 2,
    batch_size: int = 32,
    precision: Precision = "model",
) -> list[GenerateScore]:
    """Generation-scored probes: success when the greedy continuation of the target's token
    count plus ``extra_tokens`` begins with the target. ``reference``: the unedited model's
    :func:`continuations` per probe, for neighbourhood agreement. Scores what the model says,
    where teacher forcing scores what it would say if given the right first tokens."""
    probes = list(probes)
    if reference is not None and len(reference) != len(probes):
        raise InvalidRequestError(
            f"reference has {len(reference)} continuations for {len(probes)} probes"
        )
    texts = continuations(
        lm, probes, extra_tokens=extra_tokens, batch_size=batch_size, precision=precision
    )
    return [
        GenerateScore(
            continuation=text,
            exact=begins_with(text, probe.target),
            agree=None if reference is None else normalise(text) == normalise(reference[i]),
        )
        for i, (probe, text) in enumerate(zip(probes, texts, strict=True))
    ]
