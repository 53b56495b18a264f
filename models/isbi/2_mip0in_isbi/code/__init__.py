"""Frozen copy of metroem code for this module."""
