"""The provenance veto table shared by provenance (builds it), training (CBD term b) and decoding.

``table``: the device layout (``VetoTable``) and the jittable lookup (``veto_entries``,
``veto_candidates``, ``unique_slots``, ``bucket_directory``); ``store``: host-side compile from
(span tokens, BCI) pairs, save and load; ``context_hash``: the hashes both sides agree on. Nothing
here imports the index: ``provenance.veto_build`` finds the spans and calls ``store``.
"""
