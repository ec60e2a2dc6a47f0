"""The Ray Train loop: steps, optimizer, checkpoint/resume, metrics."""
