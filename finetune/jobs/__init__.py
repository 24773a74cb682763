"""Retraining jobs: the queue's front door (queue), the worker that runs them (worker), the child process that
trains (child), what the two say to each other (protocol) and process checks (processes)."""
