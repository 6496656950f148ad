"""Reinforcement learning from rewards: reward models, scorers, and the RL algorithms."""
