"""The training loop, one epoch's steps, checkpoints, and the device/threads/DDP runtime."""
