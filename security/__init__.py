"""Security scanning (issue: security scanning). Not built yet; see the README."""
