"""Precision passes (one pass per file), named by the records in kiln/precisions.py.

optimize/passes.py registers every pass class these files define; no list to keep here.
"""
