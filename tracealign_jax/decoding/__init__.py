"""Decoding: beam search, greedy and sampling in one compiled loop each, with the provenance veto."""
