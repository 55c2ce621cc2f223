"""What a verification reports: counts for the response, records for the router and the loop."""

import torch

from specrouter.core.levels import Block
from specrouter.core.records import VerifyRecord, record_verdict
from specrouter.core.verification import rejection_sample


def _verify(block: Block, p_target: torch.Tensor) -> VerifyRecord:
    q_draft = torch.nn.functional.one_hot(torch.tensor(block.token_ids), p_target.shape[-1]).float()
    verdict = rejection_sample(block.token_ids, q_draft, p_target, torch.Generator().manual_seed(0))
    stats, records = {}, []
    record_verdict(stats, records, "draft", "target", block, q_draft, p_target, verdict, 0.01, len(block))
    (record,) = records
    return record


def test_a_verdict_on_a_confident_block_records_agreement_at_every_drafted_position():
    p_target = torch.tensor([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]])  # [k + 1, V]
    block = Block([1, 2, 2], torch.empty(0), confidence=[0.9, 0.8, 0.4])
    record = _verify(block, p_target)
    assert record.num_accepted_tokens == 1  # the second token is not the target's
    # past the first rejection too: an unchecked block would have committed those tokens after the drafted prefix
    assert record.agreed == [True, False, True] and record.confidence == [0.9, 0.8, 0.4]


def test_a_block_without_confidences_records_no_agreement():
    p_target = torch.tensor([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]])
    record = _verify(Block([1], torch.empty(0)), p_target)
    assert record.agreed is None and record.confidence is None
