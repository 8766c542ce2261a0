"""Dynamic Prior Mapping (DPM, paper Sec. III-D), the released code's mapping, and their siblings.

DPM couples the two tasks in text space. Given expression text features ``T_exp [K, D]``, AU text
features ``T_au [M, D]`` and a FACS prior ``P [K, M]`` (:func:`facelayers.facs.prior_matrix`)::

    A = W_au->exp map [K, M],  B = W_exp->au map [M, K]       (maps())
    T_exp' = T_exp + alpha * A @ T_au                          (eqs. 21, 23)
    T_au'  = T_au  + beta  * B @ T_exp                         (eqs. 22, 24)

Every mapping here is this residual update (one base class); they differ in how the maps are
parameterised, one class each:

:class:`DynamicPriorMapping` -- the paper (eqs. 19-24)
    ``W0 = Normalize_row(P)`` (eq. 19), ``W_exp->au,0 = W0^T`` (eq. 20); both are free learnable
    matrices and the maps are ``A = Softmax_row(W_au->exp / tau_m)``, ``B = Softmax_row(W_exp->au /
    tau_m)`` with ``tau_m = 0.01``; ``alpha``, ``beta`` are plain learnable scalars (init 0.1).

    *Empty rows.* A row of ``P`` with no AU (Table S4's neutral: "no significant action units") cannot
    be row-normalised. With ``empty_rows="zero"`` (default) that row of ``A`` is fixed to zero, so the
    residual (eq. 23) adds nothing to the neutral prototype: the prior says no AU composes it, and
    a row-softmax would otherwise force it to take the mean of all AU prototypes (1/M each), i.e.
    "every AU a little active", the opposite of neutral. The same rule applies to ``B``: an AU that
    no expression in ``P`` uses (e.g. AU17, AU24 of BP4D under Table S4) has an all-zero row in
    ``W0^T`` and receives nothing from the expressions. ``empty_rows="uniform"`` is the literal
    reading of eq. 19 with a safe normalisation: the row starts uniform (1/M) and is learned like any
    other. ``init="random"`` uses no prior knowledge, so every row is learned.

:class:`ReleasePriorMapping` -- the released SSM code (``ssm/models/bp4d.py`` / ``disfa.py``, ``_compute_maps``)
    ``A = m_row * softmax_row(log(P + eps) + Delta_A)`` where ``m_row = P.sum(1)`` keeps each row's
    prior mass, ``Delta`` starts at zero, so ``A = P`` at initialisation; ``B`` likewise over ``P^T``
    (row masses ``P.sum(0)``). Rows listed in ``fixed_rows`` (the release fixes neutral; built by
    :meth:`ReleasePriorMapping.from_facs` by default) stay at the prior in both directions:
    ``A[k] = P[k]``, ``B[:, k] = P[k]^T``, and the other entries of each ``B`` row share the
    remaining mass. ``alpha = sigmoid(a)``, ``beta = sigmoid(b)`` with ``a, b`` initialised to
    ``logit(0.1)``, and the fused features are L2-renormalised.

:class:`LinearSemanticMapping`, :class:`MLPSemanticMapping` -- paper Table VII "Linear" / "MLP"
    an unconstrained learned linear map / two-layer MLP along the label axis, no prior (the paper
    gives no further detail, this is the direct reading).

Options of the prior-based maps: ``learnable=False`` keeps the maps fixed (registered as buffers;
paper Table VII "Frozen"), ``dual=False`` ties ``B = A^T`` (paper Table VI "w/o Dual"),
``init="random"`` starts from a random matrix instead of the prior (Table VI "R init.").

:func:`build_prior_mapping` picks the class by name (``variant="paper" | "ssm_release" | "linear" |
"mlp"``); ``DynamicPriorMapping(prior, variant="ssm_release", ...)`` and
``DynamicPriorMapping.from_facs(..., variant="ssm_release")`` still work and return a
:class:`ReleasePriorMapping` (compatibility with the single-class API this module had).

Examples::

    >>> from facelayers import facs, DynamicPriorMapping
    >>> P = facs.prior_matrix(facs.EXPRESSIONS_7, facs.BP4D_AUS)
    >>> dpm = DynamicPriorMapping(P)
    >>> t_exp, t_au = torch.randn(7, 512), torch.randn(12, 512)
    >>> t_exp2, t_au2 = dpm(t_exp, t_au)
    >>> A, B = dpm.maps()  # [7, 12], [12, 7]
    >>> from facelayers.prior_mapping import ReleasePriorMapping
    >>> rel = ReleasePriorMapping.from_facs(facs.EXPRESSIONS_7, facs.BP4D_AUS)  # neutral fixed
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import facs

__all__ = [
    "DPM_VARIANTS",
    "MAPPING_VARIANTS",
    "DynamicPriorMapping",
    "ReleasePriorMapping",
    "LinearSemanticMapping",
    "MLPSemanticMapping",
    "build_prior_mapping",
]

#: The prior-based map parameterisations (``variant=`` of :class:`DynamicPriorMapping` / :func:`build_prior_mapping`).
DPM_VARIANTS: tuple[str, ...] = ("paper", "ssm_release")
#: Every name :func:`build_prior_mapping` accepts.
MAPPING_VARIANTS: tuple[str, ...] = ("paper", "ssm_release", "linear", "mlp")
_INITS = ("prior", "random")
_EMPTY_ROWS = ("zero", "uniform")


def _check_text_pair(t_exp: Tensor, t_au: Tensor, k: int, m: int) -> None:
    """Metadata-only checks (no host sync)."""
    if not isinstance(t_exp, Tensor) or not isinstance(t_au, Tensor):
        raise TypeError(
            f"t_exp and t_au must be Tensors (expected Tensor, Tensor, got {type(t_exp).__name__} "
            f"and {type(t_au).__name__})"
        )
    if t_exp.ndim != 2 or t_au.ndim != 2:
        raise ValueError(
            f"t_exp and t_au must be matrices (expected t_exp [K={k}, D] and t_au [M={m}, D], "
            f"got shapes {tuple(t_exp.shape)} and {tuple(t_au.shape)})"
        )
    if t_exp.shape[0] != k or t_au.shape[0] != m:
        raise ValueError(
            f"this mapping was built for K={k} expressions and M={m} AUs (expected t_exp [K, D] and "
            f"t_au [M, D], got t_exp {tuple(t_exp.shape)} and t_au {tuple(t_au.shape)})"
        )
    if t_exp.shape[1] != t_au.shape[1]:
        raise ValueError(
            f"t_exp and t_au must share the feature size D (expected equal last dimensions, "
            f"got t_exp {tuple(t_exp.shape)} and t_au {tuple(t_au.shape)})"
        )


def _row_normalize(p: Tensor) -> Tensor:
    s = p.sum(dim=1, keepdim=True)
    return torch.where(s > 0, p / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(p))


def _scalar(learnable: bool, module: nn.Module, name: str, factory: dict) -> None:
    t = torch.empty((), **factory)
    if learnable:
        module.register_parameter(name, nn.Parameter(t))
    else:
        module.register_buffer(name, t)


def _factory(device: torch.device | str | None, dtype: torch.dtype | None) -> dict:
    return {"device": device, "dtype": dtype if dtype is not None else torch.get_default_dtype()}


def _check_prior(prior: Tensor) -> Tensor:
    """The prior as a float64 CPU copy (checked once, at construction)."""
    if not isinstance(prior, Tensor):
        prior = torch.as_tensor(prior)
    if prior.ndim != 2 or prior.shape[0] < 1 or prior.shape[1] < 1:
        raise ValueError(f"prior must be a non-empty matrix (expected shape [K, M], got shape {tuple(prior.shape)})")
    p = prior.detach().to("cpu", torch.float64)
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError(
            f"prior must be finite and non-negative (expected entries >= 0, got values in "
            f"[{float(p.nan_to_num(nan=-math.inf).min())}, {float(p.max())}])"
        )
    return p


def _check_choice(name: str, val: object, choices: tuple[str, ...]) -> None:
    if val not in choices:
        raise ValueError(f"{name} is unknown (expected one of {choices}, got {val!r})")


def _finite_factor(name: str, value: float) -> float:
    """``float(value)`` for a finite real ``alpha`` / ``beta`` initial value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number (expected e.g. 0.1, got {value!r})")
    return float(value)

class _ResidualSemanticMapping(nn.Module):
    """Residual text fusion shared by every mapping: ``t_exp + alpha * f_a(t_au)``, ``t_au + beta * f_b(t_exp)``.

    Subclasses set ``num_expressions``, ``num_aus``, ``renormalize`` (via :meth:`_init_base`), expose
    ``alpha`` and ``beta`` (effective values) and implement :meth:`_residuals`.
    """

    num_expressions: int
    num_aus: int
    renormalize: bool

    def _init_base(self, num_expressions: int, num_aus: int, renormalize: bool) -> None:
        for name, val in (("num_expressions", num_expressions), ("num_aus", num_aus)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int (expected an int >= 1, got {val!r})")
        self.num_expressions, self.num_aus = int(num_expressions), int(num_aus)
        self.renormalize = bool(renormalize)

    def _residuals(self, t_exp: Tensor, t_au: Tensor) -> tuple[Tensor, Tensor]:
        """``(f_a(t_au) [K, D], f_b(t_exp) [M, D])``."""
        raise NotImplementedError

    def forward(self, t_exp: Tensor, t_au: Tensor) -> tuple[Tensor, Tensor]:
        """Fuse the two tasks' text features (paper eqs. 21-24).

        Args:
            t_exp: expression text features ``[K, D]``.
            t_au: AU text features ``[M, D]``.

        Returns:
            ``(t_exp + alpha * f_a(t_au), t_au + beta * f_b(t_exp))`` (``f_a(t) = A @ t`` for the
            map-based classes), each L2-normalised when ``renormalize``.
        """
        _check_text_pair(t_exp, t_au, self.num_expressions, self.num_aus)
        r_exp, r_au = self._residuals(t_exp, t_au)
        new_exp = t_exp + self.alpha.to(t_exp.dtype) * r_exp
        new_au = t_au + self.beta.to(t_au.dtype) * r_au
        if self.renormalize:
            new_exp = F.normalize(new_exp, dim=-1)
            new_au = F.normalize(new_au, dim=-1)
        return new_exp, new_au


class _PriorMapBase(_ResidualSemanticMapping):
    """Map-based residual mapping (``f_a(t) = A @ t``, ``f_b(t) = B @ t``) built around a prior ``P``."""

    def maps(self) -> tuple[Tensor, Tensor]:
        """The current maps ``(A = W_au->exp [K, M], B = W_exp->au [M, K])`` as used in forward."""
        raise NotImplementedError

    def _residuals(self, t_exp: Tensor, t_au: Tensor) -> tuple[Tensor, Tensor]:
        a, b = self.maps()
        return a.to(t_au.dtype) @ t_au, b.to(t_exp.dtype) @ t_exp

    def _init_prior(
        self, prior: Tensor, learnable: bool, dual: bool, init: str, learnable_factors: bool,
        renormalize: bool, factory: dict,
    ) -> None:
        _check_choice("init", init, _INITS)
        p = _check_prior(prior)
        k, m = p.shape
        self._init_base(k, m, renormalize)
        self.learnable = bool(learnable)
        self.dual = bool(dual)
        self.init = init
        self.learnable_factors = bool(learnable_factors)
        self._prior_cpu = p  # plain attribute: reset_parameters() restores buffers from it
        self.register_buffer("prior", torch.empty(k, m, **factory))

    def _register_maps(self, prefix: str, factory: dict, anchor: bool) -> None:
        """Map state ``{prefix}_au2exp [K, M]`` (and ``{prefix}_exp2au [M, K]`` with ``dual``; parameters,
        or buffers when not ``learnable``), the ``live_*`` row masks, an optional ``anchor [K, M]``
        buffer and the scalars ``alpha_param``, ``beta_param``; filled by ``reset_parameters``."""
        k, m = self.num_expressions, self.num_aus
        shapes = {f"{prefix}_au2exp": (k, m)} | ({f"{prefix}_exp2au": (m, k)} if self.dual else {})
        for name, shape in shapes.items():
            t = torch.empty(shape, **factory)
            if self.learnable:
                self.register_parameter(name, nn.Parameter(t))
            else:
                self.register_buffer(name, t)
        self.register_buffer("live_au2exp", torch.empty(k, dtype=torch.bool, device=factory["device"]))
        self.register_buffer("live_exp2au", torch.empty(m, dtype=torch.bool, device=factory["device"]))
        if anchor:
            self.register_buffer("anchor", torch.empty(k, m, **factory))
        _scalar(self.learnable_factors, self, "alpha_param", factory)
        _scalar(self.learnable_factors, self, "beta_param", factory)


class _VariantDispatch(type):
    """``DynamicPriorMapping(prior, variant=...)`` compatibility: build the class the variant names.

    Only calls on :class:`DynamicPriorMapping` itself are redirected; ``variant="paper"`` (or none)
    builds the paper class, whose constructor has the paper's arguments only.
    """

    def __call__(cls, *args: Any, variant: str | None = None, fixed_rows: Sequence[int] | None = None, **kwargs: Any):
        if cls is not DynamicPriorMapping:
            if variant is not None:
                kwargs["variant"] = variant
            if fixed_rows is not None:
                kwargs["fixed_rows"] = fixed_rows
            return super().__call__(*args, **kwargs)
        if variant is None or variant == "paper":
            if fixed_rows:
                raise ValueError(
                    "fixed_rows applies to variant='ssm_release' (ReleasePriorMapping); the paper's "
                    f"DPM handles all-zero prior rows through empty_rows (expected no fixed_rows, got {tuple(fixed_rows)})"
                )
            return super().__call__(*args, **kwargs)
        _check_choice("variant", variant, DPM_VARIANTS)
        if fixed_rows is not None:
            kwargs["fixed_rows"] = fixed_rows
        return build_prior_mapping(*args, variant=variant, **kwargs)


class DynamicPriorMapping(_PriorMapBase, metaclass=_VariantDispatch):
    """Dynamic Prior Mapping between expression and AU text features, as the paper defines it (eqs. 19-24).

    Args:
        prior: FACS prior ``P [K, M]`` (rows: expressions, columns: AUs), non-negative, e.g.
            :func:`facelayers.facs.prior_matrix`. Copied.
        tau: ``tau_m``, temperature of the row-softmax (paper: 0.01).
        alpha: initial ``alpha`` (weight of the AU->expression residual; paper: 0.1).
        beta: initial ``beta`` (weight of the expression->AU residual).
        learnable: learn the maps. ``False`` registers them as buffers (Table VII "Frozen").
        dual: learn ``B`` independently (eq. 20's "updated independently"). ``False`` ties ``B =
            A^T`` at every step.
        init: ``"prior"`` (eqs. 19-20) or ``"random"`` (uniform ``[0, 1)`` entries drawn at
            :meth:`reset_parameters`, then row-normalised).
        empty_rows: how all-zero rows of ``P`` (and of ``P^T``) are handled: ``"zero"`` (map row
            fixed to zero) or ``"uniform"`` (start uniform, learned).
        learnable_factors: learn ``alpha`` and ``beta`` (otherwise buffers).
        renormalize: L2-normalise the fused features (the paper does not).
        device: device of parameters and buffers.
        dtype: floating dtype of parameters and buffers.

    Compatibility: ``DynamicPriorMapping(prior, variant="ssm_release", ...)`` returns a
    :class:`ReleasePriorMapping` (see :func:`build_prior_mapping`); ``variant="paper"`` is this class.

    Shapes:
        ``forward(t_exp [K, D], t_au [M, D]) -> (t_exp' [K, D], t_au' [M, D])``;
        ``maps() -> (A [K, M], B [M, K])``.

    Attributes:
        prior: the prior ``P [K, M]`` (buffer).
        weight_au2exp, weight_exp2au: ``W_au->exp [K, M]`` and ``W_exp->au [M, K]`` (the latter only
            with ``dual``); parameters, or buffers when not ``learnable``.
        alpha_param, beta_param: the scalars; :attr:`alpha`, :attr:`beta` are the same values.
        live_au2exp, live_exp2au: bool ``[K]`` / ``[M]``: rows that are learned (``False``: empty rows).
    """

    variant = "paper"
    fixed_rows: tuple[int, ...] = ()

    def __init__(
        self,
        prior: Tensor,
        *,
        tau: float = 0.01,
        alpha: float = 0.1,
        beta: float = 0.1,
        learnable: bool = True,
        dual: bool = True,
        init: str = "prior",
        empty_rows: str = "zero",
        learnable_factors: bool = True,
        renormalize: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_choice("empty_rows", empty_rows, _EMPTY_ROWS)
        if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be positive (expected a finite number > 0, got {tau!r})")
        factory = _factory(device, dtype)
        self._init_prior(prior, learnable, dual, init, learnable_factors, renormalize, factory)
        self.tau = float(tau)
        self.alpha_init, self.beta_init = _finite_factor("alpha", alpha), _finite_factor("beta", beta)
        self.empty_rows = empty_rows
        self._register_maps("weight", factory, anchor=False)
        self.reset_parameters()

    @classmethod
    def from_facs(
        cls,
        expressions: Sequence[str],
        aus: Sequence[int | str],
        *,
        source: str | None = None,
        variant: str = "paper",
        fix_neutral: bool | None = None,
        **kwargs: Any,
    ) -> _PriorMapBase:
        """Build from vocabularies through :func:`facelayers.facs.prior_matrix`.

        Args:
            expressions: the ``K`` expression names.
            aus: the ``M`` AU codes.
            source: prior source (default ``"table_s4"``; ``"ssm_release"`` for that variant).
            variant: ``"paper"`` (this class) or ``"ssm_release"`` (compatibility: the same as
                :meth:`ReleasePriorMapping.from_facs`).
            fix_neutral: ``"ssm_release"`` only, see :meth:`ReleasePriorMapping.from_facs`.
            **kwargs: other constructor arguments.
        """
        _check_choice("variant", variant, DPM_VARIANTS)
        if variant == "ssm_release":
            kwargs = _drop_paper_only(kwargs)
            return ReleasePriorMapping.from_facs(
                expressions, aus, source=source or "ssm_release", fix_neutral=fix_neutral, **kwargs
            )
        if fix_neutral:
            raise ValueError(
                "fix_neutral applies to variant='ssm_release' (ReleasePriorMapping) "
                f"(expected fix_neutral=None or False for the paper's DPM, got {fix_neutral!r})"
            )
        names = facs.check_vocabulary(expressions, "expression")
        prior = facs.prior_matrix(names, aus, source=source or "table_s4")
        return cls(prior, **kwargs)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the maps from the prior (or randomly) and ``alpha``, ``beta`` to their inits."""
        p = self._prior_cpu
        k, m = p.shape
        self.prior.copy_(p)
        base = torch.rand(k, m, dtype=torch.float64) if self.init == "random" else p
        w0 = _row_normalize(base)  # eq. 19
        live_a = base.sum(1) > 0
        if self.empty_rows == "uniform":
            w0 = torch.where(live_a[:, None], w0, torch.full_like(w0, 1.0 / m))
            live_a = torch.ones_like(live_a)
        w0t = w0.t()  # eq. 20: W_exp->au,0 = W0^T
        live_b = w0t.sum(1) > 0
        if self.empty_rows == "uniform":
            w0t = torch.where(live_b[:, None], w0t, torch.full_like(w0t, 1.0 / k))
            live_b = torch.ones_like(live_b)
        self.weight_au2exp.copy_(w0)
        if self.dual:
            self.weight_exp2au.copy_(w0t)
        self.live_au2exp.copy_(live_a)
        self.live_exp2au.copy_(live_b)
        self.alpha_param.fill_(self.alpha_init)
        self.beta_param.fill_(self.beta_init)

    @property
    def alpha(self) -> Tensor:
        """``alpha`` (a plain scalar in the paper)."""
        return self.alpha_param

    @property
    def beta(self) -> Tensor:
        """``beta`` (a plain scalar in the paper)."""
        return self.beta_param

    def maps(self) -> tuple[Tensor, Tensor]:
        """The current maps ``(A = W_au->exp [K, M], B = W_exp->au [M, K])`` as used in forward."""
        a = torch.softmax(self.weight_au2exp / self.tau, dim=1)
        a = torch.where(self.live_au2exp.unsqueeze(1), a, torch.zeros_like(a))
        if not self.dual:
            return a, a.t()
        b = torch.softmax(self.weight_exp2au / self.tau, dim=1)
        b = torch.where(self.live_exp2au.unsqueeze(1), b, torch.zeros_like(b))
        return a, b

    def extra_repr(self) -> str:
        return (
            f"num_expressions={self.num_expressions}, num_aus={self.num_aus}, variant={self.variant!r}, "
            f"tau={self.tau}, alpha={self.alpha_init}, beta={self.beta_init}, learnable={self.learnable}, "
            f"dual={self.dual}, init={self.init!r}, empty_rows={self.empty_rows!r}, renormalize={self.renormalize}"
        )


class ReleasePriorMapping(_PriorMapBase):
    """The released SSM code's prior mapping (``Bp4dSSM`` / ``DisfaSSM._compute_maps``): anchored logit offsets.

    ``A = m_row * softmax_row(log(P + eps) + Delta_A)`` with ``m_row = P.sum(1)``, so ``A = P`` at
    initialisation (``Delta = 0``); ``B`` likewise over ``P^T``; rows in ``fixed_rows`` are kept at
    the prior in both directions (``A[k] = P[k]``, ``B[:, k] = P[k]^T``; the other entries of each
    ``B`` row share the remaining mass ``P.sum(0) - P[fixed].sum(0)``); ``alpha = sigmoid(a)``,
    ``beta = sigmoid(b)`` with ``a = b = logit(0.1)`` at initialisation; fused features are
    L2-renormalised. The release's BP4D and DISFA classes compute the same maps (BP4D clamps the
    remaining mass at 0, which never binds for non-negative priors).

    Numerics: the map is computed as ``P * exp(Delta - max Delta) * (m / sum)``, the release's formula
    rearranged, so that ``A == P`` bit-exactly at initialisation; it differs from the release's
    literal ``softmax(log(P + eps) + Delta)`` by the ``eps`` on non-zero entries (relative ``~eps /
    P``, 5e-7 for the release's 0.02 entries). Zero entries of ``P`` use ``eps`` in place of
    ``log(0)``.

    Args:
        prior: ``P [K, M]``, non-negative (the release's 1.0 / 0.02 tables:
            ``facs.prior_matrix(..., source="ssm_release")``). Copied.
        alpha: initial ``alpha`` after the sigmoid gate, in ``(0, 1)`` (release: 0.1).
        beta: initial ``beta`` after the sigmoid gate, in ``(0, 1)`` (release: 0.1).
        learnable: learn the offsets ``Delta`` (otherwise buffers, maps fixed at the anchor).
        dual: learn ``B`` independently; ``False`` ties ``B = A^T``.
        init: ``"prior"`` or ``"random"`` (a uniform ``[0, 1)`` matrix replaces ``P`` as the softmax
            anchor and row masses; ``fixed_rows`` still use ``P``).
        fixed_rows: expression rows kept at the prior in both directions. No index is assumed here;
            :meth:`from_facs` fixes the expressions without AUs (neutral), as the release does.
        learnable_factors: learn the gate logits ``a``, ``b`` (otherwise buffers).
        renormalize: L2-normalise the fused features (release: yes).
        eps: the ``eps`` of ``log(P + eps)`` (release: 1e-8).
        device: device of parameters and buffers.
        dtype: floating dtype of parameters and buffers.

    Shapes:
        ``forward(t_exp [K, D], t_au [M, D]) -> (t_exp' [K, D], t_au' [M, D])``;
        ``maps() -> (A [K, M], B [M, K])``.

    Attributes:
        prior: ``P [K, M]`` (buffer; the release's ``init_map``).
        anchor: the matrix the softmax is anchored at (``P``, or random; buffer).
        delta_au2exp, delta_exp2au: ``Delta_A [K, M]``, ``Delta_B [M, K]`` (the release's
            ``delta_map1``, ``delta_map2``).
        alpha_param, beta_param: the gate logits (the release's ``alpha``, ``beta``); :attr:`alpha`,
            :attr:`beta` are the sigmoids.
        live_au2exp: bool ``[K]``, ``False`` at ``fixed_rows``. live_exp2au: bool ``[M]`` (all True).
    """

    variant = "ssm_release"

    def __init__(
        self,
        prior: Tensor,
        *,
        alpha: float = 0.1,
        beta: float = 0.1,
        learnable: bool = True,
        dual: bool = True,
        init: str = "prior",
        fixed_rows: Sequence[int] = (),
        learnable_factors: bool = True,
        renormalize: bool = True,
        eps: float = 1e-8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("alpha", alpha), ("beta", beta)):
            if not 0.0 < v < 1.0:
                raise ValueError(
                    f"the release gates {name} with a sigmoid: need 0 < {name} < 1 (expected a value in (0, 1), got {v})"
                )
        if not eps > 0:
            raise ValueError(f"eps must be positive (expected > 0, got {eps})")
        factory = _factory(device, dtype)
        self._init_prior(prior, learnable, dual, init, learnable_factors, renormalize, factory)
        k = self.num_expressions
        fixed = tuple(sorted({int(r) for r in fixed_rows}))
        bad = [r for r in fixed if not 0 <= r < k]
        if bad:
            raise ValueError(f"fixed_rows {bad} out of range (expected indices in [0, {k}) for K={k} expressions, got {list(fixed)})")
        self.fixed_rows = fixed
        self.alpha_init, self.beta_init = _finite_factor("alpha", alpha), _finite_factor("beta", beta)
        self.eps = float(eps)
        self._register_maps("delta", factory, anchor=True)
        self.reset_parameters()

    @classmethod
    def from_facs(
        cls,
        expressions: Sequence[str],
        aus: Sequence[int | str],
        *,
        source: str = "ssm_release",
        fix_neutral: bool | None = None,
        fixed_rows: Sequence[int] = (),
        **kwargs: Any,
    ) -> ReleasePriorMapping:
        """Build from vocabularies through :func:`facelayers.facs.prior_matrix`, neutral fixed as in the release.

        Args:
            expressions: the ``K`` expression names.
            aus: the ``M`` AU codes.
            source: prior source (default the release's tables, ``"ssm_release"``).
            fix_neutral: fix the rows of expressions whose FACS composition has no AU (Table S4:
                neutral). ``None`` (default): fix them when there are any; ``True``: there must be
                one; ``False``: fix none.
            fixed_rows: further rows to fix.
            **kwargs: other constructor arguments.
        """
        names = facs.check_vocabulary(expressions, "expression")
        prior = facs.prior_matrix(names, aus, source=source)
        empty = [i for i, n in enumerate(names) if not facs.EXPRESSIONS[n].aus]
        if fix_neutral and not empty:
            raise ValueError(
                "fix_neutral=True but no expression without AUs (such as 'neutral') is among the "
                f"expressions (expected one, got {list(names)})"
            )
        rows = (*fixed_rows, *(empty if fix_neutral is not False else ()))
        return cls(prior, fixed_rows=rows, **kwargs)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Offsets to zero (maps = the anchor), gates to ``logit(alpha)``, ``logit(beta)``."""
        p = self._prior_cpu
        k, m = p.shape
        self.prior.copy_(p)
        base = torch.rand(k, m, dtype=torch.float64) if self.init == "random" else p
        live_a = torch.ones(k, dtype=torch.bool)
        live_a[list(self.fixed_rows)] = False
        self.anchor.copy_(base)
        self.delta_au2exp.zero_()
        if self.dual:
            self.delta_exp2au.zero_()
        self.live_au2exp.copy_(live_a)
        self.live_exp2au.fill_(True)
        self.alpha_param.fill_(math.log(self.alpha_init / (1.0 - self.alpha_init)))
        self.beta_param.fill_(math.log(self.beta_init / (1.0 - self.beta_init)))

    @property
    def alpha(self) -> Tensor:
        """Effective ``alpha = sigmoid(alpha_param)``."""
        return torch.sigmoid(self.alpha_param)

    @property
    def beta(self) -> Tensor:
        """Effective ``beta = sigmoid(beta_param)``."""
        return torch.sigmoid(self.beta_param)

    def _release_map(self, anchor: Tensor, delta: Tensor, keep: Tensor | None = None) -> Tensor:
        # m * softmax(log(anchor + eps) + delta) over the columns in `keep`, m = the anchor's mass
        # over those columns (the release's row targets), computed as
        # anchor * exp(delta - max) * (m / sum): mathematically the release's formula, and
        # bit-exactly `anchor` when delta == 0 (exp(0) == 1 and m / sum == 1) on rows without zeros.
        anchor = anchor.contiguous()
        a = torch.where(anchor > 0, anchor, torch.full_like(anchor, self.eps))
        mass_src = anchor
        if keep is not None:
            delta = torch.where(keep, delta, torch.full_like(delta, float("-inf")))
            mass_src = torch.where(keep, anchor, torch.zeros_like(anchor))
        d = delta - delta.amax(dim=1, keepdim=True).detach()
        w = a * torch.exp(d)
        return w * (mass_src.sum(dim=1) / w.sum(dim=1)).unsqueeze(1)

    def maps(self) -> tuple[Tensor, Tensor]:
        """The current maps ``(A [K, M], B [M, K])`` as used in forward (the release's
        ``map_au2emo``, ``map_emo2au``)."""
        fixed = ~self.live_au2exp  # [K]: expression rows kept at the prior
        a = self._release_map(self.anchor, self.delta_au2exp)
        a = torch.where(fixed.unsqueeze(1), self.prior, a)
        if not self.dual:
            return a, a.t()
        if not self.fixed_rows:
            return a, self._release_map(self.anchor.t(), self.delta_exp2au)
        if len(self.fixed_rows) == self.num_expressions:
            return a, self.prior.t()
        b = self._release_map(self.anchor.t(), self.delta_exp2au, keep=self.live_au2exp.unsqueeze(0))
        return a, torch.where(fixed.unsqueeze(0), self.prior.t(), b)

    def extra_repr(self) -> str:
        return (
            f"num_expressions={self.num_expressions}, num_aus={self.num_aus}, variant={self.variant!r}, "
            f"alpha={self.alpha_init}, beta={self.beta_init}, learnable={self.learnable}, dual={self.dual}, "
            f"init={self.init!r}, fixed_rows={self.fixed_rows}, renormalize={self.renormalize}, eps={self.eps:g}"
        )


_PAPER_ONLY = {"tau": 0.01, "empty_rows": "zero"}


def _drop_paper_only(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The single-class API accepted ``tau`` / ``empty_rows`` with ``variant="ssm_release"`` and
    ignored them; keep accepting them, but say so when they were set."""
    kwargs = dict(kwargs)
    for name, default in _PAPER_ONLY.items():
        if name in kwargs:
            val = kwargs.pop(name)
            if val != default:
                warnings.warn(
                    f"{name}={val!r} applies to the paper's DynamicPriorMapping only; the release's "
                    "mapping (ReleasePriorMapping) has no such argument and ignores it",
                    UserWarning,
                    stacklevel=3,
                )
    if kwargs.get("renormalize", True) is None:
        kwargs.pop("renormalize")
    return kwargs


def build_prior_mapping(prior: Tensor, *, variant: str = "paper", **kwargs: Any) -> _ResidualSemanticMapping:
    """Build a mapping by name (the ``variant=`` factory).

    Args:
        prior: FACS prior ``P [K, M]``; the ``"linear"`` / ``"mlp"`` siblings use only its shape.
        variant: ``"paper"`` (:class:`DynamicPriorMapping`), ``"ssm_release"``
            (:class:`ReleasePriorMapping`; ``tau`` / ``empty_rows`` are accepted and ignored, with a
            warning when set, as the single-class API did), ``"linear"``
            (:class:`LinearSemanticMapping`) or ``"mlp"`` (:class:`MLPSemanticMapping`).
        **kwargs: the chosen class's constructor arguments (``renormalize=None`` = its default).

    Returns:
        The built module.
    """
    _check_choice("variant", variant, MAPPING_VARIANTS)
    if kwargs.get("renormalize", False) is None:
        kwargs.pop("renormalize")
    if variant == "paper":
        return DynamicPriorMapping(prior, **kwargs)
    if variant == "ssm_release":
        return ReleasePriorMapping(prior, **_drop_paper_only(kwargs))
    k, m = _check_prior(prior).shape
    cls = LinearSemanticMapping if variant == "linear" else MLPSemanticMapping
    return cls(k, m, **kwargs)


class _LabelAxisMapping(_ResidualSemanticMapping):
    """Residual mapping whose ``f_a``, ``f_b`` are learned modules along the label axis (Table VII)."""

    au2exp: nn.Module
    exp2au: nn.Module

    def _init_factors(self, num_expressions: int, num_aus: int, alpha: float, beta: float,
                      learnable_factors: bool, renormalize: bool, factory: dict) -> None:
        self._init_base(num_expressions, num_aus, renormalize)
        self.alpha_init, self.beta_init = _finite_factor("alpha", alpha), _finite_factor("beta", beta)
        self.learnable_factors = bool(learnable_factors)
        _scalar(self.learnable_factors, self, "alpha", factory)
        _scalar(self.learnable_factors, self, "beta", factory)

    def _reset_factors(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.alpha_init)
            self.beta.fill_(self.beta_init)

    def _residuals(self, t_exp: Tensor, t_au: Tensor) -> tuple[Tensor, Tensor]:
        return self.au2exp(t_au.t()).t(), self.exp2au(t_exp.t()).t()


class LinearSemanticMapping(_LabelAxisMapping):
    """Table VII "Linear": unconstrained learned linear maps along the label axis, no prior.

    ``t_exp' = t_exp + alpha * W_a @ t_au``, ``t_au' = t_au + beta * W_b @ t_exp`` with ``W_a [K, M]``,
    ``W_b [M, K]`` initialised like ``nn.Linear`` (uniform in ``±1/sqrt(fan_in)``), no softmax.

    Args:
        num_expressions: ``K``.
        num_aus: ``M``.
        alpha: initial ``alpha``.
        beta: initial ``beta``.
        bias: add a learned per-label bias (broadcast over ``D``).
        learnable_factors: learn ``alpha`` and ``beta``.
        renormalize: L2-normalise the fused features.
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
        self,
        num_expressions: int,
        num_aus: int,
        *,
        alpha: float = 0.1,
        beta: float = 0.1,
        bias: bool = False,
        learnable_factors: bool = True,
        renormalize: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory = _factory(device, dtype)
        super().__init__()
        self._init_factors(num_expressions, num_aus, alpha, beta, learnable_factors, renormalize, factory)
        self.au2exp = nn.Linear(num_aus, num_expressions, bias=bias, **factory)
        self.exp2au = nn.Linear(num_expressions, num_aus, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw the maps (``nn.Linear`` init) and reset ``alpha``, ``beta``."""
        self.au2exp.reset_parameters()
        self.exp2au.reset_parameters()
        self._reset_factors()

    def maps(self) -> tuple[Tensor, Tensor]:
        """``(W_a [K, M], W_b [M, K])``."""
        return self.au2exp.weight, self.exp2au.weight

    def extra_repr(self) -> str:
        return (
            f"num_expressions={self.num_expressions}, num_aus={self.num_aus}, alpha={self.alpha_init}, "
            f"beta={self.beta_init}, renormalize={self.renormalize}"
        )


class MLPSemanticMapping(_LabelAxisMapping):
    """Table VII "MLP": a learned two-layer MLP along the label axis, no prior.

    ``t_exp' = t_exp + alpha * MLP_a(t_au^T)^T`` with ``MLP_a: M -> hidden -> K`` applied to every
    feature dimension (and ``MLP_b: K -> hidden -> M`` for the AU side).

    Args:
        num_expressions: ``K``.
        num_aus: ``M``.
        hidden_dim: hidden width of both MLPs.
        act_layer: activation module class.
        alpha: initial ``alpha``.
        beta: initial ``beta``.
        learnable_factors: learn ``alpha`` and ``beta``.
        renormalize: L2-normalise the fused features.
        device: device of the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
        self,
        num_expressions: int,
        num_aus: int,
        *,
        hidden_dim: int = 64,
        act_layer: type[nn.Module] = nn.GELU,
        alpha: float = 0.1,
        beta: float = 0.1,
        learnable_factors: bool = True,
        renormalize: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory = _factory(device, dtype)
        super().__init__()
        self._init_factors(num_expressions, num_aus, alpha, beta, learnable_factors, renormalize, factory)
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be positive (expected >= 1, got {hidden_dim})")
        self.hidden_dim = int(hidden_dim)
        self.au2exp = nn.Sequential(
            nn.Linear(num_aus, hidden_dim, **factory), act_layer(), nn.Linear(hidden_dim, num_expressions, **factory)
        )
        self.exp2au = nn.Sequential(
            nn.Linear(num_expressions, hidden_dim, **factory), act_layer(), nn.Linear(hidden_dim, num_aus, **factory)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw both MLPs (``nn.Linear`` init) and reset ``alpha``, ``beta``."""
        for mod in (*self.au2exp, *self.exp2au):
            if isinstance(mod, nn.Linear):
                mod.reset_parameters()
        self._reset_factors()

    def extra_repr(self) -> str:
        return (
            f"num_expressions={self.num_expressions}, num_aus={self.num_aus}, hidden_dim={self.hidden_dim}, "
            f"alpha={self.alpha_init}, beta={self.beta_init}, renormalize={self.renormalize}"
        )
