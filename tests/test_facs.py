"""facelayers.facs: Table S4, vocabularies, priors, descriptions and errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from facelayers import facs

# Table S4 (paper, supplementary Sec. D), transcribed independently of the module.
TABLE_S4_AU_NAMES = {
    1: "inner brow raiser", 2: "outer brow raiser", 4: "brow lowerer", 5: "upper lid raiser",
    6: "cheek raiser", 7: "lid tightener", 9: "nose wrinkler", 10: "upper lip raiser",
    12: "lip corner puller", 14: "dimpler", 15: "lip corner depressor", 17: "chin raiser",
    20: "lip stretcher", 23: "lip tightener", 24: "lip pressor", 25: "lips part", 26: "jaw drop",
}
TABLE_S4_EXPRESSIONS = [
    ("happiness", "AU6+AU12", "cheek raiser, lip corner puller"),
    ("sadness", "AU1+AU4+AU15", "inner brow raiser, brow lowerer, lip corner depressor"),
    ("neutral", "None", "relaxed facial muscles, no significant action units"),
    ("anger", "AU4+AU5+AU7+AU23", "brow lowerer, upper lid raiser, lid tightener, lip tightener"),
    ("surprise", "AU1+AU2+AU5+AU26", "inner brow raiser, outer brow raiser, upper lid raiser, jaw drop"),
    ("disgust", "AU9+AU10+AU15", "nose wrinkler, upper lip raiser, lip corner depressor"),
    ("fear", "AU1+AU2+AU4+AU5+AU7+AU20+AU26",
     "inner brow raiser, outer brow raiser, brow lowerer, upper lid raiser, lid tightener, lip stretcher, jaw drop"),
    ("contempt", "AU12+AU14", "lip corner puller, dimpler"),
    ("anxiety", "AU1+AU4+AU20+AU25", "inner brow raiser, brow lowerer, lip stretcher, lips part"),
    ("helplessness", "AU1+AU4+AU15+AU26", "inner brow raiser, brow lowerer, lip corner depressor, jaw drop"),
    ("disappointment", "AU1+AU4+AU15+AU25",
     "inner brow raiser, brow lowerer, slight lip corner depressor, lips part"),
]


def _combo(text: str) -> tuple[int, ...]:
    return () if text == "None" else tuple(int(p[2:]) for p in text.split("+"))


# The released SSM code's `init_map` tables (ssm/models/bp4d.py, disfa.py), one string per row in
# the dataset's expression order: "1" -> 1.00, "." -> 0.02. Columns: BP4D 1,2,4,6,7,10,12,14,15,17,23,24;
# DISFA 1,2,4,6,9,12,25,26.
RELEASE_ROWS = {
    ("bp4d", 7): ["...1..1.....", "1.1.....1...", "............", "..1.1.....1.",
                  "11..........", ".....1...1..", "111.1......."],
    ("bp4d", 11): ["...1..1.....", "1.1.....1...", "............", "..1.1.....1.",
                   "11..........", ".....1..1...", "111.1.......", "......11....",
                   "1.1.........", "1.1.....1...", "1.1.....1..."],
    ("disfa", 7): ["...1.1..", "1.1.....", "........", "..1.....", "11....11", "....1...", "111...11"],
    ("disfa", 11): ["...1.1..", "1.1.....", "........", "..1.....", "11.....1", "....1...",
                    "111....1", ".....1..", "1.1...1.", "1.1....1", "1.1...1."],
}


def _release_tensor(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[1.0 if ch == "1" else 0.02 for ch in r] for r in rows])


class TestTableS4:
    @pytest.mark.parametrize("code,name", sorted(TABLE_S4_AU_NAMES.items()))
    def test_au_names(self, code, name):
        assert facs.AUS[code].name == name
        assert facs.au_descriptions([code]) == [name]

    def test_table_s4_au_order(self):
        assert facs.TABLE_S4_AUS == tuple(TABLE_S4_AU_NAMES)

    @pytest.mark.parametrize("name,combo,description", TABLE_S4_EXPRESSIONS, ids=[r[0] for r in TABLE_S4_EXPRESSIONS])
    def test_expression_rows(self, name, combo, description):
        e = facs.EXPRESSIONS[name]
        assert e.aus == _combo(combo)
        assert e.description == description
        assert facs.expression_descriptions([name]) == [description]
        assert len(e.phrases) == len(e.aus)
        row = facs.prior_matrix([name], facs.TABLE_S4_AUS)[0]
        expected = torch.tensor([1.0 if a in _combo(combo) else 0.0 for a in facs.TABLE_S4_AUS])
        assert torch.equal(row, expected)

    def test_all_expressions_listed(self):
        assert list(facs.EXPRESSIONS) == [r[0] for r in TABLE_S4_EXPRESSIONS]

    def test_au_records_cover_facs_range(self):
        expected = [c for c in range(1, 29) if c != 3] + [43, 45]
        assert sorted(facs.AUS) == expected
        regions = {"brow", "eye", "cheek", "nose", "mouth", "chin", "jaw", "neck"}
        for code, au in facs.AUS.items():
            assert au.code == code and au.region in regions and au.facs_name and au.muscles
            assert au.name == au.facs_name.lower() or code == 24 and au.name == "lip pressor"
        assert facs.AUS[12].label == "AU12" and facs.au_label(1) == "AU01"


class TestVocabularies:
    def test_values(self):
        assert facs.BP4D_AUS == (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
        assert facs.DISFA_AUS == (1, 2, 4, 6, 9, 12, 25, 26)
        assert facs.EXPRESSIONS_7 == ("happiness", "sadness", "neutral", "anger", "surprise", "disgust", "fear")
        assert facs.EXPRESSIONS_11 == facs.EXPRESSIONS_7 + ("contempt", "anxiety", "helplessness", "disappointment")
        assert facs.DFEW_EXPRESSIONS == facs.FERV39K_EXPRESSIONS == facs.EXPRESSIONS_7
        assert facs.MAFW_EXPRESSIONS == facs.EXPRESSIONS_11

    def test_dataset_aus_within_table_s4(self):
        assert set(facs.BP4D_AUS) <= set(facs.TABLE_S4_AUS)
        assert set(facs.DISFA_AUS) <= set(facs.TABLE_S4_AUS)

    @pytest.mark.parametrize("value,code", [(12, 12), ("12", 12), ("AU12", 12), ("au01", 1), (" AU045 ", 45)])
    def test_au_code_normalisation(self, value, code):
        assert facs.au_code(value) == code


class TestPriorMatrix:
    def test_full_table_s4_shape(self):
        p = facs.prior_matrix(facs.EXPRESSIONS_11, facs.TABLE_S4_AUS)
        assert p.shape == (11, 17) and p.dtype == torch.float32
        assert p[facs.EXPRESSIONS_11.index("neutral")].sum() == 0
        assert set(p.unique().tolist()) == {0.0, 1.0}

    @given(
        exprs=st.lists(st.sampled_from(list(facs.EXPRESSIONS)), min_size=1, max_size=11, unique=True),
        aus=st.lists(st.sampled_from(sorted(facs.AUS)), min_size=1, max_size=20, unique=True),
        data=st.data(),
    )
    def test_permutation_equivariance(self, exprs, aus, data):
        p = facs.prior_matrix(exprs, aus)
        assert p.shape == (len(exprs), len(aus))
        rperm = data.draw(st.permutations(range(len(exprs))))
        cperm = data.draw(st.permutations(range(len(aus))))
        q = facs.prior_matrix([exprs[i] for i in rperm], [aus[j] for j in cperm])
        assert torch.equal(q, p[list(rperm)][:, list(cperm)])
        for i, e in enumerate(exprs):
            for j, a in enumerate(aus):
                assert p[i, j].item() == float(a in _combo(dict((r[0], r[1]) for r in TABLE_S4_EXPRESSIONS)[e]))

    @pytest.mark.parametrize("key", sorted(RELEASE_ROWS), ids=lambda k: f"{k[0]}x{k[1]}")
    def test_release_tables_entry_by_entry(self, key):
        expected = _release_tensor(RELEASE_ROWS[key])
        assert torch.equal(facs.release_prior_table(*key), expected)
        aus = facs.BP4D_AUS if key[0] == "bp4d" else facs.DISFA_AUS
        exprs = facs.EXPRESSIONS_7 if key[1] == 7 else facs.EXPRESSIONS_11
        assert torch.equal(facs.prior_matrix(exprs, aus, source="ssm_release"), expected)

    @given(data=st.data())
    def test_release_permuted_subsets(self, data):
        key = data.draw(st.sampled_from(sorted(RELEASE_ROWS)))
        aus = facs.BP4D_AUS if key[0] == "bp4d" else facs.DISFA_AUS
        exprs = facs.EXPRESSIONS_7 if key[1] == 7 else facs.EXPRESSIONS_11
        ri = data.draw(st.lists(st.sampled_from(range(len(exprs))), min_size=1, unique=True))
        ci = data.draw(st.lists(st.sampled_from(range(len(aus))), min_size=1, unique=True))
        got = facs.prior_matrix([exprs[i] for i in ri], [aus[j] for j in ci], "ssm_release", release_table=key)
        assert torch.equal(got, _release_tensor(RELEASE_ROWS[key])[ri][:, ci])

    def test_release_differs_from_table_s4_where_documented(self):
        s4 = facs.prior_matrix(facs.EXPRESSIONS_7, facs.BP4D_AUS)
        rel = (facs.prior_matrix(facs.EXPRESSIONS_7, facs.BP4D_AUS, "ssm_release") == 1.0).float()
        diff = {(facs.EXPRESSIONS_7[i], facs.BP4D_AUS[j]) for i, j in (s4 != rel).nonzero().tolist()}
        assert diff == {("disgust", 15), ("disgust", 17)}
        s4 = facs.prior_matrix(facs.EXPRESSIONS_7, facs.DISFA_AUS)
        rel = (facs.prior_matrix(facs.EXPRESSIONS_7, facs.DISFA_AUS, "ssm_release") == 1.0).float()
        diff = {(facs.EXPRESSIONS_7[i], facs.DISFA_AUS[j]) for i, j in (s4 != rel).nonzero().tolist()}
        assert diff == {("surprise", 25), ("fear", 25)}
        for aus in (facs.BP4D_AUS, facs.DISFA_AUS):  # the 11-class tables are Table S4 restricted
            s4 = facs.prior_matrix(facs.EXPRESSIONS_11, aus)
            rel = (facs.prior_matrix(facs.EXPRESSIONS_11, aus, "ssm_release") == 1.0).float()
            assert torch.equal(s4, rel)

    def test_release_errors(self):
        with pytest.raises(ValueError, match="BP4D AUs"):
            facs.prior_matrix(["happiness"], [5], "ssm_release")
        with pytest.raises(ValueError, match="not covered"):
            facs.prior_matrix(["contempt"], [1], "ssm_release", release_table=("bp4d", 7))
        with pytest.raises(ValueError, match="ships priors"):
            facs.release_prior_table("bp4d", 8)
        with pytest.raises(ValueError, match="source must be one of"):
            facs.prior_matrix(["happiness"], [1], "facs2002")

    def test_dtype(self):
        assert facs.prior_matrix(["fear"], [1, 2], dtype=torch.float64).dtype == torch.float64


class TestDescriptions:
    def test_styles(self):
        assert facs.expression_descriptions(["happiness"], "words") == ["happiness"]
        assert facs.expression_descriptions(["happiness"], "standalone") == ["a facial expression of happiness"]
        assert facs.expression_descriptions(["happiness"], "compound") == ["cheek raiser, lip corner puller"]
        assert facs.expression_descriptions(["happiness"], include_name=True) == [
            "happiness, cheek raiser, lip corner puller"
        ]

    def test_restrict_to(self):
        got = facs.expression_descriptions(facs.EXPRESSIONS_11, restrict_to=facs.BP4D_AUS)
        assert got[facs.EXPRESSIONS_11.index("disgust")] == "upper lip raiser, lip corner depressor"
        assert got[facs.EXPRESSIONS_11.index("disappointment")] == (
            "inner brow raiser, brow lowerer, slight lip corner depressor"
        )
        assert got[facs.EXPRESSIONS_11.index("neutral")] == facs.EXPRESSIONS["neutral"].description
        got = facs.expression_descriptions(facs.EXPRESSIONS_7, restrict_to=facs.DISFA_AUS)
        assert got[facs.EXPRESSIONS_7.index("fear")] == "inner brow raiser, outer brow raiser, brow lowerer, jaw drop"
        assert got[facs.EXPRESSIONS_7.index("anger")] == "brow lowerer"

    @given(st.lists(st.sampled_from(list(facs.EXPRESSIONS)), min_size=1, max_size=11, unique=True),
           st.lists(st.sampled_from(facs.TABLE_S4_AUS), min_size=1, unique=True))
    def test_restricted_phrases_are_a_subsequence(self, exprs, keep):
        for e in exprs:
            info = facs.EXPRESSIONS[e]
            if info.aus and not set(info.aus) & set(keep):
                with pytest.raises(ValueError, match="has no AU in restrict_to"):
                    facs.expression_descriptions([e], restrict_to=keep)
                continue
            (text,) = facs.expression_descriptions([e], restrict_to=keep)
            if info.aus:
                assert text.split(", ") == [p for a, p in zip(info.aus, info.phrases) if a in keep]

    def test_au_descriptions_order(self):
        assert facs.au_descriptions(facs.DISFA_AUS) == [TABLE_S4_AU_NAMES[a] for a in facs.DISFA_AUS]

    def test_style_errors(self):
        with pytest.raises(ValueError, match="style must be one of"):
            facs.expression_descriptions(["happiness"], "poem")
        with pytest.raises(ValueError, match="compound"):
            facs.expression_descriptions(["happiness"], "words", restrict_to=[6])


class TestErrors:
    def test_unknown_au_lists_valid(self):
        with pytest.raises(facs.UnknownLabelError) as info:
            facs.au_descriptions([1, 99])
        assert isinstance(info.value, KeyError)
        msg = str(info.value)
        assert "99" in msg and "AU1," in msg and "AU45" in msg

    def test_unknown_expression_lists_valid(self):
        with pytest.raises(KeyError) as info:
            facs.prior_matrix(["joy"], [1])
        msg = str(info.value)
        assert "'joy'" in msg and "happiness" in msg and "disappointment" in msg

    def test_au3(self):
        with pytest.raises(facs.UnknownLabelError, match="AU3 is not defined"):
            facs.au_code("AU3")

    @pytest.mark.parametrize("bad", [1.5, None, True])
    def test_bad_types(self, bad):
        with pytest.raises(TypeError):
            facs.au_code(bad)

    def test_duplicates(self):
        with pytest.raises(ValueError, match="duplicate"):
            facs.prior_matrix(["happiness", "happiness"], [1])
        with pytest.raises(ValueError, match="duplicate"):
            facs.au_descriptions([1, "AU1"])
        with pytest.raises(ValueError, match="empty"):
            facs.prior_matrix([], [1])
        with pytest.raises(TypeError, match="string"):
            facs.check_vocabulary("happiness", "expression")


# ----------------------------------------------------------------------------- release descriptions

# Where the released code's strings differ from Table S4 (docs/facs.md): for the 7-class pairs the
# comparison is Table S4 restricted to the AU dataset with the name prefix; MAFW's 11 texts (shared by
# BP4D and DISFA) compare with the full Table S4 texts. Each entry: expression -> the release's text.
RELEASE_DIFFS = {
    ("bp4d", 7): {
        "neutral": "neutral, no active AUs",
        "disgust": "disgust, upper lip raiser",
        "fear": "fear, inner brow raiser, outer brow raiser, brow lowerer",
    },
    ("disfa", 7): {
        "neutral": "neutral, relaxed facial muscles, straight mouth, smooth forehead, unremarkable eyebrows",
    },
    ("any", 11): {
        "anger": "anger, brow lowerer, upper lid raiser, lip tightener, lips part",
        "fear": "fear, inner brow raiser, outer brow raiser, brow lowerer, upper lid raiser, jaw drop, lip stretcher",
        "contempt": "contempt, unilateral lip corner tightener",
    },
}
RELEASE_PAIRS = [(a, e) for a in ("bp4d", "disfa") for e in ("dfew", "ferv39k", "mafw")]


def _table_s4_with_names(names, aus, k):
    restrict = aus if k == 7 else None  # see RELEASE_DIFFS
    return facs.expression_descriptions(names, "compound", restrict_to=restrict, include_name=True)


@pytest.mark.parametrize("au_ds,exp_ds", RELEASE_PAIRS, ids=[f"{a}-{e}" for a, e in RELEASE_PAIRS])
def test_release_descriptions_structure_all_pairs(au_ds, exp_ds):
    exp, au = facs.release_descriptions(au_ds, exp_ds)
    aus = facs.BP4D_AUS if au_ds == "bp4d" else facs.DISFA_AUS
    names = facs.EXPRESSIONS_11 if exp_ds == "mafw" else facs.EXPRESSIONS_7
    k = len(names)
    assert (len(exp), len(au)) == (k, len(aus)) == ({"mafw": 11}.get(exp_ds, 7), {"bp4d": 12}.get(au_ds, 8))
    # vocabulary order: every text starts with its class name, in the dataset's label order
    assert all(t.startswith(f"{n}, ") for t, n in zip(exp, names))
    # AU texts: Table S4's, in label order, except AU24 "lip presser"
    want_au = [("lip presser" if c == 24 else TABLE_S4_AU_NAMES[c]) for c in aus]
    assert au == want_au
    # the documented differences from Table S4, and no other
    diffs = RELEASE_DIFFS[(au_ds, 7)] if k == 7 else RELEASE_DIFFS[("any", 11)]
    table = _table_s4_with_names(names, aus, k)
    got = {n: t for n, t, s in zip(names, exp, table) if t != s}
    assert got == diffs
    assert 1 <= len(got) <= 3
    # the same through the per-vocabulary helpers
    assert facs.expression_descriptions(names, source="ssm_release", release_table=(au_ds, exp_ds)) == exp
    assert facs.au_descriptions(aus, source="ssm_release") == au
    assert facs.check_descriptions(exp) == tuple(exp)


def test_release_descriptions_shared_lists():
    assert facs.release_descriptions("bp4d", "dfew") == facs.release_descriptions("bp4d", "ferv39k")
    assert facs.release_descriptions("disfa", "DFEW") == facs.release_descriptions("disfa", 7)
    assert facs.release_descriptions("bp4d", "mafw")[0] == facs.release_descriptions("disfa", "mafw")[0]
    assert facs.release_descriptions("bp4d", 7)[0] != facs.release_descriptions("disfa", 7)[0]


def _fixture_jsons() -> list:
    import os
    from pathlib import Path

    folder = Path(os.environ.get("FACELAYERS_RELEASE_FIXTURES", Path(__file__).parent / "data" / "ssm_release"))
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


@pytest.mark.parametrize("meta_path", _fixture_jsons(), ids=lambda p: p.stem)
def test_release_descriptions_equal_fixture(meta_path):
    """The strings the released code itself used (recorded by the fixture's generator)."""
    import json

    meta = json.loads(meta_path.read_text())
    exp, au = facs.release_descriptions(meta["au_dataset"], meta["expression_dataset"])
    assert exp == meta["expression_descriptions"]
    assert au == meta["au_descriptions"]


def test_release_expression_descriptions_subsets_and_inference():
    # subset and order follow the given names; table inferred from restrict_to / the names
    got = facs.expression_descriptions(["fear", "happiness"], source="ssm_release", restrict_to=facs.DISFA_AUS)
    full = dict(zip(facs.EXPRESSIONS_7, facs.release_descriptions("disfa", 7)[0]))
    assert got == [full["fear"], full["happiness"]]
    mafw = facs.expression_descriptions(["contempt"], source="ssm_release")
    assert mafw == ["contempt, unilateral lip corner tightener"]
    assert facs.expression_descriptions(["neutral"], source="ssm_release", restrict_to=[1, 24]) == [
        "neutral, no active AUs"
    ]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(style="words"), r"expected style='compound', got 'words'"),
        (dict(include_name=False), r"expected include_name=None or True, got False"),
        (dict(), r"depend on the AU dataset"),
        (dict(restrict_to=[5]), r"depend on the AU dataset"),
        (dict(release_table=("bp4d", "afew")), r"expected one of them or a class count 7/11, got 'afew'"),
        (dict(release_table=("ck+", 7)), r"expected one of them, got 'ck\+'"),
        (dict(release_table=("bp4d", 9)), r"expected 7 or 11, got 9"),
        (dict(release_table="bp4d"), r"release_table must be"),
    ],
)
def test_release_expression_descriptions_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        facs.expression_descriptions(["happiness"], source="ssm_release", **kwargs)


def test_release_description_errors_and_sources():
    with pytest.raises(ValueError, match=r"expected names among them, got \['contempt'\]"):
        facs.expression_descriptions(["contempt"], source="ssm_release", release_table=("bp4d", "dfew"))
    with pytest.raises(ValueError, match=r"expected AUs among them, got AUs \[5\]"):
        facs.au_descriptions([1, 5], source="ssm_release")
    with pytest.raises(ValueError, match="source"):
        facs.au_descriptions([1], source="paper")
    with pytest.raises(ValueError, match="source"):
        facs.expression_descriptions(["happiness"], source="paper")
    with pytest.raises(ValueError, match="release_table applies"):
        facs.expression_descriptions(["happiness"], release_table=("bp4d", 7))
    assert facs.DESCRIPTION_SOURCES == ("table_s4", "ssm_release")
    # Table S4 keeps "lip pressor"; the release writes "lip presser"
    assert facs.au_descriptions([24]) == ["lip pressor"]
    assert facs.au_descriptions([24], source="ssm_release") == ["lip presser"]


@pytest.mark.parametrize(
    "texts,exc,match",
    [
        (["ok", ""], ValueError, r"description 1 of 2 is empty \(expected a non-empty description, got ''\)"),
        ([" \t"], ValueError, r"expected a non-empty description, got ' \\t'"),
        ([], ValueError, r"empty \(expected at least one description, got none\)"),
        ("brow lowerer", TypeError, "the string"),
        (["ok", 3], TypeError, r"expected str, got int"),
    ],
)
def test_check_descriptions(texts, exc, match):
    with pytest.raises(exc, match=match):
        facs.check_descriptions(texts)
