"""The n samples of one prompt (SamplingParams.n) share its KV blocks.

When the group is admitted, the prompt's full blocks before its last token (a prefix of
P' = ((P - 1) // block_size) * block_size positions) are computed once, by each model
the policy may use, into sample 0's block table; every other sample's table then forks
it (the block manager's reference counts). Each sample computes the rest of the prompt
itself: at least its last token, whose head gives the sample its own first token. The
prefix ends on a block boundary, so no sample ever writes into a shared block (no
copy-on-write). Sample 0's stats count the shared prefix's forward tokens, once.
"""
from typing import List

from .head import head_spec
from .sequence import Sequence


def share_prefix(group: List[Sequence], slm, llm, block_manager, block_size: int) -> None:
    lead = group[0]
    prefix = (lead.num_prompt_tokens - 1) // block_size * block_size
    if prefix == 0:
        return
    block_manager.append_slots(lead.handle, prefix)
    part = Sequence(f"{lead.request_id}/prefix", lead.prompt_token_ids[:prefix], lead.params, lead.policy, 0,
                    lead.max_len)
    part.handle = lead.handle
    for runner in (slm if lead.policy.uses_slm else None, llm if lead.policy.uses_llm else None):
        if runner is not None:
            result = runner.run([part], head_spec([part]))  # its head's token is not used
            part.record_forward(runner.name, *result.spans[0])
    lead.num_computed = dict(part.num_computed)
    lead.stats.slm_forward_tokens += part.stats.slm_forward_tokens
    lead.stats.llm_forward_tokens += part.stats.llm_forward_tokens
    for seq in group[1:]:
        block_manager.free_sequence(seq.handle)  # its empty table, for one sharing the prefix
        seq.handle = block_manager.fork(lead.handle)
        seq.num_computed = dict(part.num_computed)
