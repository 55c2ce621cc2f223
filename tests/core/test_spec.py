"""Chain specs: what a chain's summary says of its target's bit-exact block cap."""

import pytest

from specrouter.core.spec import chain_summary


@pytest.mark.parametrize("chain, block, says", [
    ("t", 0, "t"),
    ("ngram,t", None, "ngram -> t"),
    ("ngram,t", 0, "ngram -> t (the target verifies no drafted token bit-exactly here, so the chain decodes as it alone"),
    ("ngram,d,t", 2, "ngram -> d -> t (blocks of at most 2 drafted tokens"),
])
def test_the_chain_summary_says_when_the_target_caps_or_refuses_drafted_blocks(chain, block, says):
    assert chain_summary(chain, block).startswith(says)
