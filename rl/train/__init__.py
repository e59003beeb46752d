"""Supervised stages (pretrain, SFT, distillation), their one training loop, data, optimizer, schedule, chat format, checkpoints, run directories, metrics."""
