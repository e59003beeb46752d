"""GRPO: the Ray driver, its config, the learner (group), generation workers, weight sync, the loss, tasks."""
