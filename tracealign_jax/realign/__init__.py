"""TRACE re-alignment (arXiv 2511.02623): triage preference pairs against a new policy, weight the
conflicting ones by their alignment impact, re-align with the hybrid objective on LoRA adapters.

    triage     host-side: pair categories (RETAIN / INVERT / SUPPRESS) from a judge's labels
    judge      host-side: pluggable judges (rules YAML, TraceShield provenance), label cache, agreement
    impact     jitted: <g_J, g_i> for every pair by one forward-mode JVP per batch; TRACE weights
    objective  pure loss functions of log-probs: inverted-pair logistic / IPO, dual NPO, token KL
    step       the TRACE loss on LoRA adapters (reference = the base with B = 0); ``loss.type: trace``
               trains it through ``training.loop`` / ``training.step`` like every objective
    data       host-side: each tokenized pair's category and impact weight, from its record
    pipeline   file-to-file stages behind ``tracealign realign triage|impact`` (commands)
"""
