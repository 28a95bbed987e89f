"""Studies: named arms (a preset + overrides), each trained with several seeds, and a report
that compares them, paired by seed (plan.py: the study file and its plan; run.py: running it;
report.py: what the runs' own files say about it)."""
