"""Defenses: training-time and configuration-time methods from the four papers."""
