"""FACS knowledge: Action Units, expression→AU compositions, dataset vocabularies, priors, descriptions.

Everything the text side (:mod:`facelayers.prompts`) and the prior mapping
(:mod:`facelayers.prior_mapping`) are built from lives here, as plain data:

* :data:`AUS` — Action Unit records (code, canonical FACS name, face region, muscular basis) for
  AU1–AU28 (AU3 does not exist in FACS) plus AU43 and AU45. The 17 AUs of the SSM paper's Table S4
  carry the paper's lower-case descriptions (``"inner brow raiser"`` … ``"jaw drop"``).
* :data:`EXPRESSIONS` — the 11 expressions of Table S4 with their AU combinations and compound
  descriptions, exactly as the table gives them.
* Vocabularies: :data:`BP4D_AUS`, :data:`DISFA_AUS`, :data:`TABLE_S4_AUS`, :data:`EXPRESSIONS_7`
  (DFEW / FERV39K order) and :data:`EXPRESSIONS_11` (MAFW order).
* :func:`prior_matrix` — the binary FACS prior ``P [K, M]`` of paper eq. 19 (``source="table_s4"``)
  or the 1.0 / 0.02 tables that the released SSM code ships (``source="ssm_release"``).
* :func:`au_descriptions` / :func:`expression_descriptions` — the TSP texts in the paper's three
  styles (Table VIII): ``"compound"``, ``"standalone"`` and ``"words"``; with
  ``source="ssm_release"`` the exact strings the released SSM code feeds its prompt learners
  (:func:`release_descriptions` gives both lists of one dataset pair). :func:`check_descriptions`
  validates user texts (non-empty strings).

Examples::

    >>> from facelayers import facs
    >>> facs.prior_matrix(["happiness", "neutral"], [6, 12, 25])
    tensor([[1., 1., 0.],
            [0., 0., 0.]])
    >>> facs.expression_descriptions(["disgust"], style="compound", restrict_to=facs.DISFA_AUS)
    ['nose wrinkler']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "AU",
    "AUS",
    "BP4D_AUS",
    "DESCRIPTION_SOURCES",
    "DESCRIPTION_STYLES",
    "DFEW_EXPRESSIONS",
    "DISFA_AUS",
    "EXPRESSIONS",
    "EXPRESSIONS_7",
    "EXPRESSIONS_11",
    "Expression",
    "FERV39K_EXPRESSIONS",
    "MAFW_EXPRESSIONS",
    "PRIOR_SOURCES",
    "TABLE_S4_AUS",
    "UnknownLabelError",
    "au_code",
    "au_descriptions",
    "au_label",
    "check_descriptions",
    "check_vocabulary",
    "expression_descriptions",
    "prior_matrix",
    "release_descriptions",
    "release_prior_table",
]


class UnknownLabelError(KeyError):
    """An AU code or expression name that facelayers does not know.

    A :class:`KeyError` subclass whose message lists the valid values.
    """

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class AU:
    """One FACS Action Unit.

    Attributes:
        code: FACS number (``12`` for AU12).
        name: description used as text (lower case; Table S4's wording for its 17 AUs).
        facs_name: canonical FACS name (Ekman, Friesen & Hager, 2002).
        region: face region, one of ``"brow"``, ``"eye"``, ``"cheek"``, ``"nose"``, ``"mouth"``,
            ``"chin"``, ``"jaw"``, ``"neck"``.
        muscles: muscular basis.
    """

    code: int
    name: str
    facs_name: str
    region: str
    muscles: str

    @property
    def label(self) -> str:
        """Zero-padded label, e.g. ``"AU01"``."""
        return au_label(self.code)


@dataclass(frozen=True)
class Expression:
    """One expression of the paper's Table S4.

    Attributes:
        name: lower-case name (``"happiness"``).
        aus: AU combination, in Table S4's order (empty for neutral).
        phrases: one description phrase per AU, aligned with ``aus`` (Table S4 wording, e.g.
            disappointment's ``"slight lip corner depressor"``); empty for neutral.
        description: the compound description exactly as Table S4 prints it.
    """

    name: str
    aus: tuple[int, ...]
    phrases: tuple[str, ...]
    description: str


def _au(code: int, name: str, facs_name: str, region: str, muscles: str) -> AU:
    return AU(code, name, facs_name, region, muscles)


# Names: FACS 2002 (Ekman, Friesen & Hager). Lower-case `name` = Table S4 wording where the paper
# lists the AU (note Table S4 writes AU24 as "lip pressor").
AUS: dict[int, AU] = {
    a.code: a
    for a in (
        _au(1, "inner brow raiser", "Inner Brow Raiser", "brow", "frontalis, pars medialis"),
        _au(2, "outer brow raiser", "Outer Brow Raiser", "brow", "frontalis, pars lateralis"),
        _au(4, "brow lowerer", "Brow Lowerer", "brow",
            "depressor glabellae, depressor supercilii, corrugator supercilii"),
        _au(5, "upper lid raiser", "Upper Lid Raiser", "eye", "levator palpebrae superioris"),
        _au(6, "cheek raiser", "Cheek Raiser", "cheek", "orbicularis oculi, pars orbitalis"),
        _au(7, "lid tightener", "Lid Tightener", "eye", "orbicularis oculi, pars palpebralis"),
        _au(8, "lips toward each other", "Lips Toward Each Other", "mouth", "orbicularis oris"),
        _au(9, "nose wrinkler", "Nose Wrinkler", "nose", "levator labii superioris alaeque nasi"),
        _au(10, "upper lip raiser", "Upper Lip Raiser", "mouth", "levator labii superioris"),
        _au(11, "nasolabial deepener", "Nasolabial Deepener", "cheek", "zygomaticus minor"),
        _au(12, "lip corner puller", "Lip Corner Puller", "mouth", "zygomaticus major"),
        _au(13, "sharp lip puller", "Sharp Lip Puller", "mouth", "levator anguli oris (caninus)"),
        _au(14, "dimpler", "Dimpler", "mouth", "buccinator"),
        _au(15, "lip corner depressor", "Lip Corner Depressor", "mouth", "depressor anguli oris"),
        _au(16, "lower lip depressor", "Lower Lip Depressor", "mouth", "depressor labii inferioris"),
        _au(17, "chin raiser", "Chin Raiser", "chin", "mentalis"),
        _au(18, "lip pucker", "Lip Pucker", "mouth",
            "incisivii labii superioris and incisivii labii inferioris"),
        _au(19, "tongue show", "Tongue Show", "mouth", "tongue"),
        _au(20, "lip stretcher", "Lip Stretcher", "mouth", "risorius with platysma"),
        _au(21, "neck tightener", "Neck Tightener", "neck", "platysma"),
        _au(22, "lip funneler", "Lip Funneler", "mouth", "orbicularis oris"),
        _au(23, "lip tightener", "Lip Tightener", "mouth", "orbicularis oris"),
        _au(24, "lip pressor", "Lip Pressor", "mouth", "orbicularis oris"),
        _au(25, "lips part", "Lips Part", "mouth",
            "depressor labii inferioris, or relaxation of mentalis or orbicularis oris"),
        _au(26, "jaw drop", "Jaw Drop", "jaw",
            "masseter relaxed; temporalis and internal pterygoid relaxed"),
        _au(27, "mouth stretch", "Mouth Stretch", "jaw", "pterygoids, digastric"),
        _au(28, "lip suck", "Lip Suck", "mouth", "orbicularis oris"),
        _au(43, "eyes closed", "Eyes Closed", "eye",
            "relaxation of levator palpebrae superioris; orbicularis oculi, pars palpebralis"),
        _au(45, "blink", "Blink", "eye",
            "relaxation of levator palpebrae superioris; orbicularis oculi, pars palpebralis"),
    )
}

#: The 17 AUs of the paper's Table S4, in the table's order.
TABLE_S4_AUS: tuple[int, ...] = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 24, 25, 26)
#: BP4D's 12 annotated AUs, in the order of the public ``.list`` label columns.
BP4D_AUS: tuple[int, ...] = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
#: DISFA's 8 AUs used by the SSM protocol, in label order.
DISFA_AUS: tuple[int, ...] = (1, 2, 4, 6, 9, 12, 25, 26)

#: 7-class order of DFEW and FERV39K (label ids 0..6).
EXPRESSIONS_7: tuple[str, ...] = (
    "happiness", "sadness", "neutral", "anger", "surprise", "disgust", "fear",
)
#: 11-class order of MAFW (label ids 0..10).
EXPRESSIONS_11: tuple[str, ...] = EXPRESSIONS_7 + (
    "contempt", "anxiety", "helplessness", "disappointment",
)
DFEW_EXPRESSIONS = EXPRESSIONS_7
FERV39K_EXPRESSIONS = EXPRESSIONS_7
MAFW_EXPRESSIONS = EXPRESSIONS_11


def _expr(name: str, aus: tuple[int, ...], phrases: tuple[str, ...], description: str | None = None) -> Expression:
    return Expression(name, aus, phrases, description if description is not None else ", ".join(phrases))


# Table S4 (lower section), verbatim. Phrases are aligned with the AU combination.
EXPRESSIONS: dict[str, Expression] = {
    e.name: e
    for e in (
        _expr("happiness", (6, 12), ("cheek raiser", "lip corner puller")),
        _expr("sadness", (1, 4, 15), ("inner brow raiser", "brow lowerer", "lip corner depressor")),
        _expr("neutral", (), (), "relaxed facial muscles, no significant action units"),
        _expr("anger", (4, 5, 7, 23),
              ("brow lowerer", "upper lid raiser", "lid tightener", "lip tightener")),
        _expr("surprise", (1, 2, 5, 26),
              ("inner brow raiser", "outer brow raiser", "upper lid raiser", "jaw drop")),
        _expr("disgust", (9, 10, 15), ("nose wrinkler", "upper lip raiser", "lip corner depressor")),
        _expr("fear", (1, 2, 4, 5, 7, 20, 26),
              ("inner brow raiser", "outer brow raiser", "brow lowerer", "upper lid raiser",
               "lid tightener", "lip stretcher", "jaw drop")),
        _expr("contempt", (12, 14), ("lip corner puller", "dimpler")),
        _expr("anxiety", (1, 4, 20, 25),
              ("inner brow raiser", "brow lowerer", "lip stretcher", "lips part")),
        _expr("helplessness", (1, 4, 15, 26),
              ("inner brow raiser", "brow lowerer", "lip corner depressor", "jaw drop")),
        _expr("disappointment", (1, 4, 15, 25),
              ("inner brow raiser", "brow lowerer", "slight lip corner depressor", "lips part")),
    )
}

DESCRIPTION_STYLES: tuple[str, ...] = ("compound", "standalone", "words")
PRIOR_SOURCES: tuple[str, ...] = ("table_s4", "ssm_release")

# The priors hard-coded in the released SSM code (ssm/models/bp4d.py and disfa.py, `init_map`):
# 1.0 where listed below, 0.02 everywhere else (the neutral row is 0.02 throughout). Keyed by
# (AU dataset, number of expression classes); values list the active AUs per expression.
_RELEASE_ON = 1.0
_RELEASE_OFF = 0.02
_RELEASE_ACTIVE: dict[tuple[str, int], dict[str, tuple[int, ...]]] = {
    ("bp4d", 7): {
        "happiness": (6, 12), "sadness": (1, 4, 15), "neutral": (), "anger": (4, 7, 23),
        "surprise": (1, 2), "disgust": (10, 17), "fear": (1, 2, 4, 7),
    },
    ("bp4d", 11): {
        "happiness": (6, 12), "sadness": (1, 4, 15), "neutral": (), "anger": (4, 7, 23),
        "surprise": (1, 2), "disgust": (10, 15), "fear": (1, 2, 4, 7),
        "contempt": (12, 14), "anxiety": (1, 4), "helplessness": (1, 4, 15),
        "disappointment": (1, 4, 15),
    },
    ("disfa", 7): {
        "happiness": (6, 12), "sadness": (1, 4), "neutral": (), "anger": (4,),
        "surprise": (1, 2, 25, 26), "disgust": (9,), "fear": (1, 2, 4, 25, 26),
    },
    ("disfa", 11): {
        "happiness": (6, 12), "sadness": (1, 4), "neutral": (), "anger": (4,),
        "surprise": (1, 2, 26), "disgust": (9,), "fear": (1, 2, 4, 26),
        "contempt": (12,), "anxiety": (1, 4, 25), "helplessness": (1, 4, 26),
        "disappointment": (1, 4, 25),
    },
}
_RELEASE_AU_VOCABS = {"bp4d": BP4D_AUS, "disfa": DISFA_AUS}
_RELEASE_EXPR_VOCABS = {7: EXPRESSIONS_7, 11: EXPRESSIONS_11}

DESCRIPTION_SOURCES: tuple[str, ...] = ("table_s4", "ssm_release")

# The description strings of the released SSM code (ssm/semantics.py: the AU lists of BP4D and
# DISFA and the expression lists chosen by `get_task_descriptions`). They are data the released
# checkpoints depend on: the prompt learners' stored token embeddings are the embeddings of exactly
# these strings. AU texts are the same in both AU datasets; note AU24 "lip presser" (Table S4 writes
# "lip pressor").
_RELEASE_AU_TEXT: dict[int, str] = {
    1: "inner brow raiser", 2: "outer brow raiser", 4: "brow lowerer", 6: "cheek raiser",
    7: "lid tightener", 9: "nose wrinkler", 10: "upper lip raiser", 12: "lip corner puller",
    14: "dimpler", 15: "lip corner depressor", 17: "chin raiser", 23: "lip tightener",
    24: "lip presser", 25: "lips part", 26: "jaw drop",
}
# Expression texts per (AU dataset, number of classes); the release prefixes each with the name
# ("happiness, cheek raiser, lip corner puller"), added by `_release_expression_text`. DFEW and
# FERV39K share the 7-class lists; MAFW's 11-class list is the same for BP4D and DISFA.
_RELEASE_EXPRESSION_BODY: dict[tuple[str, int], dict[str, str]] = {
    ("bp4d", 7): {
        "happiness": "cheek raiser, lip corner puller",
        "sadness": "inner brow raiser, brow lowerer, lip corner depressor",
        "neutral": "no active AUs",
        "anger": "brow lowerer, lid tightener, lip tightener",
        "surprise": "inner brow raiser, outer brow raiser",
        "disgust": "upper lip raiser",
        "fear": "inner brow raiser, outer brow raiser, brow lowerer",
    },
    ("disfa", 7): {
        "happiness": "cheek raiser, lip corner puller",
        "sadness": "inner brow raiser, brow lowerer",
        "neutral": "relaxed facial muscles, straight mouth, smooth forehead, unremarkable eyebrows",
        "anger": "brow lowerer",
        "surprise": "inner brow raiser, outer brow raiser, jaw drop",
        "disgust": "nose wrinkler",
        "fear": "inner brow raiser, outer brow raiser, brow lowerer, jaw drop",
    },
}
_RELEASE_MAFW_BODY: dict[str, str] = {
    "happiness": "cheek raiser, lip corner puller",
    "sadness": "inner brow raiser, brow lowerer, lip corner depressor",
    "neutral": "relaxed facial muscles, no significant action units",
    "anger": "brow lowerer, upper lid raiser, lip tightener, lips part",
    "surprise": "inner brow raiser, outer brow raiser, upper lid raiser, jaw drop",
    "disgust": "nose wrinkler, upper lip raiser, lip corner depressor",
    "fear": "inner brow raiser, outer brow raiser, brow lowerer, upper lid raiser, jaw drop, lip stretcher",
    "contempt": "unilateral lip corner tightener",
    "anxiety": "inner brow raiser, brow lowerer, lip stretcher, lips part",
    "helplessness": "inner brow raiser, brow lowerer, lip corner depressor, jaw drop",
    "disappointment": "inner brow raiser, brow lowerer, slight lip corner depressor, lips part",
}
_RELEASE_EXPRESSION_BODY[("bp4d", 11)] = _RELEASE_MAFW_BODY
_RELEASE_EXPRESSION_BODY[("disfa", 11)] = _RELEASE_MAFW_BODY
#: Expression datasets of the release and their class counts.
_RELEASE_EXPRESSION_DATASETS: dict[str, int] = {"dfew": 7, "ferv39k": 7, "mafw": 11}


def _release_key(au_dataset: str, expressions: str | int) -> tuple[str, int]:
    """``(au_dataset, num_classes)`` of a release dataset pair, validated."""
    au = str(au_dataset).strip().lower()
    if au not in _RELEASE_AU_VOCABS:
        raise ValueError(
            f"the released SSM code supports the AU datasets {sorted(_RELEASE_AU_VOCABS)} "
            f"(expected one of them, got {au_dataset!r})"
        )
    if isinstance(expressions, bool):
        raise TypeError(f"expected an expression dataset name or class count, got {expressions!r}")
    if isinstance(expressions, int):
        if expressions not in _RELEASE_EXPR_VOCABS:
            raise ValueError(
                f"the released SSM code has 7- and 11-class expression sets (expected 7 or 11, got {expressions})"
            )
        return au, expressions
    name = str(expressions).strip().lower()
    if name not in _RELEASE_EXPRESSION_DATASETS:
        raise ValueError(
            "the released SSM code supports the expression datasets "
            f"{sorted(_RELEASE_EXPRESSION_DATASETS)} (expected one of them or a class count 7/11, "
            f"got {expressions!r})"
        )
    return au, _RELEASE_EXPRESSION_DATASETS[name]


def _valid_aus_text() -> str:
    return ", ".join(f"AU{c}" for c in AUS)


def au_code(au: int | str) -> int:
    """Normalise an AU identifier (``12``, ``"12"``, ``"AU12"``, ``"AU012"``) to its FACS code.

    Raises:
        UnknownLabelError: the code is not a FACS AU known here; the message lists the valid ones.
        TypeError: ``au`` is neither an int nor a string.
    """
    if isinstance(au, bool) or not isinstance(au, (int, str)):
        raise TypeError(f"an AU must be an int code or a string like 'AU12' (expected int or str, got {type(au).__name__}: {au!r})")
    code: int | None = None
    if isinstance(au, int):
        code = au
    else:
        text = au.strip().upper()
        if text.startswith("AU"):
            text = text[2:]
        if text.isdigit():
            code = int(text)
    if code is None or code not in AUS:
        hint = " (AU3 is not defined in FACS)" if code == 3 else ""
        raise UnknownLabelError(f"unknown AU {au!r}{hint} (expected one of {_valid_aus_text()}, got {au!r})")
    return code


def au_label(au: int | str) -> str:
    """Zero-padded column label of an AU, e.g. ``au_label(1) == "AU01"``."""
    return f"AU{au_code(au):02d}"


def _expression_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"an expression must be a name string, got {type(name).__name__}: {name!r}")
    key = name.strip().lower()
    if key not in EXPRESSIONS:
        raise UnknownLabelError(
            f"unknown expression {name!r} (expected one of {', '.join(EXPRESSIONS)}, got {name!r})"
        )
    return key


def check_vocabulary(items: Iterable, kind: str) -> tuple:
    """Validate a vocabulary and return it normalised as a tuple.

    Args:
        items: AU codes (``kind="au"``) or expression names (``kind="expression"``).
        kind: ``"au"`` or ``"expression"``.

    Raises:
        UnknownLabelError: an unknown AU code or expression name.
        ValueError: an empty vocabulary or a duplicate entry.
    """
    if kind not in ("au", "expression"):
        raise ValueError(f"kind must be 'au' or 'expression', got {kind!r}")
    if isinstance(items, (str, bytes)):
        raise TypeError(f"a {kind} vocabulary must be a sequence of entries, got the string {items!r}")
    norm = tuple(au_code(i) for i in items) if kind == "au" else tuple(_expression_name(i) for i in items)
    if not norm:
        raise ValueError(f"the {kind} vocabulary is empty (expected at least one entry, got none)")
    seen: set = set()
    dups = [x for x in norm if x in seen or seen.add(x)]
    if dups:
        raise ValueError(f"duplicate entries in the {kind} vocabulary: {sorted(set(dups), key=str)} (expected distinct entries, got {list(items)})")
    return norm


def check_descriptions(texts: Iterable[str], what: str = "description") -> tuple[str, ...]:
    """Validate free texts used as descriptions and return them as a tuple (unchanged).

    Args:
        texts: the descriptions, e.g. the ``K`` texts of a :class:`~facelayers.prompts.PromptLearner`.
        what: what a text is called in error messages.

    Raises:
        TypeError: ``texts`` is a single string, or an entry is not a string.
        ValueError: no texts, or an empty / whitespace-only entry (``expected a non-empty
            description, got ''``).
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"expected a sequence of {what} strings, got the string {texts!r}")
    out = tuple(texts)
    if not out:
        raise ValueError(f"the {what} list is empty (expected at least one {what}, got none)")
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"{what} {i} must be a string (expected str, got {type(t).__name__}: {t!r})")
        if not t.strip():
            raise ValueError(f"{what} {i} of {len(out)} is empty (expected a non-empty {what}, got {t!r})")
    return out


def au_descriptions(aus: Sequence[int | str], source: str = "table_s4") -> list[str]:
    """Atomic FACS descriptions of AUs, one per AU, in the given order.

    Args:
        aus: AU codes, e.g. :data:`BP4D_AUS`.
        source: ``"table_s4"`` — Table S4's upper section (``"lip pressor"`` for AU24);
            ``"ssm_release"`` — the strings of the released SSM code (``ssm/semantics.py``), which
            cover the 15 AUs of BP4D and DISFA and write AU24 as ``"lip presser"``.

    Returns:
        ``["inner brow raiser", ...]``.

    Raises:
        ValueError: unknown ``source``, or (``"ssm_release"``) an AU the release does not describe.
    """
    codes = check_vocabulary(aus, "au")
    if source == "table_s4":
        return [AUS[c].name for c in codes]
    if source != "ssm_release":
        raise ValueError(f"source must be one of {DESCRIPTION_SOURCES} (expected one of {DESCRIPTION_SOURCES}, got {source!r})")
    missing = [c for c in codes if c not in _RELEASE_AU_TEXT]
    if missing:
        raise ValueError(
            f"the released SSM code describes AUs {sorted(_RELEASE_AU_TEXT)} "
            f"(expected AUs among them, got AUs {missing})"
        )
    return [_RELEASE_AU_TEXT[c] for c in codes]


def release_descriptions(au_dataset: str, expression_dataset: str | int) -> tuple[list[str], list[str]]:
    """The exact description strings the released SSM code uses for one dataset pair.

    These are what its ``get_task_descriptions`` returns (``ssm/semantics.py``), in the datasets'
    label orders; its prompt learners embed exactly these texts, so a released checkpoint's stored
    prompt embeddings belong to them. They differ from Table S4 (see ``docs/facs.md``).

    Args:
        au_dataset: ``"bp4d"`` (12 AUs) or ``"disfa"`` (8 AUs).
        expression_dataset: ``"dfew"``, ``"ferv39k"`` (7 classes) or ``"mafw"`` (11 classes), or the
            class count 7 / 11.

    Returns:
        ``(expression_texts [K], au_texts [M])``.

    Examples::

        >>> exp, au = release_descriptions("bp4d", "dfew")
        >>> exp[2], au[-1]
        ('neutral, no active AUs', 'lip presser')
    """
    au, k = _release_key(au_dataset, expression_dataset)
    body = _RELEASE_EXPRESSION_BODY[(au, k)]
    exp = [f"{n}, {body[n]}" for n in _RELEASE_EXPR_VOCABS[k]]
    return exp, [_RELEASE_AU_TEXT[c] for c in _RELEASE_AU_VOCABS[au]]


def expression_descriptions(
    expressions: Sequence[str],
    style: str = "compound",
    restrict_to: Sequence[int | str] | None = None,
    *,
    include_name: bool | None = None,
    source: str = "table_s4",
    release_table: tuple[str, str | int] | None = None,
) -> list[str]:
    """Text descriptions of expressions in one of the paper's three styles (Table VIII).

    Args:
        expressions: expression names, e.g. :data:`EXPRESSIONS_7`.
        style: ``"compound"`` — Table S4's AU-based description (``"cheek raiser, lip corner
            puller"``); ``"standalone"`` — ``"a facial expression of happiness"``; ``"words"`` —
            ``"happiness"``.
        restrict_to: for ``"compound"`` only: keep just the phrases of AUs in this vocabulary (the
            AUs a dataset annotates). Neutral keeps its description. An expression with none of
            its AUs in ``restrict_to`` raises (use another style for such a vocabulary). With
            ``source="ssm_release"`` it only selects the AU dataset's table (BP4D or DISFA).
        include_name: prefix compound descriptions with the expression name (``"happiness,
            cheek raiser, ..."``), as the released SSM code's prompts do. ``None``: no prefix for
            ``"table_s4"``; the release strings always carry it (``False`` is then an error).
        source: ``"table_s4"`` (the paper) or ``"ssm_release"`` — the exact strings of the released
            code (:func:`release_descriptions`), compound style only.
        release_table: for ``"ssm_release"``: ``(au_dataset, expression dataset or class count)``,
            e.g. ``("bp4d", "dfew")``. By default the AU dataset is inferred from ``restrict_to``
            (all BP4D AUs -> BP4D, all DISFA AUs -> DISFA) and the class count from the names (11
            when any is outside the 7 classes; both AU datasets share the 11-class texts).

    Returns:
        One string per expression, in the given order.

    Raises:
        ValueError: unknown style or source, duplicate entries, ``restrict_to`` with a non-compound
            style, an expression left without any AU by ``restrict_to``, or a release table that
            cannot be inferred or does not cover the names.
        UnknownLabelError: unknown expression or AU.
    """
    names = check_vocabulary(expressions, "expression")
    if style not in DESCRIPTION_STYLES:
        raise ValueError(f"style must be one of {DESCRIPTION_STYLES} (expected one of {DESCRIPTION_STYLES}, got {style!r})")
    if source == "ssm_release":
        return _release_expression_descriptions(names, style, restrict_to, include_name, release_table)
    if source != "table_s4":
        raise ValueError(f"source must be one of {DESCRIPTION_SOURCES} (expected one of {DESCRIPTION_SOURCES}, got {source!r})")
    if release_table is not None:
        raise ValueError(f"release_table applies to source='ssm_release' only, got source={source!r}")
    if style == "words":
        if restrict_to is not None:
            raise ValueError("restrict_to applies to style='compound' only, got style='words'")
        return list(names)
    if style == "standalone":
        if restrict_to is not None:
            raise ValueError("restrict_to applies to style='compound' only, got style='standalone'")
        return [f"a facial expression of {n}" for n in names]
    keep = None if restrict_to is None else set(check_vocabulary(restrict_to, "au"))
    out = []
    for n in names:
        e = EXPRESSIONS[n]
        if keep is None or not e.aus:
            text = e.description
        else:
            phrases = [p for a, p in zip(e.aus, e.phrases) if a in keep]
            if not phrases:
                raise ValueError(
                    f"expression {n!r} (AUs {list(e.aus)}) has no AU in restrict_to={sorted(keep)}; "
                    "use style='standalone' or 'words' for this vocabulary"
                )
            text = ", ".join(phrases)
        out.append(f"{n}, {text}" if include_name else text)
    return out


def _release_expression_descriptions(
    names: tuple[str, ...],
    style: str,
    restrict_to: Sequence[int | str] | None,
    include_name: bool | None,
    release_table: tuple[str, str | int] | None,
) -> list[str]:
    if style != "compound":
        raise ValueError(
            f"source='ssm_release' has compound descriptions only (expected style='compound', got {style!r})"
        )
    if include_name is False:
        raise ValueError("the released SSM descriptions always start with the expression name "
                         "(expected include_name=None or True, got False)")
    if release_table is None:
        k = 7 if set(names) <= set(EXPRESSIONS_7) else 11
        if k == 11:
            au_ds = "bp4d"  # both AU datasets share the 11-class texts
        else:
            codes = set(check_vocabulary(restrict_to, "au")) if restrict_to is not None else None
            if codes is not None and codes <= set(BP4D_AUS):
                au_ds = "bp4d"
            elif codes is not None and codes <= set(DISFA_AUS):
                au_ds = "disfa"
            else:
                raise ValueError(
                    "the released 7-class descriptions depend on the AU dataset: pass "
                    "release_table=('bp4d'|'disfa', 'dfew'|'ferv39k'|'mafw') or restrict_to= the "
                    f"BP4D or DISFA AUs (expected one of them, got restrict_to={restrict_to!r})"
                )
        key = (au_ds, k)
    else:
        if not isinstance(release_table, (tuple, list)) or len(release_table) != 2:
            raise ValueError(
                f"release_table must be (au_dataset, expression dataset or class count), got {release_table!r}"
            )
        key = _release_key(*release_table)
    body = _RELEASE_EXPRESSION_BODY[key]
    missing = [n for n in names if n not in body]
    if missing:
        raise ValueError(
            f"release table {key} describes expressions {list(_RELEASE_EXPR_VOCABS[key[1]])} "
            f"(expected names among them, got {missing})"
        )
    return [f"{n}, {body[n]}" for n in names]


def release_prior_table(au_dataset: str, num_classes: int) -> torch.Tensor:
    """The prior matrix hard-coded in the released SSM code for one dataset pair.

    Args:
        au_dataset: ``"bp4d"`` or ``"disfa"``.
        num_classes: 7 (DFEW / FERV39K) or 11 (MAFW).

    Returns:
        ``[num_classes, M]`` float32 tensor with entries 1.0 / 0.02, rows in the dataset's
        expression order, columns in the AU dataset's label order.
    """
    key = (str(au_dataset).lower(), int(num_classes))
    if key not in _RELEASE_ACTIVE:
        raise ValueError(
            f"the released SSM code ships priors for {sorted(_RELEASE_ACTIVE)} "
            f"(AU dataset, classes); got {(au_dataset, num_classes)}"
        )
    aus = _RELEASE_AU_VOCABS[key[0]]
    active = _RELEASE_ACTIVE[key]
    return torch.tensor(
        [[_RELEASE_ON if a in active[e] else _RELEASE_OFF for a in aus] for e in _RELEASE_EXPR_VOCABS[key[1]]],
        dtype=torch.float32,
    )


def prior_matrix(
    expressions: Sequence[str],
    aus: Sequence[int | str],
    source: str = "table_s4",
    *,
    release_table: tuple[str, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """FACS prior ``P [K, M]`` between expressions (rows) and AUs (columns), paper eq. 19's ``P``.

    Args:
        expressions: K expression names, any subset and order.
        aus: M AU codes, any subset and order.
        source: ``"table_s4"`` — 1 where the AU is in the expression's Table S4 combination, 0
            elsewhere (the neutral row is all zero). ``"ssm_release"`` — the released code's tables
            (1.0 / 0.02; they differ from Table S4 in places, see ``docs/facs.md``), indexed by the
            given names and codes.
        release_table: for ``"ssm_release"``: which table, ``(au_dataset, num_classes)`` such as
            ``("bp4d", 7)``. By default the AU dataset is BP4D when every AU is a BP4D AU, else
            DISFA when every AU is a DISFA AU; the 11-class table is used when any expression is
            outside the 7 classes, else the 7-class table.
        dtype: floating dtype of the result.

    Returns:
        ``[K, M]`` tensor. Permuting ``expressions`` / ``aus`` permutes its rows / columns.

    Raises:
        UnknownLabelError: unknown expression or AU.
        ValueError: duplicates, unknown source, or AUs / expressions the release tables don't cover.
    """
    names = check_vocabulary(expressions, "expression")
    codes = check_vocabulary(aus, "au")
    if source == "table_s4":
        rows = [[1.0 if a in EXPRESSIONS[n].aus else 0.0 for a in codes] for n in names]
        return torch.tensor(rows, dtype=dtype)
    if source != "ssm_release":
        raise ValueError(f"source must be one of {PRIOR_SOURCES} (expected one of {PRIOR_SOURCES}, got {source!r})")
    if release_table is None:
        if set(codes) <= set(BP4D_AUS):
            au_ds = "bp4d"
        elif set(codes) <= set(DISFA_AUS):
            au_ds = "disfa"
        else:
            raise ValueError(
                "the released SSM priors cover BP4D AUs "
                f"{list(BP4D_AUS)} or DISFA AUs {list(DISFA_AUS)}; got AUs {list(codes)}"
            )
        release_table = (au_ds, 7 if set(names) <= set(EXPRESSIONS_7) else 11)
    table = release_prior_table(*release_table)
    au_vocab = _RELEASE_AU_VOCABS[release_table[0].lower()]
    ex_vocab = _RELEASE_EXPR_VOCABS[int(release_table[1])]
    missing_aus = [a for a in codes if a not in au_vocab]
    missing_ex = [n for n in names if n not in ex_vocab]
    if missing_aus or missing_ex:
        raise ValueError(
            f"release table {tuple(release_table)} covers AUs {list(au_vocab)} and expressions "
            f"{list(ex_vocab)}; not covered: AUs {missing_aus}, expressions {missing_ex}"
        )
    r = torch.tensor([ex_vocab.index(n) for n in names])
    c = torch.tensor([au_vocab.index(a) for a in codes])
    return table[r][:, c].to(dtype)
