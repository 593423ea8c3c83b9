"""Runnable examples: ``python -m kronjax.examples.<name>``.

- ``distributed``: data-parallel K-FAC over a device mesh, one host or many.
"""
