"""The REP adapter: a gated low-rank residual on the key path of one down-projection.

``k̂ = k + g(k) · P(k)`` with ``P(k) = (α/r) · B A dropout(k)`` (rank ``r``; ``A`` Kaiming-
uniform, ``B`` zero, so the adapter starts as the identity) and a per-token gate
``g(k) = sigmoid(Linear(h→1)(GELU(Linear(D→h)(k))))`` that reads the raw key (RMS-normalised
with ``gate_input_norm``). Training uses the soft gate; ``eval()`` switches to the hard gate
``𝟙[g > τ]`` and turns dropout off (both are registered submodules, so one mode flag reaches
them). At inference a key is also left alone when it already retrieves the edit
(``β̃(k) ≥ beta_guard``) or is the edit prompt's own key (``keep_prompt_key``).

:class:`RepConfig` holds every setting; :func:`released_config` reproduces the paper's released
code's gate (which never opens). Why the defaults differ from the paper (a supervised gate,
the ``match`` loss, the decoupled projection, the guard): see ``docs/method.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast, get_args

import torch
from torch import nn

from repedit.data.augment import parse_kinds
from repedit.editors.hparams import Hparams
from repedit.errors import InvalidRequestError

Target = Literal["whitened", "raw", "released"]
Agg = Literal["direction", "match"]
LengthUnit = Literal["words", "tokens"]
SubjectTokens = Literal["ignore", "negative"]
PoolKind = Literal["kin", "lookalike", "random"]
POOL_KINDS: tuple[PoolKind, ...] = get_args(PoolKind)
ConsistencyOn = Literal["prompt", "original"]
TARGETS: tuple[str, ...] = get_args(Target)
#: the generated subject forms REP trains on by default: every kind but ``span`` (chosen on the
#: validation cases, docs/generalisation.md)
GENERATED_FORMS: tuple[str, ...] = (
    "case", "spacing", "punct", "noise", "determiner", "initials", "truncate",
)  # fmt: skip

#: the RepConfig fields whose values are one of a fixed set (checked from their Literal)
_CHOICES: dict[str, Any] = {
    "target": Target,
    "agg": Agg,
    "long_context_unit": LengthUnit,
    "gate_subject_tokens": SubjectTokens,
    "consistency_on": ConsistencyOn,
}
#: ``keep_prompt_key``: how close (‖k − k_o‖/‖k_o‖) a key must be to the edit prompt's own
PROMPT_KEY_TOLERANCE = 1e-3
FORMAT = "repedit-rep/1"
#: the generalisation fields at their values before they became the defaults (and the paper's):
#: the subject's earlier tokens as gate negatives, no generated forms, no pool negatives; the
#: ``listed-forms`` ablation
LISTED_FORMS: dict[str, Any] = {
    "gate_subject_tokens": "negative",
    "augment": (),
    "pool_negatives": 0,
}


@dataclass
class RepConfig(Hparams):
    """Hyper-parameters of REP (defaults: the paper's script settings, plus a trained gate and
    the generalisation setting: ``gate_subject_tokens="ignore"``, generated forms, pool negatives).

    Adapter: ``rank``, ``alpha`` (scale α/r), ``dropout``, gate width
    ``h = max(gate_hidden_min, floor(gate_hidden_fraction · d_mlp))``, threshold ``tau``.
    ``use_gate=False`` applies ``k + P(k)`` at every token (the "no gate" ablation).

    Losses (summed over every adapted layer): ``agg_weight · L_agg`` with
    ``L_agg = −mean (k̂/‖k̂‖)·t`` over positives (``use_norm=False`` drops the normalisation,
    ``abs_agg=True`` takes ``|·|`` as the paper writes it; keys whose β̃ already reaches
    ``agg_beta_cap`` are not pushed further); ``consistency_weight · MSE(f(k_o), k_o)`` at the
    bare prompt (``consistency_on="original"``: at every original-subject key);
    ``gate_loss_weight · BCE`` on the gate (see the module doc);
    with ``negatives=True`` also ``negative_weight · mean |(k̂/‖k̂‖)·t|`` over negative tokens
    from ``negative_sources`` (``subjects``: other subjects in the edit's templates;
    ``neighbourhood``: the case's neighbourhood prompts, which are also the locality test's
    probes, so using them leaks test data; ``text``: general-text passages).

    Target ``t`` per layer and request: ``whitened`` = C⁻¹k*/‖C⁻¹k*‖ for every editor;
    ``raw`` = k* (the released code's MEMIT/EMMET convention); ``released`` = whitened for
    ROME/R-ROME and raw otherwise, as the paper's released code mixes them.

    Data: contexts × {original, in-domain paraphrases, first half of the scrambles} + ``n_long``
    passages of ``long_context_length`` ``long_context_unit`` from ``long_context_corpus``
    (None: ``$REPEDIT_DATA/wikitext/wiki.test.raw``), and with ``augment`` generated subject
    forms. Optimisation: Adam, ``steps`` batches of
    ``batch`` pool items + every bare prompt, drawn without repetition; lr ``lr`` for the
    projection, ``gate_lr`` (None: ``lr``) for the gate; ``weight_decay`` (AdamW) and
    ``max_norm`` (a bound on P's spectral norm) regularise the projection. ``shared``: one
    adapter set for all requests of a batch edit instead of one per request.
    """

    method: ClassVar[str] = "rep"

    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.1
    #: decoupled weight decay (AdamW) on the projection's factors A and B, not the gate: each
    #: step shrinks them by ``lr · weight_decay`` of themselves. 0: plain Adam (the paper)
    weight_decay: float = 0.0
    #: after each step the projection is rescaled so that its spectral norm ‖(α/r)·BA‖₂, the
    #: most it can change a key relative to the key's length, is at most this. None: unbounded
    max_norm: float | None = None
    gate_hidden_fraction: float = 0.1
    gate_hidden_min: int = 8
    tau: float = 0.9
    steps: int = 40
    lr: float = 1e-2
    batch: int = 15
    agg_weight: float = 1.0
    #: None: 10 for ``agg="match"`` (relative MSE, see the module doc), the paper's 50000 (MSE)
    #: for ``"direction"``
    consistency_weight: float | None = None
    use_gate: bool = True
    use_norm: bool = True
    abs_agg: bool = False
    #: BCE on the gate (positives → 1, other tokens → 0); 0 = the released code
    gate_loss_weight: float = 1.0
    #: Adam lr of the gate parameters (None: ``lr``)
    gate_lr: float | None = 1e-2
    #: initial bias of the gate's output unit (None: PyTorch's default init, g ≈ 0.5)
    gate_bias_init: float | None = None
    #: the gate reads the raw key divided by its RMS (parameter-free), so it learns at the same
    #: speed whatever the model's key scale; False: the paper's unnormalised raw key
    gate_input_norm: bool = True
    #: every other token of the training sequences is a gate negative ...
    context_negatives: bool = True
    #: the subject's earlier tokens: "negative" (near negatives, see below) or "ignore" (left
    #: out of the gate loss, where the gate tends to open on them and the change to their keys
    #: can break long-context prompts)
    gate_subject_tokens: SubjectTokens = "ignore"
    #: tokens right after the subject token that count as "near" negatives: the gate loss
    #: weighs near negatives (these and the subject's earlier tokens, whose keys resemble the
    #: positive one) as much as all the other ("far") negatives together
    gate_near_after: int = 3
    #: far negatives drawn (at random) into one step's gate loss: they are easy, and the gate
    #: on them is most of a step's cost
    gate_far_tokens: int = 512
    #: the aggregation and consistency losses see ``k + P(k)``, which is what the hard gate
    #: applies at inference where it opens, and the gate learns from its BCE alone; False:
    #: the paper's soft ``k + g·P(k)``, where ``P`` learns to make up for a half-open gate
    #: (``P ≈ (k* − k)/g``) and then overshoots once the hard gate opens fully
    decouple_gate: bool = True
    #: which keys the consistency loss anchors: "prompt" (the paper: the bare prompt's k_o) or
    #: "original" (every key of the original subject: bare prompt, contexts, long passages;
    #: they then leave L_agg, which acts on paraphrases and scrambles only)
    consistency_on: ConsistencyOn = "prompt"
    #: a subject key whose adapted whitened similarity β̃ = k̂ᵀC⁻¹k*/(k*ᵀC⁻¹k*) already reaches
    #: this value retrieves the edit as k* does and leaves L_agg (a further push over-applies
    #: the edit); None: the paper's L_agg
    agg_beta_cap: float | None = 1.0
    #: inference only: a token whose key already retrieves the edit on its own,
    #: β̃(k) = kᵀC⁻¹k*/(k*ᵀC⁻¹k*) ≥ ``beta_guard``, keeps its key even where the gate opens
    #: (REP then moves only keys the plain edit misses: a projection fitted on short prompts can
    #: point away from the edit on a long-context key that already fires it).
    #: None: off (the paper). Like ``tau`` it can be set after training.
    beta_guard: float | None = 0.5
    #: inference only: a token whose key is the edit prompt's own subject key (relative
    #: distance < ``PROMPT_KEY_TOLERANCE``) keeps it, so REP never changes what the plain edit
    #: does on its own prompt (the consistency term, made exact: where the prompt key sits among
    #: its paraphrases' keys a low-rank ``P`` cannot be zero on one and not the others).
    #: Limits: the keys are those of training (a later τ or guard change at a lower layer can
    #: move an upper layer's prompt key), and in a stack each member keeps only its own edit's
    #: prompt key, so another member may still change it. With ``gate_subject_tokens="ignore"``
    #: the prompt's earlier subject tokens keep theirs too (the gate may open there, and in a
    #: multi-layer edit their keys feed the subject token's key at the layers above)
    keep_prompt_key: bool = True
    #: inference only: the adapters act on the prompt's tokens only, never on the answer a
    #: probe scores or the tokens a model generates (the caller declares the prompt with
    #: :func:`repedit.models.spans.declare_prompt`; repedit's scoring and generation do, a
    #: forward without a declaration adapts every token). Why: a token-level gate also opens on
    #: answers that repeat the subject's words, and changing their keys derails the answer.
    #: False: every token (the paper)
    prompt_only: bool = True
    negatives: bool = False
    negative_weight: float = 1.0
    negative_sources: tuple[str, ...] = ("subjects", "text")
    #: negative sequences added to every batch (when ``negatives``)
    negative_batch: int = 4
    #: general-text passages per request used as negatives (``text`` source)
    n_negative_text: int = 4
    #: subjects per request from ``negative_pool`` (half look-alikes of the subject, half at
    #: random; none the evaluation uses) in the edit's prompt and contexts, their tokens "near"
    #: gate negatives (:mod:`repedit.rep.negatives`); independent of ``negatives``. 0: none
    pool_negatives: int = 16
    #: the dataset (a name or a file) ``pool_negatives`` draws subjects from; "auto":
    #: CounterFact when the data folder has it, else none (a warning; ``info["subject_pool"]``
    #: of the training result says which). A named pool that is missing is a DataError
    negative_pool: str = "auto"
    #: which pool subjects, an equal share of each: ``kin`` (same true answer as the edit),
    #: ``lookalike`` (sharing a token piece), ``random``
    pool_kinds: tuple[PoolKind, ...] = ("lookalike", "random")
    long_context: bool = True
    n_long: int = 5
    long_context_length: int = 300
    long_context_unit: LengthUnit = "words"
    long_context_corpus: str | None = None
    #: at most this many scrambles are drawn; the first half train (the harness's split)
    scramble_max: int = 10
    #: generated subject forms trained on as positives (:mod:`repedit.data.augment`: ``case``,
    #: ``spacing``, ``punct``, ``noise``, ``determiner``, ``initials``, ``truncate``; a comma
    #: string is accepted), ``n_augment`` per kind and request, none equal to an evaluation
    #: probe. Empty: none (the paper)
    augment: tuple[str, ...] = GENERATED_FORMS
    n_augment: int = 2
    target: Target = "whitened"
    #: aggregation loss: ``direction`` = the paper's −(k̂/‖k̂‖)·t; ``match`` = ‖k̂ − k*‖²/‖k*‖²
    #: (pull each surface form's key onto the edit's key, so the edit fires once, not β̃ times)
    agg: Agg = "match"
    shared: bool = False
    #: several layers (MEMIT): train them one at a time, lowest first, each on keys read once
    #: through the trained adapters below it (False: all together, keys re-read every step)
    layerwise: bool = True
    #: seeds initialisation, batches, generated forms and pool draws
    seed: int = 0
    #: seeds the subject's scrambles and training passages: it must be the evaluation suite's
    #: ``seed``, so REP's trained half of the scrambles is the suite's trained half (an
    #: evaluation sets it; another value would train on the suite's held-out scrambles)
    forms_seed: int = 0

    def __post_init__(self) -> None:
        for name, kind in _CHOICES.items():
            if getattr(self, name) not in get_args(kind):
                choices = " or ".join(repr(c) for c in get_args(kind))
                raise InvalidRequestError(f"{name} must be {choices}, got {getattr(self, name)!r}")
        if isinstance(self.pool_kinds, str):
            kinds = [k.strip() for k in self.pool_kinds.split(",") if k.strip()]
            self.pool_kinds = tuple(cast(list[PoolKind], kinds))
        bad = set(self.pool_kinds) - set(POOL_KINDS)
        if bad or not self.pool_kinds:
            raise InvalidRequestError(
                f"pool_kinds must be a non-empty list of {', '.join(POOL_KINDS)}; "
                f"got {sorted(bad) or '()'}"
            )
        if isinstance(self.negative_sources, str):
            self.negative_sources = tuple(
                s.strip() for s in self.negative_sources.split(",") if s.strip()
            )
        try:
            self.augment = parse_kinds(self.augment)
        except ValueError as exc:
            raise InvalidRequestError(f"augment: {exc}") from None
        if self.n_augment < 0:
            raise InvalidRequestError(f"n_augment must be >= 0, got {self.n_augment}")
        unknown = set(self.negative_sources) - {"subjects", "neighbourhood", "text"}
        if unknown:
            raise InvalidRequestError(
                f"unknown negative source(s) {sorted(unknown)}; "
                "choose from subjects, neighbourhood, text"
            )
        for name in ("rank", "steps", "batch", "gate_hidden_min", "gate_far_tokens"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.tau < 1.0:
            raise InvalidRequestError(f"tau must be in (0, 1), got {self.tau}")
        if self.beta_guard is not None and not math.isfinite(self.beta_guard):
            raise InvalidRequestError(f"beta_guard must be a finite number, got {self.beta_guard}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0.0):
            raise InvalidRequestError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_norm is not None and not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise InvalidRequestError(f"max_norm must be a positive number, got {self.max_norm}")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidRequestError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def consistency(self) -> float:
        """The consistency weight in effect (``consistency_weight`` or its per-loss default)."""
        if self.consistency_weight is not None:
            return float(self.consistency_weight)
        return 10.0 if self.agg == "match" else 50000.0

    def gate_hidden(self, d_mlp: int) -> int:
        return max(self.gate_hidden_min, math.floor(self.gate_hidden_fraction * d_mlp))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["negative_sources"] = list(self.negative_sources)
        out["augment"] = list(self.augment)
        out["pool_kinds"] = list(self.pool_kinds)
        return out


def prompt_key_hits(x: torch.Tensor, prompt_k: torch.Tensor) -> torch.Tensor:
    """Tokens of ``x`` (``[..., d]``) within ``PROMPT_KEY_TOLERANCE`` (relative) of a row of
    ``prompt_k``. Differences are taken directly, one stored row at a time: ``torch.cdist``'s
    matmul shortcut (used above 25 rows) has errors of the tolerance's size."""
    hit = torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
    for row in prompt_k:
        hit |= (x - row).norm(dim=-1) < PROMPT_KEY_TOLERANCE * row.norm()
    return hit


def released_config(**overrides: Any) -> RepConfig:
    """The released code's REP: untrained gate at g ≈ 0.5, no long-context training.

    Its gate training, losses and targets, without long-context training; dropout off at
    inference, every adapted layer trained and batches without repeats stay as repedit has
    them. Use it to show that the released gate does not open (``docs/method.md``).
    """
    base = {
        **LISTED_FORMS,
        "gate_loss_weight": 0.0,
        "decouple_gate": False,
        "gate_lr": None,
        "context_negatives": False,
        "gate_input_norm": False,
        "agg_beta_cap": None,
        "long_context": False,
        "target": "released",
        "agg": "direction",
        "steps": 10,
        "lr": 5e-4,
        "beta_guard": None,
        "keep_prompt_key": False,
        "consistency_weight": 50000.0,
    }
    return RepConfig().replace(**{**base, **overrides})


class _InferenceSettings:
    """τ and the β̃ guard: inference-only settings, kept in ``cfg`` so that a saved or exported
    adapter gates as it did here, and settable after training. On a :class:`RepStack` they
    reach every member too, since each member gates with its own config."""

    cfg: RepConfig

    @property
    def tau(self) -> float:
        """The hard-gate threshold, ``cfg.tau``."""
        return self.cfg.tau

    @tau.setter
    def tau(self, value: float) -> None:
        self._set(tau=float(value))

    @property
    def beta_guard(self) -> float | None:
        """``cfg.beta_guard`` (None: no guard)."""
        return self.cfg.beta_guard

    @beta_guard.setter
    def beta_guard(self, value: float | None) -> None:
        self._set(beta_guard=None if value is None else float(value))

    def _set(self, **values: Any) -> None:
        self.cfg = self.cfg.replace(**values)
        for member in getattr(self, "adapters", ()):
            member._set(**values)


class RepAdapter(_InferenceSettings, nn.Module):
    """One layer's adapter; ``forward(k)`` maps keys ``[..., d_mlp]`` to adapted keys.

    Works in float32 internally and returns the key's dtype. In ``eval()`` mode a token whose
    gate is shut gets its key back unchanged, bit for bit.
    """

    def __init__(self, d_mlp: int, cfg: RepConfig | None = None):
        super().__init__()
        self.cfg = cfg or RepConfig()
        self.d_mlp = d_mlp
        self.scale = self.cfg.alpha / self.cfg.rank
        self.dropout = nn.Dropout(self.cfg.dropout)
        self.A = nn.Linear(d_mlp, self.cfg.rank, bias=False)
        self.B = nn.Linear(self.cfg.rank, d_mlp, bias=False)
        hidden = self.cfg.gate_hidden(d_mlp)
        self.gate_in = nn.Linear(d_mlp, hidden)
        self.gate_act = nn.GELU()
        self.gate_out = nn.Linear(hidden, 1)
        # rows w = C⁻¹k*/(k*ᵀC⁻¹k*) of the edits this adapter serves (β̃(k) = k·w), for
        # ``cfg.beta_guard``; set by training (:meth:`set_guard`), saved with the weights
        self.register_buffer("guard_w", torch.zeros(0, d_mlp))
        # the edit prompts' own subject keys k_o (``cfg.keep_prompt_key``), set by training
        self.register_buffer("prompt_k", torch.zeros(0, d_mlp))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)
        self.gate_in.reset_parameters()
        self.gate_out.reset_parameters()
        if self.cfg.gate_bias_init is not None:
            with torch.no_grad():
                self.gate_out.bias.fill_(self.cfg.gate_bias_init)

    def set_guard(self, w: torch.Tensor) -> None:
        """Store the edits' β̃ directions ``w`` (``[n, d_mlp]`` or ``[d_mlp]``) for the guard."""
        w = w.detach().reshape(-1, self.d_mlp)
        self.guard_w = w.to(device=self.A.weight.device, dtype=torch.float32).clone()

    def set_prompt_keys(self, k_o: torch.Tensor) -> None:
        """Store the edit prompts' own subject keys (``[n, d_mlp]``) for ``keep_prompt_key``."""
        k_o = k_o.detach().reshape(-1, self.d_mlp)
        self.prompt_k = k_o.to(device=self.A.weight.device, dtype=torch.float32).clone()

    def guarded(self, k: torch.Tensor) -> torch.Tensor | None:
        """Tokens kept as they are although the gate may open (bool ``[...]``): the β̃ guard
        and the edit prompt's own key; None when neither applies (training, off, unset)."""
        if self.training:
            return None
        kept = None
        x = k.float()
        if self.cfg.beta_guard is not None and self.guard_w.shape[0]:
            kept = (x @ self.guard_w.float().T).amax(-1) >= self.cfg.beta_guard
        if self.cfg.keep_prompt_key and self.prompt_k.shape[0]:
            near = prompt_key_hits(x, self.prompt_k.float())
            kept = near if kept is None else kept | near
        return kept

    # -- parts -----------------------------------------------------------------------------
    def projection_parameters(self) -> list[torch.Tensor]:
        return [self.A.weight, self.B.weight]

    def gate_parameters(self) -> list[torch.Tensor]:
        return [*self.gate_in.parameters(), *self.gate_out.parameters()]

    def projection_norm(self) -> torch.Tensor:
        """The spectral norm of ``P = (α/r)·BA`` (a float32 scalar), from ``r × r`` factors:
        with ``Aᵀ = QR`` (Q orthonormal), ``BA = (B Rᵀ) Qᵀ`` has the singular values of ``B Rᵀ``."""
        a, b = self.A.weight.detach().float(), self.B.weight.detach().float()
        r = torch.linalg.qr(a.T, mode="reduced").R
        return torch.linalg.matrix_norm(b @ r.T, ord=2) * self.scale

    @torch.no_grad()
    def clip_projection(self, max_norm: float) -> None:
        """Rescale ``B`` so that :meth:`projection_norm` is at most ``max_norm``."""
        norm = float(self.projection_norm())
        if norm > max_norm:
            self.B.weight.mul_(max_norm / norm)

    def project(self, k: torch.Tensor) -> torch.Tensor:
        """``P(k)`` in float32 (dropout active in training mode)."""
        x = k.float()
        return self.B(self.A(self.dropout(x))) * self.scale

    def gate_logit(self, k: torch.Tensor) -> torch.Tensor:
        """The gate's pre-sigmoid output, ``[...]`` (float32, from the raw key)."""
        x = k.float()
        if self.cfg.gate_input_norm:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-12)
        return self.gate_out(self.gate_act(self.gate_in(x))).squeeze(-1)

    def gate(self, k: torch.Tensor) -> torch.Tensor:
        """Soft gate values in (0, 1), ``[...]`` (one per token)."""
        return torch.sigmoid(self.gate_logit(k))

    def open_mask(self, k: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor | None:
        """Eval mode: where the change applies (bool ``[...]``: hard gate, less the guarded
        tokens); None where it applies everywhere (no gate, no guard)."""
        mask = (g > self.tau) if g is not None else None
        kept = self.guarded(k)
        if kept is not None:
            mask = ~kept if mask is None else mask & ~kept
        return mask

    def delta(self, k: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 change ``k̂ − k``: soft-gated in training, hard-gated in eval mode."""
        p = self.project(k)
        if self.cfg.use_gate and g is None:
            g = self.gate(k)
        if self.training:
            return p if g is None else g.unsqueeze(-1) * p
        mask = self.open_mask(k, g)
        if mask is None:
            return p
        return torch.where(mask.unsqueeze(-1), p, torch.zeros_like(p))

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        return self.forward_with_gate(k)[0]

    def forward_with_gate(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(k̂, soft gate values or None without a gate)``."""
        g = self.gate(k) if self.cfg.use_gate else None
        if not self.training:
            mask = self.open_mask(k, g)
            if mask is not None and not bool(mask.any()):
                return k, g  # every token shut: the key itself, untouched
        return (k.float() + self.delta(k, g)).to(k.dtype), g

    def extra_repr(self) -> str:
        return (
            f"d_mlp={self.d_mlp}, rank={self.cfg.rank}, scale={self.scale:g}, "
            f"gate_hidden={self.gate_in.out_features}, tau={self.tau}, "
            f"use_gate={self.cfg.use_gate}, beta_guard={self.cfg.beta_guard}"
        )


class RepStack(_InferenceSettings, nn.Module):
    """Several adapters on one layer (one per edit of a batch): ``k + Σᵢ gᵢ(k)·Pᵢ(k)``.

    Every adapter reads the same raw key; the reported gate is the largest of theirs.
    """

    def __init__(self, adapters: list[RepAdapter]):
        super().__init__()
        if not adapters:
            raise InvalidRequestError("RepStack needs at least one adapter")
        self.adapters = nn.ModuleList(adapters)
        self.cfg = adapters[0].cfg
        self.d_mlp = adapters[0].d_mlp

    def __len__(self) -> int:
        return len(self.adapters)

    @property
    def members(self) -> list[RepAdapter]:
        """The stacked adapters (``self.adapters`` registers them as submodules)."""
        return cast(list[RepAdapter], list(self.adapters))

    def gate(self, k: torch.Tensor) -> torch.Tensor:
        return torch.stack([a.gate(k) for a in self.members]).amax(0)

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        return self.forward_with_gate(k)[0]

    def forward_with_gate(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        gates = [a.gate(k) if a.cfg.use_gate else None for a in self.members]
        every = [g for g in gates if g is not None]
        top = torch.stack(every).amax(0) if every else None
        if not self.training:
            masks = [a.open_mask(k, g) for a, g in zip(self.members, gates, strict=True)]
            if all(m is not None and not bool(m.any()) for m in masks):
                return k, top
        out = k.float()
        for a, g in zip(self.members, gates, strict=True):
            out = out + a.delta(k, g)
        return out.to(k.dtype), top


Adapter = RepAdapter | RepStack


def stack_adapters(members: Sequence[RepAdapter]) -> Adapter:
    """One layer's adapter from its members (one per edit): the adapter itself when alone,
    else a :class:`RepStack` in eval mode."""
    return members[0] if len(members) == 1 else RepStack(list(members)).eval()


def make_adapters(
    d_mlp: int, layers: list[int], cfg: RepConfig, *, device: Any = None, seed_offset: int = 0
) -> dict[int, RepAdapter]:
    """Fresh, seeded adapters (identity at start) for ``layers``, float32 on ``device``."""
    out = {}
    with torch.random.fork_rng(devices=[]):
        for i, layer in enumerate(sorted(layers)):
            torch.manual_seed(cfg.seed * 1_000_003 + seed_offset * 1009 + i)
            out[layer] = RepAdapter(d_mlp, cfg).to(device=device, dtype=torch.float32)
    return out


# the file format lives in its own module; these names stay importable from here
from repedit.rep.adapter_file import load_adapters as load_adapters  # noqa: E402
from repedit.rep.adapter_file import read_adapter_metadata as read_adapter_metadata  # noqa: E402
from repedit.rep.adapter_file import save_adapters as save_adapters  # noqa: E402
