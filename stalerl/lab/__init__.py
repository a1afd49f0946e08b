"""The staleness lab: sweeps, collapse law, gradient-bias probe, advice.

Everything but the bias probe reads run directories (config.yaml + metrics.jsonl + summary.json),
so the fits, the advice and the figures can run on someone else's logs without the model.
"""
