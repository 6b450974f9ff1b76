"""Decoding: beam search, greedy and sampling in one compiled loop each, with the provenance veto.

    from tracealign_jax.decoding import Decoder
    dec = Decoder(model, cfg.decode, veto_table=table, refusal_ids=ids, mesh=mesh, rules=rules)
    completions = dec.decode(prompt_token_lists)               # cfg.decode.veto mode
    completions = dec.decode(prompt_token_lists, veto="off")   # same policy without the veto

The loop cores (``beam_search``, ``greedy``, ``sample``) take any ``tokens_to_logits`` callable
and an optional logits hook (``make_veto_hook``); see their modules for shapes and semantics.
"""

from tracealign_jax.decoding.beam_search import beam_search
from tracealign_jax.decoding.runner import Completion, Decoder, abstract_decoder, decode_function
from tracealign_jax.decoding.sampling import greedy, sample
from tracealign_jax.decoding.step import DecodeOutput, brevity_penalty
from tracealign_jax.decoding.veto_hook import VetoSpec, make_veto_hook

__all__ = [
    "beam_search",
    "greedy",
    "sample",
    "Decoder",
    "Completion",
    "DecodeOutput",
    "VetoSpec",
    "make_veto_hook",
    "abstract_decoder",
    "decode_function",
    "brevity_penalty",
]
