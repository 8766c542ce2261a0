"""Dynamic Prior Mapping (DPM, paper Sec. III-D) and its ablation siblings (paper Table VII).

DPM couples the two tasks in text space. Given expression text features ``T_exp [K, D]``, AU text
features ``T_au [M, D]`` and a FACS prior ``P [K, M]`` (:func:`facelayers.facs.prior_matrix`)::

    A = W_au->exp map [K, M],  B = W_exp->au map [M, K]       (maps())
    T_exp' = T_exp + alpha * A @ T_au                          (eqs. 21, 23)
    T_au'  = T_au  + beta  * B @ T_exp                         (eqs. 22, 24)

Two parameterisations of the maps are provided (``variant``):

``"paper"`` (eqs. 19-24)
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

``"ssm_release"`` (the released SSM code, ``ssm/models/bp4d.py`` / ``disfa.py``)
    ``A = m_row * softmax_row(log(P + eps) + Delta_A)`` where ``m_row = P.sum(1)`` keeps each row's
    prior mass, ``Delta`` starts at zero, so ``A = P`` at initialisation; ``B`` likewise over ``P^T``
    (row masses ``P.sum(0)``). Rows listed in ``fixed_rows`` (the release fixes neutral) stay at the
    prior in both directions: ``A[k] = P[k]``, ``B[:, k] = P[k]^T``, and the other entries of each
    ``B`` row share the remaining mass. ``alpha = sigmoid(a)``, ``beta = sigmoid(b)`` with ``a, b``
    initialised to ``logit(0.1)``, and the fused features are L2-renormalised. Zero entries of ``P``
    use ``eps`` in the log (the release adds ``eps`` to every entry), so that ``A == P`` and ``B ==
    P^T`` bit-exactly at initialisation for priors without zeros (all release tables).

Options common to both: ``learnable=False`` keeps the maps fixed (registered as buffers; paper
Table VII "Frozen"), ``dual=False`` ties ``B = A^T`` (paper Table VI "w/o Dual"), ``init="random"``
starts from a random matrix instead of the prior (Table VI "R init.").

:class:`LinearSemanticMapping` and :class:`MLPSemanticMapping` replace the prior-initialised softmax
maps by an unconstrained learned linear map / two-layer MLP along the label axis (Table VII "Linear"
and "MLP"; the paper gives no further detail, this is the direct reading).

Examples::

    >>> from facelayers import facs, DynamicPriorMapping
    >>> P = facs.prior_matrix(facs.EXPRESSIONS_7, facs.BP4D_AUS)
    >>> dpm = DynamicPriorMapping(P)
    >>> t_exp, t_au = torch.randn(7, 512), torch.randn(12, 512)
    >>> t_exp2, t_au2 = dpm(t_exp, t_au)
    >>> A, B = dpm.maps()  # [7, 12], [12, 7]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import facs

__all__ = [
    "DPM_VARIANTS",
    "DynamicPriorMapping",
    "LinearSemanticMapping",
    "MLPSemanticMapping",
]

#: The map parameterisations of :class:`DynamicPriorMapping`.
DPM_VARIANTS: tuple[str, ...] = ("paper", "ssm_release")
_INITS = ("prior", "random")
_EMPTY_ROWS = ("zero", "uniform")


def _check_text_pair(t_exp: Tensor, t_au: Tensor, k: int, m: int) -> None:
    if not isinstance(t_exp, Tensor) or not isinstance(t_au, Tensor):
        raise TypeError(
            f"t_exp and t_au must be Tensors, got {type(t_exp).__name__} and {type(t_au).__name__}"
        )
    if t_exp.ndim != 2 or t_au.ndim != 2:
        raise ValueError(
            f"t_exp must be [K={k}, D] and t_au [M={m}, D]; got shapes {tuple(t_exp.shape)} and {tuple(t_au.shape)}"
        )
    if t_exp.shape[0] != k or t_au.shape[0] != m:
        raise ValueError(
            f"this mapping was built for K={k} expressions and M={m} AUs (t_exp [K, D], t_au [M, D]); "
            f"got t_exp {tuple(t_exp.shape)} and t_au {tuple(t_au.shape)}"
        )
    if t_exp.shape[1] != t_au.shape[1]:
        raise ValueError(
            f"t_exp and t_au must share the feature size D; got t_exp {tuple(t_exp.shape)} and t_au {tuple(t_au.shape)}"
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


class DynamicPriorMapping(nn.Module):
    """Dynamic Prior Mapping between expression and AU text features (paper eqs. 19-24).

    Args:
        prior: FACS prior ``P [K, M]`` (rows: expressions, columns: AUs), non-negative, e.g.
            :func:`facelayers.facs.prior_matrix`. Copied.
        tau: ``tau_m``, temperature of the row-softmax (``"paper"`` only; paper: 0.01).
        alpha: initial ``alpha`` (weight of the AU->expression residual). For ``"ssm_release"``
            it is the initial value *after* the sigmoid gate, in ``(0, 1)``.
        beta: initial ``beta`` (weight of the expression->AU residual), as ``alpha``.
        learnable: learn the maps. ``False`` registers them as buffers (Table VII "Frozen").
        dual: learn ``B`` independently (eq. 20's "updated independently"). ``False`` ties ``B =
            A^T`` at every step.
        init: ``"prior"`` (eqs. 19-20) or ``"random"`` (uniform ``[0, 1)`` entries drawn at
            :meth:`reset_parameters`, row-normalised for ``"paper"``; for ``"ssm_release"`` they
            replace ``P`` as the softmax anchor and row masses; ``fixed_rows`` still use ``P``).
        variant: ``"paper"`` or ``"ssm_release"`` (see the module docstring).
        empty_rows: ``"paper"`` only: how all-zero rows of ``P`` (and of ``P^T``) are handled:
            ``"zero"`` (map row fixed to zero) or ``"uniform"`` (start uniform, learned).
        fixed_rows: ``"ssm_release"`` only: expression rows kept at the prior in both directions
            (the release fixes neutral; pass its index, e.g. ``EXPRESSIONS_7.index("neutral")``,
            or build with :meth:`from_facs`). No index is assumed.
        learnable_factors: learn ``alpha`` and ``beta`` (otherwise buffers).
        renormalize: L2-normalise the fused features; ``None`` = the variant's behaviour
            (``False`` for ``"paper"``, ``True`` for ``"ssm_release"``).
        eps: the ``eps`` of ``log(P + eps)`` (``"ssm_release"``), 1e-8 as in the release.
        device: device of parameters and buffers.
        dtype: floating dtype of parameters and buffers.

    Shapes:
        ``forward(t_exp [K, D], t_au [M, D]) -> (t_exp' [K, D], t_au' [M, D])``;
        ``maps() -> (A [K, M], B [M, K])``.

    Attributes:
        prior: the prior ``P [K, M]`` (buffer).
        weight_au2exp, weight_exp2au: ``"paper"``: ``W_au->exp [K, M]`` and ``W_exp->au [M, K]``
            (the latter only with ``dual``); parameters, or buffers when not ``learnable``.
        delta_au2exp, delta_exp2au: ``"ssm_release"``: the logit offsets ``Delta`` (same shapes).
        anchor: ``"ssm_release"``: the matrix the softmax is anchored at (``P``, or random).
        alpha_param, beta_param: raw scalars; :attr:`alpha`, :attr:`beta` are the effective values.
        live_au2exp, live_exp2au: bool ``[K]`` / ``[M]``: rows that are learned (``False``: empty rows
            of the paper variant, ``fixed_rows`` of the release variant).
    """

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
        variant: str = "paper",
        empty_rows: str = "zero",
        fixed_rows: Sequence[int] = (),
        learnable_factors: bool = True,
        renormalize: bool | None = None,
        eps: float = 1e-8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(prior, Tensor):
            prior = torch.as_tensor(prior)
        if prior.ndim != 2 or prior.shape[0] < 1 or prior.shape[1] < 1:
            raise ValueError(f"prior must be a non-empty matrix [K, M], got shape {tuple(prior.shape)}")
        if variant not in DPM_VARIANTS:
            raise ValueError(f"variant must be one of {DPM_VARIANTS}, got {variant!r}")
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        if empty_rows not in _EMPTY_ROWS:
            raise ValueError(f"empty_rows must be one of {_EMPTY_ROWS}, got {empty_rows!r}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        prior_cpu = prior.detach().to("cpu", torch.float64)
        if not torch.isfinite(prior_cpu).all() or (prior_cpu < 0).any():
            raise ValueError("prior must be finite and non-negative")
        k, m = prior.shape
        fixed = tuple(sorted({int(r) for r in fixed_rows}))
        if fixed and variant != "ssm_release":
            raise ValueError(
                "fixed_rows applies to variant='ssm_release'; the 'paper' variant handles all-zero "
                "prior rows through empty_rows"
            )
        bad = [r for r in fixed if not 0 <= r < k]
        if bad:
            raise ValueError(f"fixed_rows {bad} out of range for K={k} expressions")
        if variant == "ssm_release":
            for name, v in (("alpha", alpha), ("beta", beta)):
                if not 0.0 < v < 1.0:
                    raise ValueError(f"variant 'ssm_release' gates {name} with a sigmoid: need 0 < {name} < 1, got {v}")
        self.num_expressions, self.num_aus = k, m
        self.tau = float(tau)
        self.alpha_init, self.beta_init = float(alpha), float(beta)
        self.learnable = bool(learnable)
        self.dual = bool(dual)
        self.init = init
        self.variant = variant
        self.empty_rows = empty_rows
        self.fixed_rows = fixed
        self.learnable_factors = bool(learnable_factors)
        self.renormalize = (variant == "ssm_release") if renormalize is None else bool(renormalize)
        self.eps = float(eps)
        self._prior_cpu = prior_cpu  # plain attribute: reset_parameters() restores buffers from it

        factory = {"device": device, "dtype": dtype if dtype is not None else torch.get_default_dtype()}
        self.register_buffer("prior", torch.empty(k, m, **factory))

        def state(name: str, shape: tuple[int, ...]) -> None:
            t = torch.empty(shape, **factory)
            if self.learnable:
                self.register_parameter(name, nn.Parameter(t))
            else:
                self.register_buffer(name, t)

        # Map state: "paper" holds W (eq. 19-20); "ssm_release" holds the logit offsets Delta and
        # the anchor / masses the softmax is taken around.
        wname = "weight" if variant == "paper" else "delta"
        state(f"{wname}_au2exp", (k, m))
        if self.dual:
            state(f"{wname}_exp2au", (m, k))
        self.register_buffer("live_au2exp", torch.empty(k, dtype=torch.bool, device=device))
        self.register_buffer("live_exp2au", torch.empty(m, dtype=torch.bool, device=device))
        if variant == "ssm_release":
            self.register_buffer("anchor", torch.empty(k, m, **factory))
        _scalar(self.learnable_factors, self, "alpha_param", factory)
        _scalar(self.learnable_factors, self, "beta_param", factory)
        self.reset_parameters()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_facs(
        cls,
        expressions: Sequence[str],
        aus: Sequence[int | str],
        *,
        source: str | None = None,
        variant: str = "paper",
        fix_neutral: bool | None = None,
        **kwargs,
    ) -> DynamicPriorMapping:
        """Build from vocabularies through :func:`facelayers.facs.prior_matrix`.

        Args:
            expressions: the ``K`` expression names.
            aus: the ``M`` AU codes.
            source: prior source; default ``"table_s4"`` for ``"paper"``, ``"ssm_release"`` for
                ``"ssm_release"``.
            variant: see the class.
            fix_neutral: ``"ssm_release"`` only: keep the neutral row fixed (default ``True`` when
                ``"neutral"`` is among ``expressions``, as the release does).
            **kwargs: other constructor arguments.
        """
        names = facs.check_vocabulary(expressions, "expression")
        if source is None:
            source = "ssm_release" if variant == "ssm_release" else "table_s4"
        prior = facs.prior_matrix(names, aus, source=source)
        if variant == "ssm_release":
            if fix_neutral is None:
                fix_neutral = "neutral" in names
            if fix_neutral:
                if "neutral" not in names:
                    raise ValueError(f"fix_neutral=True but 'neutral' is not among the expressions {list(names)}")
                kwargs["fixed_rows"] = (*kwargs.get("fixed_rows", ()), names.index("neutral"))
        elif fix_neutral:
            raise ValueError("fix_neutral applies to variant='ssm_release'")
        return cls(prior, variant=variant, **kwargs)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the maps from the prior (or randomly) and ``alpha``, ``beta`` to their inits."""
        p = self._prior_cpu
        k, m = p.shape
        self.prior.copy_(p)
        base = torch.rand(k, m, dtype=torch.float64) if self.init == "random" else p
        if self.variant == "paper":
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
        else:
            live_a = torch.ones(k, dtype=torch.bool)
            live_a[list(self.fixed_rows)] = False
            live_b = torch.ones(m, dtype=torch.bool)
            self.anchor.copy_(base)
            self.delta_au2exp.zero_()
            if self.dual:
                self.delta_exp2au.zero_()
        self.live_au2exp.copy_(live_a)
        self.live_exp2au.copy_(live_b)
        if self.variant == "ssm_release":
            self.alpha_param.fill_(math.log(self.alpha_init / (1.0 - self.alpha_init)))
            self.beta_param.fill_(math.log(self.beta_init / (1.0 - self.beta_init)))
        else:
            self.alpha_param.fill_(self.alpha_init)
            self.beta_param.fill_(self.beta_init)

    # ------------------------------------------------------------------ maps
    @property
    def alpha(self) -> Tensor:
        """Effective ``alpha`` (after the sigmoid gate for ``"ssm_release"``)."""
        return torch.sigmoid(self.alpha_param) if self.variant == "ssm_release" else self.alpha_param

    @property
    def beta(self) -> Tensor:
        """Effective ``beta`` (after the sigmoid gate for ``"ssm_release"``)."""
        return torch.sigmoid(self.beta_param) if self.variant == "ssm_release" else self.beta_param

    def _release_map(self, anchor: Tensor, delta: Tensor, keep: Tensor | None = None) -> Tensor:
        # m * softmax(log(anchor + eps) + delta) over the columns in `keep`, m = the anchor's mass
        # over those columns (the release's row targets), computed as
        # anchor * exp(delta - max) * (m / sum): mathematically the release's formula, and
        # bit-exactly `anchor` when delta == 0 (exp(0) == 1 and m / sum == 1) on rows without zeros.
        # Zero entries use eps instead of 0 + eps (a 1e-8 difference on non-zero entries only).
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
        """The current maps ``(A = W_au->exp [K, M], B = W_exp->au [M, K])`` as used in forward."""
        if self.variant == "paper":
            a = torch.softmax(self.weight_au2exp / self.tau, dim=1)
            a = torch.where(self.live_au2exp.unsqueeze(1), a, torch.zeros_like(a))
            if not self.dual:
                return a, a.t()
            b = torch.softmax(self.weight_exp2au / self.tau, dim=1)
            b = torch.where(self.live_exp2au.unsqueeze(1), b, torch.zeros_like(b))
            return a, b
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

    def forward(self, t_exp: Tensor, t_au: Tensor) -> tuple[Tensor, Tensor]:
        """Fuse the two tasks' text features (eqs. 21-24).

        Args:
            t_exp: expression text features ``[K, D]``.
            t_au: AU text features ``[M, D]``.

        Returns:
            ``(t_exp + alpha * A @ t_au, t_au + beta * B @ t_exp)``, each L2-normalised when
            ``renormalize``.
        """
        _check_text_pair(t_exp, t_au, self.num_expressions, self.num_aus)
        a, b = self.maps()
        a, b = a.to(t_au.dtype), b.to(t_exp.dtype)
        new_exp = t_exp + self.alpha.to(t_exp.dtype) * (a @ t_au)
        new_au = t_au + self.beta.to(t_au.dtype) * (b @ t_exp)
        if self.renormalize:
            new_exp = F.normalize(new_exp, dim=-1)
            new_au = F.normalize(new_au, dim=-1)
        return new_exp, new_au

    def extra_repr(self) -> str:
        return (
            f"num_expressions={self.num_expressions}, num_aus={self.num_aus}, variant={self.variant!r}, "
            f"tau={self.tau}, alpha={self.alpha_init}, beta={self.beta_init}, learnable={self.learnable}, "
            f"dual={self.dual}, init={self.init!r}, empty_rows={self.empty_rows!r}, "
            f"fixed_rows={self.fixed_rows}, renormalize={self.renormalize}"
        )


class _ResidualSemanticMapping(nn.Module):
    """Shared residual fusion of the Table VII ablations: ``t + alpha * f(other)``."""

    def __init__(self, num_expressions: int, num_aus: int, alpha: float, beta: float,
                 learnable_factors: bool, renormalize: bool, factory: dict) -> None:
        super().__init__()
        if num_expressions < 1 or num_aus < 1:
            raise ValueError(f"need num_expressions >= 1 and num_aus >= 1, got {num_expressions}, {num_aus}")
        self.num_expressions, self.num_aus = int(num_expressions), int(num_aus)
        self.alpha_init, self.beta_init = float(alpha), float(beta)
        self.learnable_factors = bool(learnable_factors)
        self.renormalize = bool(renormalize)
        _scalar(self.learnable_factors, self, "alpha", factory)
        _scalar(self.learnable_factors, self, "beta", factory)

    def _reset_factors(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.alpha_init)
            self.beta.fill_(self.beta_init)

    def _map_au2exp(self, t_au: Tensor) -> Tensor:
        raise NotImplementedError

    def _map_exp2au(self, t_exp: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, t_exp: Tensor, t_au: Tensor) -> tuple[Tensor, Tensor]:
        """``(t_exp + alpha * f_a(t_au), t_au + beta * f_b(t_exp))``; ``t_exp [K, D]``, ``t_au [M, D]``."""
        _check_text_pair(t_exp, t_au, self.num_expressions, self.num_aus)
        new_exp = t_exp + self.alpha * self._map_au2exp(t_au)
        new_au = t_au + self.beta * self._map_exp2au(t_exp)
        if self.renormalize:
            new_exp = F.normalize(new_exp, dim=-1)
            new_au = F.normalize(new_au, dim=-1)
        return new_exp, new_au


class LinearSemanticMapping(_ResidualSemanticMapping):
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
        factory = {"device": device, "dtype": dtype if dtype is not None else torch.get_default_dtype()}
        super().__init__(num_expressions, num_aus, alpha, beta, learnable_factors, renormalize, factory)
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

    def _map_au2exp(self, t_au: Tensor) -> Tensor:
        return self.au2exp(t_au.t()).t()

    def _map_exp2au(self, t_exp: Tensor) -> Tensor:
        return self.exp2au(t_exp.t()).t()

    def extra_repr(self) -> str:
        return (
            f"num_expressions={self.num_expressions}, num_aus={self.num_aus}, alpha={self.alpha_init}, "
            f"beta={self.beta_init}, renormalize={self.renormalize}"
        )


class MLPSemanticMapping(_ResidualSemanticMapping):
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
        factory = {"device": device, "dtype": dtype if dtype is not None else torch.get_default_dtype()}
        super().__init__(num_expressions, num_aus, alpha, beta, learnable_factors, renormalize, factory)
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {hidden_dim}")
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

    def _map_au2exp(self, t_au: Tensor) -> Tensor:
        return self.au2exp(t_au.t()).t()

    def _map_exp2au(self, t_exp: Tensor) -> Tensor:
        return self.exp2au(t_exp.t()).t()

    def extra_repr(self) -> str:
        return (
            f"num_expressions={self.num_expressions}, num_aus={self.num_aus}, hidden_dim={self.hidden_dim}, "
            f"alpha={self.alpha_init}, beta={self.beta_init}, renormalize={self.renormalize}"
        )
