"""TRACE re-alignment (arXiv 2511.02623): triage preference pairs against a new policy, weight the
conflicting ones by their alignment impact, re-align with the hybrid objective.

    triage     host-side: pair categories (retain / invert / suppress) from a judge's labels
    judge      host-side: pluggable judges (rules YAML, TraceShield provenance), label cache, agreement
    impact     jitted: <g_J, g_i> for every pair by one forward-mode JVP per batch, weights w_i
    objective  pure loss functions of log-probs: inverted-pair logistic / IPO, dual NPO, token KL
"""
