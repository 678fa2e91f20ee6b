"""The evaluator: quality metrics through torch-fidelity (quality.py, extractors.py), consistency against a
baseline (consistency.py), the metric table (metrics.py), power-law fits (fits.py), tables (tables.py),
plots (plots.py), published tables (reproduce.py), text-to-image prompt sets (prompts.py) and CLIP score (clip_score.py) and the project's synthetic data set (synthetic.py)."""
