"""Security scanning: trivy, hadolint, pip-audit, bandit and CycloneDX SBOMs, run as
subprocesses and judged under one policy (security/policy.yaml). `python -m security`
(or `invoke scan`) runs them; see security/cli.py. Nothing here wraps a scanner library.
"""
