"""Gymnasium wrappers for LIBERO envs, one concern per file."""
