"""Calibration sets and the preprocessing every runtime shares."""
