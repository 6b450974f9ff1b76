"""Ahead-of-time compilation of the train and decode steps for TPU slices this machine does not have.

``tracealign compile-check`` (``aot.commands``) -> ``aot.pod_table`` (configs, tables) ->
``aot.steps`` (the exact jitted steps with abstract sharded inputs) -> ``aot.compile_check``
(compile, measure) -> ``aot.hlo_report`` (memory, FLOPs, collectives) with ``aot.hardware``
(chip table, libtpu topologies).
"""
