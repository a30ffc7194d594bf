"""Learners with a stable-baselines3-style surface."""
