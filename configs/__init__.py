"""Experiment configs (ml-collections): one experiment per file, `get_config(arg)`."""
