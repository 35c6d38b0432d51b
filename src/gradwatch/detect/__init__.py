"""Diagnosis: statistics blocks in, findings out."""
