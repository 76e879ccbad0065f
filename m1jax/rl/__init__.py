"""Reinforcement learning with verifiable rewards (docs/rl.md): the task interface (``task``) and tasks (``tasks``),
rollout, scoring and advantages, the policy losses (CISPO and its baselines), the jitted update (``step``), and the
task-agnostic, multi-host learner (``learner``) with pretraining, policy checkpoints and a run-directory driver."""
