"""Training corpora come from package data and stay disjoint from the benchmark's evaluation prompts."""

import pytest

from specrouter.tasks import corpora
from specrouter.tasks.corpora import OverlapError, Text


@pytest.fixture(scope="module")
def evaluation():
    return corpora.evaluation_texts()


def test_training_corpus_is_disjoint_from_evaluation_and_has_both_sources(evaluation):
    train = corpora.training_corpus(24)
    corpora.assert_disjoint(train, evaluation)
    assert {t.source for t in train} == {"code", "chat"}
    assert sum(t.source == "code" for t in train) == 24 and sum(t.source == "chat" for t in train) == 24
    assert all(t.id.split(":")[0].endswith(".py") for t in train if t.source == "code")


def test_the_check_fails_when_a_training_prompt_is_an_evaluation_prompt(evaluation):
    train = corpora.training_corpus(8)
    leaked = Text("chat", "copy", "  " + evaluation[-1].text.upper() + "\n", chat=True)  # same text, other spacing and case
    with pytest.raises(OverlapError):
        corpora.assert_disjoint(train + [leaked], evaluation)


def test_the_check_fails_when_a_training_prompt_contains_or_is_inside_an_evaluation_prompt(evaluation):
    humaneval = evaluation[0]
    containing = Text("code", "containing", "# a preamble\n" + humaneval.text + "    return None\n", chat=False)
    inside = Text("code", "inside", humaneval.text[: len(humaneval.text) // 2], chat=False)
    for leaked in (containing, inside):
        with pytest.raises(OverlapError):
            corpora.assert_disjoint([leaked], evaluation)
    assert corpora.drop_overlapping([containing, inside], evaluation) == []


def test_short_texts_overlap_only_when_equal():
    evaluation = [Text("chat", "e", "Hello there, how are you?", chat=True)]
    corpora.assert_disjoint([Text("chat", "t", "hello there", chat=True)], evaluation)
    with pytest.raises(OverlapError):
        corpora.assert_disjoint([Text("chat", "t", "hello  there, how are you?", chat=True)], evaluation)


def test_the_code_edit_workloads_functions_are_evaluation_prompts_never_trained_on(evaluation):
    edited = {f"{module}.{name}" for module, name in corpora.EDIT_SOURCES}
    assert edited <= {e.id for e in evaluation}
    train = corpora.training_corpus(64)
    assert not {t.id.split(":")[-1] for t in train if t.source == "code"} & {name for _, name in corpora.EDIT_SOURCES}


def test_a_larger_code_corpus_keeps_the_smaller_one_first_and_adds_methods_dedented():
    few, many = corpora.stdlib_functions(64), corpora.stdlib_functions(600)
    assert len(many) == 600 and len({t.id for t in many}) == 600
    assert [(t.id, t.text) for t in many[:64]] == [(t.id, t.text) for t in few]
    methods = [t for t in many if "." in t.id.split(":")[1]]
    assert methods and all(t.text.startswith("def ") for t in many)
