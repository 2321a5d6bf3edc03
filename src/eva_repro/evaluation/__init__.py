"""Held-out evaluation and sampling: baselines, metrics, `eva-repro sample` (`generate`),
`eva-repro evaluate` and its report files."""
