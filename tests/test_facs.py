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
