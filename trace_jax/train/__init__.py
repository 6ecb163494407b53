"""Training: losses, train state, the TRACE train step."""
