"""Reinforcement learning: policy losses, advantages, verifiable tasks, rollout and the RL update."""
