"""Preference oracles for online and iterative rounds."""
