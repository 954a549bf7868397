"""YAML configs shipped with the recipes."""
