"""Experiment cards shipped with diffkit (installed as ``diffkit.cards``): one JSON file per paper."""
