"""The metered endpoint (issue: metered endpoint). Not built yet; see the README."""
