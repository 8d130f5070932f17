"""Launchers that start a multi-process JAX job; cluster submission scripts live in launch/."""
